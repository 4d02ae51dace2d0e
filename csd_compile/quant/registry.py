"""Where the bit-width tensors of a model live, so ``set_bits`` can reach every quantized linear.

Two kinds of quantized linear exist: :class:`~csd_compile.quant.linear.QLinear` modules (eager
``quantize_`` path; the bits tensor is a buffer) and the ``csd.qlinear`` calls the compile pass puts
into a graph in place of an ``nn.Linear`` whose module stays in the user's model. For the latter,
the nested weight and its bits tensor are kept here, keyed weakly by the original weight Parameter,
so every graph compiled from the same model (prefill, decode, recompiles) shares one quantized copy
and one bits tensor, and ``set_bits(model, ...)`` finds them by walking ``model.modules()``. The
bit-width is thus the model's state: compiling again with other static ``bits`` options sets it
(with one warning when graphs compiled earlier share it), like ``set_bits`` does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .nested import NestedWeight, quantize

__all__ = ["CompiledQuant", "compiled_quant", "lookup_compiled_quant"]


class CompiledQuant(NamedTuple):
    """The quantized state of one compiled linear: nested weight plus its 0-d int32 bits tensor."""

    weight: NestedWeight
    bits: torch.Tensor


class _Entry:
    __slots__ = ("quant", "requested")

    def __init__(self, quant: CompiledQuant, requested: int | None):
        self.quant, self.requested = quant, requested


# Parameter -> {group_size: _Entry}. Weak keys: dropping the model frees the quantized copy.
_REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()


def compiled_quant(weight: torch.nn.Parameter, group_size: int, bits: int, *,
                   static: bool = True) -> tuple[CompiledQuant, bool]:
    """The shared quantized copy of ``weight`` and whether this call changed its bit-width.

    Created on first use at ``bits``. Later compiles share it; a compile whose *static* ``bits``
    differ from what the previous static compile asked for sets the shared bits tensor to
    ``bits`` (the options take effect, for every graph of the model, as ``set_bits`` would), while
    a recompile with the same options leaves a width chosen since by ``set_bits`` alone.
    ``static=False`` (the dynamic policy drives the width) never writes it.
    """
    per_group = _REGISTRY.get(weight)
    if per_group is None:
        per_group = {}
        _REGISTRY[weight] = per_group
    entry = per_group.get(group_size)
    if entry is None:
        with torch.no_grad():
            nw = quantize(weight, group_size)
        quant = CompiledQuant(nw, torch.tensor(bits, dtype=torch.int32, device=weight.device))
        per_group[group_size] = _Entry(quant, bits if static else None)
        return quant, False
    changed = False
    if static and entry.requested != bits:
        changed = entry.requested is not None and int(entry.quant.bits) != bits
        entry.quant.bits.fill_(bits)
        entry.requested = bits
    return entry.quant, changed


def lookup_compiled_quant(weight: torch.Tensor) -> list[CompiledQuant]:
    """All quantized copies registered for ``weight`` (empty if it was never compiled quantized)."""
    return [e.quant for e in _REGISTRY.get(weight, {}).values()]
