"""Where the bit-width tensors of a model live, so ``set_bits`` can reach every quantized linear.

Two kinds of quantized linear exist: :class:`~csd_compile.quant.linear.QLinear` modules (eager
``quantize_`` path; the bits tensor is a buffer) and the ``csd.qlinear`` calls the compile pass puts
into a graph in place of an ``nn.Linear`` whose module stays in the user's model. For the latter,
the nested weight and its bits tensor are kept here, keyed weakly by the original weight Parameter,
so every graph compiled from the same model (prefill, decode, recompiles) shares one quantized copy
and one bits tensor, and ``set_bits(model, ...)`` finds them by walking ``model.modules()``.
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


# Parameter -> {group_size: CompiledQuant}. Weak keys: dropping the model frees the quantized copy.
_REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()


def compiled_quant(weight: torch.nn.Parameter, group_size: int, bits: int) -> CompiledQuant:
    """The shared quantized copy of ``weight`` (created on first use with bit-width ``bits``)."""
    per_group = _REGISTRY.get(weight)
    if per_group is None:
        per_group = {}
        _REGISTRY[weight] = per_group
    entry = per_group.get(group_size)
    if entry is None:
        with torch.no_grad():
            nw = quantize(weight, group_size)
        entry = CompiledQuant(nw, torch.tensor(bits, dtype=torch.int32, device=weight.device))
        per_group[group_size] = entry
    return entry


def lookup_compiled_quant(weight: torch.Tensor) -> list[CompiledQuant]:
    """All quantized copies registered for ``weight`` (empty if it was never compiled quantized)."""
    return list(_REGISTRY.get(weight, {}).values())
