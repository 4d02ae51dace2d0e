"""FlexQuant: nested weight format, quantized linears, bit-width control and evaluation helpers."""

from .nested import NestedWeight, dequantize, fake_quantize, quantize, rtn_fake_quantize

__all__ = ["NestedWeight", "dequantize", "fake_quantize", "quantize", "rtn_fake_quantize"]
