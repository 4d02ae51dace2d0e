"""Pass: replace weight linears with ``csd.qlinear`` on the nested quantized weight.

Before (Dynamo's torch-level graph; weights are placeholders whose values are Parameters)::

    y = torch._C._nn.linear(x, l_..._q_proj_parameters_weight_, bias)

After::

    y = torch.ops.csd.qlinear.default(x, _csd_q3_qdata, _csd_q3_scale, _csd_q3_zero, _csd_q3_bits)
    y = y + bias                      # only when the linear had a bias

On CPU (with the C++ kernel) ``_csd_q3_scale`` and ``_csd_q3_zero`` are both the QLinear's packed
scale/zero copy (``QLinear.kernel_scales``), which the kernel reads faster than the [N, K/g] pair.

The nested weight and the 0-d ``bits`` tensor are the buffers of the weight's one ``QLinear``
(``quant.registry``: the module owns the quantized copy, the graph is a view of it), keyed by the weight
Parameter, so all graphs of one model share one quantized copy and ``set_bits(model, ...)``
reaches them (0 recompiles). The LM head is quantized like the others when
``cfg.quantize_lm_head``; by default (``None``, static ``bits``) it runs on its GGUF file's own grid
when the file stores it in a type the format holds exactly (SmolLM2's Q8_0 head at 8 bits, bit for
bit; ``set_bits`` and plans leave it at that width), else it stays full precision. The head
is a linear whose weight is an embedding table of the graph (tied), or a linear whose output
reaches no other weight linear and whose out_features equals an embedding's vocabulary (any such
terminal linear when the graph has no embedding). Idempotent: a second run finds nothing to replace.

Linears whose shape the format cannot hold (odd out_features; in_features, e.g. a hidden size or
``heads x head_dim``, not a multiple of the group size) stay dense, the rest of the graph is
quantized, and one warning names them (once per weight, however many graphs share it). A graph that
autograd would have to differentiate through a quantized linear (traced in grad mode with weights
requiring grad: ``csd.qlinear`` has no backward) raises :class:`UnsupportedGraph` before any change, so the
backend compiles it with plain Inductor; so does a graph whose linears sit inside a nested region
(``torch.compiler.nested_compile_region``, ``torch.cond``): their weights are the region's inputs.

Fused projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``, any q/k/v or gate/up stored as one
matrix) need nothing special: the parts are stacked along the output rows and groups run along the
input features of each row, so a group never mixes two parts and the fused matrix quantizes exactly
as its parts would one by one.

``bits="auto"``: each weight at the rung and on the grid of its GGUF tensor type
(:func:`csd_compile.quant.gguf.choose`; group 32; the copy kept under the registry's ``"auto"``
key), each copy's ``bits`` set to its own rung (4 or 8); the LM head too when the file stores it
quantized (a tied embedding keeps reading the dense table); weights of float GGUF types stay
dense. One ``AutoBitsWarning`` line says what was approximated; a graph none of whose weight
linears came from a GGUF file raises an ``OptionError``. Nested regions are not combined with
``"auto"`` yet: such a graph falls back to plain Inductor.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from ..config import CSDConfig, OptionError
from ..kernels import qlinear as _qlinear_op  # noqa: F401  (registers torch.ops.csd.qlinear)
from ..quant.registry import quantized_copy
from . import BOUND_INPUTS, UnsupportedGraph, node_value

__all__ = ["quantize_linear"]

_LINEARS = (torch._C._nn.linear, F.linear)
_WARNED = WeakIdKeyDictionary()  # weights already named in a "left dense" warning
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


_INVOKE_SUBGRAPH = getattr(torch.ops.higher_order, "invoke_subgraph", None)


def _regions(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``invoke_subgraph`` calls of ``gm`` (regions of ``torch.compiler.nested_compile_region``)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _INVOKE_SUBGRAPH]


def _other_region_with_linears(gm: fx.GraphModule) -> str | None:
    """The name of a subgraph of another higher-order op (``cond``, ``map``, ...) that runs linears."""
    regions = {str(n.args[0].target) for n in _regions(gm)}
    for node in gm.graph.find_nodes(op="get_attr"):
        sub = getattr(gm, str(node.target), None)
        if str(node.target) not in regions and isinstance(sub, fx.GraphModule) and any(
                n.op == "call_function" and n.target in _LINEARS for n in sub.graph.nodes):
            return str(node.target)
    return None


def _region_weights(sub: fx.GraphModule, operands: Sequence[object], values: dict, group: int
                    ) -> tuple[list[int], list[int]]:
    """Positions of ``sub``'s inputs that are a Parameter used only as linear weights: (fit, unfit)."""
    fit, unfit = [], []
    for i, ph in enumerate(sub.graph.find_nodes(op="placeholder")):
        w = values.get(operands[i]) if isinstance(operands[i], fx.Node) else None
        if not isinstance(w, torch.nn.Parameter) or w.dim() != 2 or not ph.users:
            continue
        if all(u.op == "call_function" and u.target in _LINEARS and u.args[1] is ph and u.args[0] is not ph
               for u in ph.users):
            (unfit if _unfit(w.shape, group) else fit).append(i)
    return fit, unfit


def _rewrite_region(sub: fx.GraphModule, positions: list[int], attrs: list[fx.Node]) -> None:
    """In ``sub``: the linears on the weight inputs at ``positions`` become ``csd.qlinear`` on four new
    inputs each, appended in the order of ``attrs`` (one call's get_attr nodes: qdata, scale, zero,
    bits per position), whose fake values they take."""
    phs = list(sub.graph.find_nodes(op="placeholder"))
    last = phs[-1]
    for j, i in enumerate(positions):
        new = []
        for suffix, attr in zip(("qdata", "scale", "zero", "bits"), attrs[4 * j:4 * j + 4]):
            with sub.graph.inserting_after(last):
                last = sub.graph.placeholder(f"{phs[i].name}_csd_{suffix}")
            last.meta.update({k: v for k, v in attr.meta.items() if k in ("val", "example_value")})
            new.append(last)
        for lin in list(phs[i].users):
            with sub.graph.inserting_before(lin):
                q = sub.graph.call_function(torch.ops.csd.qlinear.default, (lin.args[0], *new))
                q.meta.update(lin.meta)
                bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
                if bias is not None:
                    q = sub.graph.call_function(operator.add, (q, bias))
                    q.meta.update(lin.meta)
            lin.replace_all_uses_with(q)
            sub.graph.erase_node(lin)
    sub.graph.lint()
    sub.recompile()


def _needs_grad(node: fx.Node) -> bool:
    """Whether the linear's output was traced as requiring grad (grad mode on, weight requiring grad)."""
    val = node_value(node)
    return val is not None and val.requires_grad


def _unfit(shape: torch.Size, group: int) -> bool:
    n_out, k_in = shape
    return bool(n_out % 2 or k_in % group)


def _warn_dense(dense: list[fx.Node], values: dict[fx.Node, object], group: int) -> None:
    """One warning naming the weights (placeholders) in ``dense`` not named before."""
    from ..quant.compiled_policy import module_path

    names = []
    for ph in dict.fromkeys(dense):
        w = values[ph]
        if w in _WARNED:
            continue
        _WARNED[w] = True
        names.append(f"{module_path(ph) or ph.name} {tuple(w.shape)}")
    if not names:
        return
    warnings.warn(f"csd backend: {len(names)} linear(s) left dense, their shape does not fit group_size={group} "
                  f"(in_features must be a multiple of it, out_features even): {', '.join(names)}; "
                  "the other linears are quantized", stacklevel=3)


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
    stored = {}  # quantize_lm_head=None: a head its GGUF file stores exactly runs on that grid
    if cfg.quantize_lm_head is None:
        from ..quant.gguf import stored_exactly

        stored = {n: c for n in skip if (c := stored_exactly(values[n.args[1]])) is not None}
        skip -= stored.keys()
    dense = [n for n in linears if n not in skip and n not in stored and _unfit(values[n.args[1]].shape, group)]
    todo = [n for n in linears if n not in skip and n not in dense]
    region = _other_region_with_linears(gm)
    if region is not None:
        raise UnsupportedGraph(f"weight linears inside the region {region!r} of a higher-order op (torch.cond, "
                               "torch.map, ...): the csd passes reach into nested_compile_region regions only")
    regions = []  # (call, subgraph, fit positions): the same subgraph serves every call of its region
    for call in _regions(gm):
        sub = getattr(gm, str(call.args[0].target))
        fit, unfit = _region_weights(sub, call.args[2:], values, group)
        regions.append((call, sub, fit))
        dense.extend(call.args[2 + i] for i in unfit)
    if len({id(sub) for _, sub, _ in regions}) != len({(id(sub), tuple(fit)) for _, sub, fit in regions}):
        raise UnsupportedGraph("calls of one nested region pass weights at different inputs")
    in_regions = [u for _, sub, fit in regions for i in fit for u in list(sub.graph.find_nodes(op="placeholder"))[i].users]
    if any(_needs_grad(n) for n in todo + in_regions):
        raise UnsupportedGraph("weights that require grad under autograd: csd.qlinear has no backward "
                               "(compile under torch.no_grad() or torch.inference_mode() to quantize)")
    _warn_dense([n if n.op == "placeholder" else n.args[1] for n in dense], values, group)
    auto = dict(stored)
    if cfg.bits == "auto":
        from ..quant import gguf

        if regions:
            raise UnsupportedGraph("bits='auto' inside nested_compile_region regions is not supported yet")
        choices = [(str(n.args[1]), gguf.choose(values[n.args[1]])) for n in todo]
        try:
            gguf.require_gguf(choices)
        except ValueError as e:
            raise OptionError(str(e)) from None
        auto = {n: c for n, (_, c) in zip(todo, choices)}
        gguf.warn_if_approximated(choices, stacklevel=4)
        todo = [n for n in todo if auto[n].nested is not None]  # float GGUF types stay dense
    # The weights this graph now carries as quantized constants (graph inputs whose tensors it is
    # bound to): the backend recompiles for a call that passes other tensors there.
    bound = {n.args[1] for n in todo} | {call.args[2 + i] for call, _, fit in regions for i in fit}
    gm.meta[BOUND_INPUTS] = sorted(placeholders.index(n) for n in bound)
    # Dynamo's graph keeps fake values under "example_value", an FX/AOT graph under "val".
    meta_keys = [k for k in ("val", "example_value") if any(k in n.meta for n in gm.graph.nodes)]
    fake_mode = torch._guards.detect_fake_mode(
        [n.meta[k] for n in gm.graph.nodes for k in meta_keys if k in n.meta])
    from torch._dynamo.source import ConstantSource

    name_to_source = getattr(gm, "_param_name_to_source", None)
    count = sum(1 for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("_csd_q"))
    changed_bits = False

    def attrs_for(weight: torch.nn.Parameter, before: fx.Node, choice=None) -> list[fx.Node]:
        """get_attr nodes (before ``before``) of the four buffers of ``weight``'s one quantized copy
        (``choice``: its ``bits="auto"`` grid)."""
        nonlocal count, changed_bits
        if choice is not None:  # a stored head is not one of the plan's linears (set_bits leaves it)
            qlin, was_changed = quantized_copy(weight, group, choice.bits, nested=choice.nested,
                                               in_graph=cfg.bits == "auto")
        else:
            qlin, was_changed = quantized_copy(weight, group, init_bits, static=isinstance(cfg.bits, int))
        changed_bits |= was_changed
        attrs = []
        # on CPU the packed scale/zero copy (QLinear.kernel_scales), passed as both
        scale, zero = qlin.kernel_scales()
        with gm.graph.inserting_before(before):
            for suffix, t in zip(("qdata", "scale", "zero", "bits"), (qlin.qdata, scale, zero, qlin.bits)):
                name = f"_csd_q{count}_{suffix}"
                gm.register_buffer(name, t)
                if name_to_source is not None:
                    name_to_source[name] = ConstantSource(name)
                a = gm.graph.get_attr(name)
                if fake_mode is not None:
                    for k in meta_keys:
                        a.meta[k] = fake_mode.from_tensor(t, static_shapes=True)
                attrs.append(a)
        count += 1
        return attrs

    rewritten = set()
    for call, sub, fit in regions:
        extra = [a for i in fit for a in attrs_for(values[call.args[2 + i]], call)]
        if id(sub) not in rewritten:
            rewritten.add(id(sub))
            _rewrite_region(sub, fit, extra)
        call.args = (*call.args, *extra)
    for node in todo:
        attrs = attrs_for(values[node.args[1]], node, auto.get(node))
        with gm.graph.inserting_before(node):
            x = node.args[0]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            new = gm.graph.call_function(torch.ops.csd.qlinear.default, (x, *attrs))
            new.meta.update(node.meta)
            if bias is not None:
                new = gm.graph.call_function(operator.add, (new, bias))
                new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if changed_bits:
        warnings.warn(f"csd backend: bits={cfg.bits} now also applies to the graphs compiled earlier from this model "
                      "(its linears share one quantized copy and one bit-width); use csd_compile.set_bits(model, b) "
                      "to switch widths without compiling", stacklevel=2)
    gm.graph.lint()
    gm.recompile()
    return gm
