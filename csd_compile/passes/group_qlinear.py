"""Pass: quantized linears that read the same input run as one ``csd.qlinear_multi`` call.

Before (after ``quantize_linear``; a Llama layer's attention input)::

    q = torch.ops.csd.qlinear.default(x, _csd_q0_qdata, _csd_q0_scale, _csd_q0_zero, _csd_q0_bits)
    k = torch.ops.csd.qlinear.default(x, _csd_q1_qdata, _csd_q1_scale, _csd_q1_zero, _csd_q1_bits)
    v = torch.ops.csd.qlinear.default(x, _csd_q2_qdata, _csd_q2_scale, _csd_q2_zero, _csd_q2_bits)

After::

    qkv = torch.ops.csd.qlinear_multi.default(x, [_csd_q0_qdata, _csd_q1_qdata, _csd_q2_qdata], [...scales],
                                              [...zeros], [_csd_q0_bits, _csd_q1_bits, _csd_q2_bits])
    q, k, v = qkv[0], qkv[1], qkv[2]

Each weight keeps its own quantized copy and its own ``bits`` tensor, so ``set_bits``, the dynamic
policy and the self draft's views see the same linears as before; nothing is concatenated. What is
saved is per call: at decode, a SmolLM2 layer's seven products become four calls (q/k/v, o,
gate/up, down), and the C++ kernel spreads the grouped weights' work over the threads together
(k and v alone are three 64-row blocks each, too little to split well over two threads).

Grouped: calls of ``csd.qlinear`` (what ``quantize_linear`` writes) or ``csd.qlinear_cpu_native``
(what a ``QLinear`` module calls on CPU: a model quantized with ``quantize_``, the self draft's
views) whose input is the same node and whose weights, graph inputs or buffers, have the same group
size (and so the same in_features), in the top-level graph and in the subgraphs of its nested
regions (``torch.compiler.nested_compile_region``: one subgraph serves every call). The multi
call takes the place of the group's first call; the weights' ``get_attr`` nodes move before it when
they came later.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import fx

from ..config import CSDConfig
from ..kernels import qlinear as _qlinear_op  # noqa: F401  (registers torch.ops.csd.qlinear / qlinear_multi)
from . import node_value

__all__ = ["group_qlinear"]

_META_KEYS = ("val", "example_value")


def _targets() -> tuple:
    """``csd.qlinear`` and, once the C++ kernels are loaded, ``csd.qlinear_cpu_native``, which a
    ``QLinear`` (``quantize_``, the self draft's views) calls directly on CPU; as overloads and as
    the packets Dynamo records for a module's ``torch.ops.csd.x(...)`` call."""
    packets = [torch.ops.csd.qlinear]
    if hasattr(torch.ops.csd, "qlinear_cpu_native"):  # registered by native.load()
        packets.append(torch.ops.csd.qlinear_cpu_native)
    return tuple(packets) + tuple(p.default for p in packets)


def _shape(gm: fx.GraphModule, node: fx.Node) -> tuple[int, ...] | None:
    val = node_value(node)
    if val is not None:
        return tuple(val.shape)
    if node.op == "get_attr":
        val = getattr(gm, str(node.target), None)
        if isinstance(val, torch.Tensor):
            return tuple(val.shape)
    return None


def _group_size(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The group size of the weight of the quantized-linear call ``node``; ``None`` when its weight
    is not a graph input or buffer (only those can move ahead of the group's first call)."""
    weight = node.args[1:5]
    if len(weight) != 4 or not all(isinstance(a, fx.Node) and a.op in ("get_attr", "placeholder") for a in weight):
        return None
    q, s = _shape(gm, weight[0]), _shape(gm, weight[1])
    # scale [N, K/g], or packed [ceil(N/64), K/g, 2, 64] on CPU (quant.nested.pack_scale_zero)
    if q is None or s is None or len(q) != 3 or len(s) not in (2, 4) or not s[1]:
        return None
    return 2 * q[2] // s[1]


def group_qlinear(gm: fx.GraphModule, example_inputs: Sequence[object], cfg: CSDConfig) -> fx.GraphModule:
    """Replace each set of quantized-linear calls on one input (and one group size) with one
    ``csd.qlinear_multi`` call, in ``gm`` and in its nested regions' subgraphs; see the module doc."""
    if not cfg.group_linears:
        return gm
    from .quantize_linear import _regions

    modules = {id(gm): gm}
    for call in _regions(gm):  # one subgraph serves every call of its region
        sub = getattr(gm, str(call.args[0].target), None)
        if isinstance(sub, fx.GraphModule):
            modules.setdefault(id(sub), sub)
    for module in modules.values():
        if _group_graph(module):
            module.graph.lint()
            module.recompile()
    return gm


def _group_graph(gm: fx.GraphModule) -> bool:
    """Group the calls of ``gm``'s own graph; whether anything changed."""
    groups: dict[tuple[fx.Node, int], list[fx.Node]] = {}
    targets = _targets()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in targets or len(node.args) != 5:
            continue
        x = node.args[0]
        group = _group_size(gm, node)
        if isinstance(x, fx.Node) and group is not None and not node.kwargs:
            groups.setdefault((x, group), []).append(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changed = False
    for (x, _), calls in groups.items():
        if len(calls) < 2:
            continue
        calls.sort(key=order.__getitem__)
        first = calls[0]
        for call in calls[1:]:  # the weights' buffers, defined before the first call
            for attr in call.args[1:5]:
                if attr.op == "get_attr" and order[attr] > order[first]:
                    first.prepend(attr)
        lists = [[call.args[1 + i] for call in calls] for i in range(4)]
        with gm.graph.inserting_before(first):
            multi = gm.graph.call_function(torch.ops.csd.qlinear_multi.default, (x, *lists))
            for key in _META_KEYS:
                vals = [call.meta.get(key) for call in calls]
                if all(isinstance(v, torch.Tensor) for v in vals):
                    multi.meta[key] = vals
            outs = []
            for i, call in enumerate(calls):
                out = gm.graph.call_function(operator.getitem, (multi, i))
                out.meta.update(call.meta)
                outs.append(out)
        for call, out in zip(calls, outs):
            call.replace_all_uses_with(out)
            gm.graph.erase_node(call)
        changed = True
    return changed
