"""Regional compilation: the repeated decoder layer traced and compiled once, called per layer.

``mark_decoder_regions(model)`` gives every layer of the model's decoder stack (the largest
``nn.ModuleList`` of modules of one class, e.g. HF's ``model.layers``) a ``forward`` that is one shared
``torch.compiler.nested_compile_region``. A compiled step then holds one region, invoked once per
layer: Dynamo traces it and Inductor compiles it once, so compile time no longer grows with the layer
count. The csd passes rewrite the region once (quantized linears on inputs that each call fills with
its own layer's buffers; the decode-attention rewrite inside). The class is left alone: only these
instances change, and :func:`unmark_decoder_regions` restores them.
"""

from __future__ import annotations

import types

import torch
from torch import nn

__all__ = ["decoder_layers", "mark_decoder_regions", "unmark_decoder_regions"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's repeated block: its largest ``nn.ModuleList`` whose modules are all of one class."""
    lists = [m for m in model.modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of repeated layers to compile as a region")
    return max(lists, key=len)


def mark_decoder_regions(model: nn.Module) -> nn.Module:
    """Make each decoder layer's ``forward`` one shared nested compile region (in place; returns ``model``)."""
    layers = decoder_layers(model)
    region = torch.compiler.nested_compile_region(type(layers[0]).forward)
    for layer in layers:
        layer.forward = types.MethodType(region, layer)
    return model


def unmark_decoder_regions(model: nn.Module) -> nn.Module:
    """Undo :func:`mark_decoder_regions` (in place; returns ``model``)."""
    for layer in decoder_layers(model):
        layer.__dict__.pop("forward", None)
    return model
