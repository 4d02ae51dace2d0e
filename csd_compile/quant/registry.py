"""The one quantized copy of each weight: a :class:`~csd_compile.quant.linear.QLinear` per
(weight Parameter, group size), found again by every path that quantizes that weight.

``QLinear`` owns a quantized weight (nested planes, scales, zeros, a 0-d ``bits`` tensor). Eager
``quantize_`` swaps modules for ``QLinear`` s; the compile pass cannot swap the modules of a model it
only sees as a graph, so it asks this registry for the ``QLinear`` of each weight ``Parameter`` and
puts that module's buffers into the graph; the self draft takes a :meth:`QLinear.view` of the same
copy at its own bit-width. So a model compiled at 4 bits and drafted at 2 holds one quantized copy,
every graph compiled from the model (prefill, decode, recompiles) shares it and its ``bits``, and
``set_bits(model, ...)`` reaches it through ``model.modules()`` (:func:`quantized_linears`).

``bits="auto"`` copies (a GGUF file's own grid, :mod:`csd_compile.quant.gguf`) are kept apart
from the group-size copies, under the key ``"auto"``.

Entries are keyed weakly by the Parameter: dropping the model frees its quantized copy. The
bit-width is the model's state: compiling again with other static ``bits`` options sets it (the
pass warns when earlier graphs share it), like ``set_bits`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:
    from .linear import QLinear

__all__ = ["lookup_quantized", "quantized_copy"]


class _Entry:
    __slots__ = ("module", "requested", "in_graph")

    def __init__(self, module: "QLinear", requested: int | None):
        self.module, self.requested, self.in_graph = module, requested, False


# Parameter -> {group_size or "auto": _Entry}
_REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()


def quantized_copy(weight: torch.nn.Parameter, group_size: int, bits: int, *, static: bool = True,
                   in_graph: bool = True, nested=None) -> tuple["QLinear", bool]:
    """The shared ``QLinear`` (no bias) of ``weight`` at ``group_size``, and whether this call
    changed its bit-width.

    Created on first use at ``bits``. A caller with *static* ``bits`` different from what the
    previous static caller asked for sets the shared width to ``bits`` (new options take effect),
    while asking again with the same value leaves a width chosen since by ``set_bits`` alone.
    ``static=False`` (the dynamic policy or a draft's view drives the width) never writes it.
    ``in_graph``: the caller runs the weight at this copy's own ``bits`` as one of the model's
    quantized linears (the compile pass); only such copies are reached by ``set_bits`` (a draft's
    views have their own widths; an LM head kept at its file's precision keeps its own).
    ``nested``: a ready quantized copy (``bits="auto"``'s :class:`~csd_compile.quant.nested.NestedWeight`),
    kept under the key ``"auto"`` and used when that key has no copy yet.
    """
    from .linear import QLinear

    per_group = _REGISTRY.get(weight)
    if per_group is None:
        per_group = {}
        _REGISTRY[weight] = per_group
    key = group_size if nested is None else "auto"
    entry = per_group.get(key)
    if entry is None:
        # never inference tensors, even when the first user decodes under torch.inference_mode: a
        # later compile writes the shared ``bits`` while tracing, outside inference mode
        with torch.no_grad(), torch.inference_mode(False):
            module = QLinear(weight, None, bits=bits, group_size=group_size, nested=nested)
        entry = per_group[key] = _Entry(module, bits if static else None)
        entry.in_graph = in_graph
        return module, False
    entry.in_graph |= in_graph
    changed = False
    if static and entry.requested != bits:
        changed = entry.requested is not None and int(entry.module.bits) != bits
        entry.module.bits.fill_(bits)
        entry.requested = bits
    return entry.module, changed


def lookup_quantized(weight: torch.Tensor) -> list["QLinear"]:
    """The quantized copies a compiled graph runs ``weight`` with (one per group size; empty if none)."""
    return [e.module for e in _REGISTRY.get(weight, {}).values() if e.in_graph]
