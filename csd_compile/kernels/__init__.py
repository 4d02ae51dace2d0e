"""Custom ops of csd-compile: one op per file (Triton kernel, CPU kernel, reference)."""

from . import qlinear  # noqa: F401  (registers torch.ops.csd.qlinear)
from . import attention  # noqa: F401  (registers torch.ops.csd.decode_attention)
