"""Pass: replace weight linears with ``csd.qlinear`` on the nested quantized weight.

Before (Dynamo's torch-level graph; weights are placeholders whose values are Parameters)::

    y = torch._C._nn.linear(x, l_..._q_proj_parameters_weight_, bias)

After::

    y = torch.ops.csd.qlinear.default(x, _csd_q3_qdata, _csd_q3_scale, _csd_q3_zero, _csd_q3_bits)
    y = y + bias                      # only when the linear had a bias

The nested weight and the 0-d ``bits`` tensor are the buffers of the weight's one ``QLinear``
(``quant.registry``: the module owns the quantized copy, the graph is a view of it), keyed by the weight
Parameter, so all graphs of one model share one quantized copy and ``set_bits(model, ...)``
reaches them (0 recompiles). The LM head stays full precision unless ``cfg.quantize_lm_head``:
it is a linear whose weight is an embedding table of the graph (tied), or a linear whose output
reaches no other weight linear and whose out_features equals an embedding's vocabulary (any such
terminal linear when the graph has no embedding). Linears whose shape the format cannot hold (odd out_features, in_features not
divisible by the group size) are left alone. Idempotent: a second run finds nothing to replace.

``bits="auto"``: each weight at the rung and on the grid of its GGUF tensor type
(:func:`csd_compile.quant.gguf.choose`; group 32; the copy kept under the registry's ``"auto"``
key), each copy's ``bits`` set to its own rung (4 or 8); the LM head too when the file stores it
quantized (a tied embedding keeps reading the dense table); weights of float GGUF types stay
dense. One ``AutoBitsWarning`` line says what was approximated; a graph none of whose weight
linears came from a GGUF file raises an ``OptionError``.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx

from ..config import CSDConfig, OptionError
from ..kernels import qlinear as _qlinear_op  # noqa: F401  (registers torch.ops.csd.qlinear)
from ..quant.registry import quantized_copy

__all__ = ["quantize_linear"]

_LINEARS = (torch._C._nn.linear, F.linear)
_EMBEDDINGS = (F.embedding, torch.embedding)


def _weight_linears(gm: fx.GraphModule, values: dict[fx.Node, object]) -> list[fx.Node]:
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LINEARS or len(node.args) < 2:
            continue
        w = node.args[1]
        if isinstance(w, fx.Node) and isinstance(values.get(w), torch.nn.Parameter) and values[w].dim() == 2:
            out.append(node)
    return out


def _lm_heads(gm: fx.GraphModule, linears: list[fx.Node], values: dict[fx.Node, object]) -> set[fx.Node]:
    linear_set = set(linears)
    terminal = set()
    for lin in linears:  # linears whose output reaches no other weight linear
        seen, stack, feeds = set(), list(lin.users), False
        while stack and not feeds:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            feeds = n in linear_set
            stack.extend(n.users)
        if not feeds:
            terminal.add(lin)
    tables = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _EMBEDDINGS:
            w = node.args[1] if node.target is F.embedding else node.args[0]
            if isinstance(w, fx.Node) and isinstance(values.get(w), torch.Tensor):
                tables.append(values[w])
    if not tables:
        return terminal
    vocab = {t.shape[0] for t in tables}
    tied = {n for n in linears if any(values[n.args[1]] is t for t in tables)}
    return tied | {n for n in terminal if values[n.args[1]].shape[0] in vocab}


def quantize_linear(gm: fx.GraphModule, example_inputs: Sequence[object], cfg: CSDConfig) -> fx.GraphModule:
    """Replace every quantizable weight linear of ``gm`` with ``csd.qlinear``; see the module doc."""
    if cfg.bits is None:
        return gm
    init_bits = cfg.bits if isinstance(cfg.bits, int) else 8  # "dynamic": the policy sets it later
    group = cfg.group_size
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs))
    linears = _weight_linears(gm, values)
    skip = set() if cfg.quantize_lm_head else _lm_heads(gm, linears, values)
    auto = {}
    if cfg.bits == "auto":
        from ..quant import gguf

        choices = [(str(n.args[1]), gguf.choose(values[n.args[1]])) for n in linears if n not in skip]
        try:
            gguf.require_gguf(choices)
        except ValueError as e:
            raise OptionError(str(e)) from None
        auto = {n: c for n, (_, c) in zip((n for n in linears if n not in skip), choices)}
        gguf.warn_if_approximated(choices, stacklevel=4)
    # Dynamo's graph keeps fake values under "example_value", an FX/AOT graph under "val".
    meta_keys = [k for k in ("val", "example_value") if any(k in n.meta for n in gm.graph.nodes)]
    fake_mode = torch._guards.detect_fake_mode(
        [n.meta[k] for n in gm.graph.nodes for k in meta_keys if k in n.meta])
    from torch._dynamo.source import ConstantSource

    name_to_source = getattr(gm, "_param_name_to_source", None)
    count = sum(1 for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("_csd_q"))
    changed_bits = False
    for node in linears:
        weight = values[node.args[1]]
        n_out, k_in = weight.shape
        if node in skip or n_out % 2 or k_in % group:
            continue
        if cfg.bits == "auto":
            choice = auto[node]
            if choice.nested is None:
                continue
            qlin, was_changed = quantized_copy(weight, group, choice.bits, nested=choice.nested)
        else:
            qlin, was_changed = quantized_copy(weight, group, init_bits, static=isinstance(cfg.bits, int))
        changed_bits |= was_changed
        tensors = {"qdata": qlin.qdata, "scale": qlin.scale, "zero": qlin.zero, "bits": qlin.bits}
        with gm.graph.inserting_before(node):
            attrs = []
            for suffix, t in tensors.items():
                name = f"_csd_q{count}_{suffix}"
                gm.register_buffer(name, t)
                if name_to_source is not None:
                    name_to_source[name] = ConstantSource(name)
                a = gm.graph.get_attr(name)
                if fake_mode is not None:
                    for k in meta_keys:
                        a.meta[k] = fake_mode.from_tensor(t, static_shapes=True)
                attrs.append(a)
            x = node.args[0]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            new = gm.graph.call_function(torch.ops.csd.qlinear.default, (x, *attrs))
            new.meta.update(node.meta)
            if bias is not None:
                new = gm.graph.call_function(operator.add, (new, bias))
                new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if changed_bits:
        warnings.warn(f"csd backend: bits={cfg.bits} now also applies to the graphs compiled earlier from this model "
                      "(its linears share one quantized copy and one bit-width); use csd_compile.set_bits(model, b) "
                      "to switch widths without compiling", stacklevel=2)
    gm.graph.lint()
    gm.recompile()
    return gm
