"""Decode-shaped attention as plain tensor ops, so that Inductor fuses it into one loop nest.

A decode or verify step attends 1 to ``K + 1`` queries over a static KV cache. On CPU PyTorch
routes ``scaled_dot_product_attention`` there to its flash kernel, which is built for long
queries: for a single query over 512 cache slots it costs ~0.3 ms per layer on this project's
reference machine, a third of the whole 4-bit decode step. Written as ``softmax(q k^T * scale +
mask) v`` the same computation lowers through Inductor to generated C++ that reads the cache once
(repeat_kv's expand folds into the indexing). This pass rewrites every SDPA call whose query length
is at most ``MAX_QUERIES`` and that runs on the CPU; longer ones (prefill) keep the fused kernel,
and so do CUDA graphs, whose flash kernels already serve short queries well. Scores and softmax are
float32 whatever the input dtype; the result is cast back.

Only calls without dropout and without ``is_causal`` are rewritten (a decode graph passes an
explicit mask); anything else is left as is, and so is attention that is not an SDPA call (HF's eager
attention, e.g. Gemma 3 with soft-capped scores). Regions of ``torch.compiler.nested_compile_region``
(``invoke_subgraph``) are rewritten inside, once per region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx

from ..config import CSDConfig

__all__ = ["MAX_QUERIES", "attention_math", "decode_attention"]

MAX_QUERIES = 16

_SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def attention_math(query, key, value, attn_mask=None, scale=None, enable_gqa=False):
    """``scaled_dot_product_attention`` (no dropout, not causal) in float32 tensor ops."""
    hq, hkv = query.shape[-3], key.shape[-3]
    if enable_gqa and hq != hkv:
        key = key.repeat_interleave(hq // hkv, dim=-3)
        value = value.repeat_interleave(hq // hkv, dim=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask.float()
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value.float()).to(query.dtype)


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _cpu_query_len(node: fx.Node) -> int | None:
    """The query length of an SDPA node whose query is a CPU tensor of static shape, else None."""
    val = _val(node.args[0] if node.args else node.kwargs.get("query"))
    if val is None or val.dim() < 2 or val.device.type != "cpu":
        return None
    t = val.shape[-2]
    return t if isinstance(t, int) else None


_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _emit_attention(graph: fx.Graph, bound: dict) -> fx.Node | None:
    """:func:`attention_math` written into ``graph`` as public torch / aten calls (before the current
    insertion point), with the shapes and dtypes it branches on read from the nodes' example values;
    ``None`` when those are unknown. Plain calls (no Python function of ours in the graph) keep the
    graph cacheable by AOT autograd's cache: a warm compile then skips re-tracing the step."""
    q, k, v, mask = bound["query"], bound["key"], bound["value"], bound.get("attn_mask")
    qv, kv = _val(q), _val(k)
    mv = _val(mask) if mask is not None else None
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


def decode_attention(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], cfg: CSDConfig) -> fx.GraphModule:
    """Rewrite short-query SDPA calls of ``gm`` into :func:`attention_math`'s ops (in place; returns ``gm``),
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
