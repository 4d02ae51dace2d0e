"""The ordered FX passes of the ``"csd"`` backend.

Every pass has one signature, ``(gm, example_inputs, cfg) -> gm``, and runs on the torch-level
graph Dynamo hands the backend, before AOT autograd and Inductor. ``example_inputs`` holds the
real tensors of the graph's placeholders (parameters included), so a pass may read weights.
A pass that cannot handle a graph raises :class:`UnsupportedGraph` (or any error) before it has
changed anything the caller still uses; the backend then compiles the untouched graph with plain
Inductor and warns once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import fx

from ..config import CSDConfig

__all__ = ["BOUND_INPUTS", "PassFn", "UnsupportedGraph", "clone_graph_module", "node_value", "pre_aot_passes"]

# GraphModule.meta key a pass sets: positions of the graph inputs whose tensors it baked into the
# graph (quantize_linear: the weights it replaced with their quantized copies)
BOUND_INPUTS = "csd_bound_inputs"

PassFn = Callable[[fx.GraphModule, Sequence[torch.Tensor], CSDConfig], fx.GraphModule]


class UnsupportedGraph(RuntimeError):
    """Raised by a pass for a graph it cannot rewrite; the backend falls back to plain Inductor."""


def node_value(node: object) -> torch.Tensor | None:
    """The (fake) tensor a traced node stands for: Dynamo keeps it under ``example_value``, an FX or
    AOT graph under ``val``; ``None`` for a non-node or a node whose value is not a tensor."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose graph (and Dynamo metadata) passes may edit freely.

    Submodules and attributes are shared with ``gm``; the graph, ``meta`` and Dynamo's
    ``_param_name_to_source`` map (which passes extend when they add buffers) are copied.
    """
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    new.meta = dict(gm.meta)
    # AOT autograd reads Dynamo's per-placeholder source; deepcopy of the graph drops that attribute.
    for old, node in zip(gm.graph.find_nodes(op="placeholder"), new.graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            node._dynamo_source = old._dynamo_source
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = dict(gm._param_name_to_source)
    return new


def pre_aot_passes(cfg: CSDConfig) -> list[tuple[str, PassFn]]:
    """The passes to run for ``cfg``, in order, as ``(name, fn)`` pairs."""
    from .decode_attention import decode_attention

    passes: list[tuple[str, PassFn]] = [("decode_attention", decode_attention)]
    if cfg.bits is not None:
        from .quantize_linear import quantize_linear

        passes.append(("quantize_linear", quantize_linear))
    if cfg.group_linears:  # also the linears of a model quantized before compiling (quantize_)
        from .group_qlinear import group_qlinear

        passes.append(("group_qlinear", group_qlinear))
    return passes
