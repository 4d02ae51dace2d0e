"""FlexQuant: nested weight format, quantized linears, bit-width control and evaluation helpers."""

from .linear import QLinear, quantize_, quantized_linears, set_bits
from .nested import NestedWeight, dequantize, fake_quantize, quantize, rtn_fake_quantize

__all__ = [
    "NestedWeight",
    "QLinear",
    "dequantize",
    "fake_quantize",
    "quantize",
    "quantize_",
    "quantized_linears",
    "rtn_fake_quantize",
    "set_bits",
]
