"""Decode-shaped attention as one op that reads only the open cache slots.

A decode or verify step attends 1 to ``K + 1`` queries over a static KV cache, allocated for the
longest sequence the call may reach; a mask closes the slots not written yet. On CPU PyTorch routes
``scaled_dot_product_attention`` there to its flash kernel, built for long queries (for a single
query over 512 slots ~0.3 ms per layer on this project's reference machine, a third of a 4-bit
decode step), and tensor ops (``softmax(q k^T * scale + mask) v``, which Inductor fuses) still read
and multiply every slot of the cache, so the step's cost grows with the cache's capacity. This pass
rewrites every SDPA call whose query length is at most ``MAX_QUERIES`` and that runs on the CPU into
``csd::decode_attention`` (``csd_compile/kernels/attention.py``): the C++ kernel skips the slots the
mask closes and reads a grouped-query cache once per key/value head (HF's ``repeat_kv``, an expand
and reshape or a ``repeat_interleave`` of the cache before SDPA, is undone here so that the op gets
the cache itself). Longer queries (prefill) keep the fused kernel, and so does CUDA, whose flash
kernels already serve short queries well. Scores and softmax are float32 whatever the input dtype;
the result is cast back. Inputs that are not 4-d ``[B, H, T, D]`` get the same math as public
tensor ops instead.

Only calls without dropout and without ``is_causal`` are rewritten (a decode graph passes an
explicit mask); anything else is left as is, and so is attention that is not an SDPA call (HF's eager
attention, e.g. Gemma 3 with soft-capped scores). Regions of ``torch.compiler.nested_compile_region``
(``invoke_subgraph``) are rewritten inside, once per region.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx

from ..config import CSDConfig
from ..kernels import attention as _attention  # registers torch.ops.csd.decode_attention
from . import node_value

__all__ = ["MAX_QUERIES", "decode_attention"]

MAX_QUERIES = 16

_SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def _cpu_query_len(node: fx.Node) -> int | None:
    """The query length of an SDPA node whose query is a CPU tensor of static shape, else None."""
    val = node_value(node.args[0] if node.args else node.kwargs.get("query"))
    if val is None or val.dim() < 2 or val.device.type != "cpu":
        return None
    t = val.shape[-2]
    return t if isinstance(t, int) else None


_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _emit_attention(graph: fx.Graph, bound: dict) -> fx.Node | None:
    """``attention_ref``'s math written into ``graph`` as public torch / aten calls (before the current
    insertion point), with the shapes and dtypes it branches on read from the nodes' example values;
    ``None`` when those are unknown. Plain calls (no Python function of ours in the graph) keep the
    graph cacheable by AOT autograd's cache: a warm compile then skips re-tracing the step."""
    q, k, v, mask = bound["query"], bound["key"], bound["value"], bound.get("attn_mask")
    qv, kv = node_value(q), node_value(k)
    mv = node_value(mask) if mask is not None else None
    scale = bound.get("scale")
    if qv is None or kv is None or (mask is not None and mv is None) or not isinstance(scale, (float, int, type(None))):
        return None
    call = graph.call_function

    def f32(x):
        return call(torch.ops.aten._to_copy.default, (x,), {"dtype": torch.float32})

    hq, hkv = qv.shape[-3], kv.shape[-3]
    if bound.get("enable_gqa", False) and hq != hkv:
        k = call(torch.repeat_interleave, (k, hq // hkv), {"dim": -3})
        v = call(torch.repeat_interleave, (v, hq // hkv), {"dim": -3})
    scale = 1.0 / math.sqrt(qv.shape[-1]) if scale is None else float(scale)
    scores = call(torch.mul, (call(torch.matmul, (f32(q), call(torch.transpose, (f32(k), -1, -2)))), scale))
    if mask is not None:
        if mv.dtype == torch.bool:
            scores = call(torch.masked_fill, (scores, call(torch.logical_not, (mask,)), float("-inf")))
        else:
            scores = call(torch.add, (scores, f32(mask)))
    out = call(torch.matmul, (call(torch.softmax, (scores, -1)), f32(v)))
    return call(torch.ops.aten._to_copy.default, (out,), {"dtype": qv.dtype})


_ALL = slice(None, None, None)


def _unrepeated(node):
    """The 4-d cache ``node`` repeats along its heads for grouped-query attention (HF's ``repeat_kv``:
    ``x[:, :, None]``, ``expand``, ``reshape``; or ``repeat_interleave(x, n, dim=1)``), else ``None``."""
    if not isinstance(node, fx.Node) or node.op not in ("call_method", "call_function"):
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if name == "repeat_interleave":
        src = node.args[0] if node.args else None
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        val, out = node_value(src), node_value(node)
        ok = val is not None and out is not None and val.dim() == 4 and dim in (1, -3) and isinstance(node.args[1], int)
        return src if ok and out.shape[1] == val.shape[1] * node.args[1] else None
    if name != "reshape" or not node.args:
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand" and expand.args):
        return None
    index = expand.args[0]
    if not (isinstance(index, fx.Node) and index.op == "call_function" and index.target is operator.getitem
            and index.args[1] == (_ALL, _ALL, None, _ALL, _ALL)):
        return None
    src, val, out = index.args[0], node_value(index.args[0]), node_value(node)
    if val is None or out is None or val.dim() != 4 or out.dim() != 4:
        return None
    b, h, s, d = val.shape
    return src if tuple(out.shape) == (b, out.shape[1], s, d) and out.shape[1] % h == 0 else None


def _emit_op(graph: fx.Graph, bound: dict) -> fx.Node | None:
    """``csd::decode_attention`` on the cache itself for 4-d inputs, or ``None``."""
    q, k, v, mask = bound["query"], bound["key"], bound["value"], bound.get("attn_mask")
    qv, kv, vv = node_value(q), node_value(k), node_value(v)
    scale = bound.get("scale")
    if qv is None or kv is None or vv is None or qv.dim() != 4 or kv.dim() != 4 or vv.shape != kv.shape:
        return None
    if mask is not None and node_value(mask) is None or not isinstance(scale, (float, int, type(None))):
        return None
    if qv.dtype != kv.dtype or qv.dtype != vv.dtype or not all(isinstance(n, int) for n in (qv.shape[1], kv.shape[1])):
        return None  # (the cache length may be symbolic; head counts may not)
    hq, hkv = qv.shape[1], kv.shape[1]
    if hq != hkv and not bound.get("enable_gqa", False):
        return None  # SDPA itself refuses this
    if hq % hkv:
        return None
    k_src, v_src = _unrepeated(k), _unrepeated(v)
    if k_src is not None and v_src is not None and node_value(k_src).shape == node_value(v_src).shape and hq % node_value(k_src).shape[1] == 0:
        k, v = k_src, v_src  # the cache itself, read once per key/value head
    scale = 1.0 / math.sqrt(qv.shape[-1]) if scale is None else float(scale)
    return graph.call_function(torch.ops.csd.decode_attention.default, (q, k, v, mask, scale))


def decode_attention(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], cfg: CSDConfig) -> fx.GraphModule:
    """Rewrite short-query SDPA calls of ``gm`` into ``csd::decode_attention`` (in place; returns ``gm``),
    and those of its ``nested_compile_region`` regions (``invoke_subgraph``), once per region."""
    invoke = getattr(torch.ops.higher_order, "invoke_subgraph", None)
    subs = {str(n.args[0].target) for n in gm.graph.nodes if n.op == "call_function" and n.target is invoke}
    for sub in {id(m): m for m in (getattr(gm, name) for name in subs)}.values():
        decode_attention(sub, (), cfg)
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA_TARGETS:
            continue
        t = _cpu_query_len(node)
        if t is None or t > MAX_QUERIES:
            continue
        bound = dict(zip(_ARG_NAMES, node.args))
        bound.update(node.kwargs)
        if bound.get("dropout_p", 0.0) not in (0, 0.0) or bound.get("is_causal", False) is not False:
            continue
        if any(k not in _ARG_NAMES for k in bound):
            continue
        with gm.graph.inserting_before(node):
            new = _emit_op(gm.graph, bound)
            if new is None:
                new = _emit_attention(gm.graph, bound)
        if new is None:
            continue
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
