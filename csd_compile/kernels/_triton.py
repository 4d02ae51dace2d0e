"""Triton when it is installed, and the package still importable where it is not.

The CUDA kernels are Triton kernels; the CPU paths never launch them. CPU users on a platform
without a triton wheel (or who did not install it) import csd-compile all the same: the kernel
functions then stay plain Python functions that nothing calls, the ops are registered as ordinary
custom ops with the same CPU bodies, and a CUDA call says that triton is missing.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machine without triton
    triton = tl = None

__all__ = ["HAS_TRITON", "jit", "op", "require_triton", "tl", "triton"]

HAS_TRITON = triton is not None


def jit(fn):
    """``triton.jit`` when triton is installed; else ``fn`` unchanged (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


def op(name: str, *, mutates_args):
    """``torch.library.triton_op`` (Inductor sees into the Triton kernels) when triton is installed,
    else ``torch.library.custom_op`` with the same schema."""
    if HAS_TRITON:
        from torch.library import triton_op

        return triton_op(name, mutates_args=mutates_args)
    return torch.library.custom_op(name, mutates_args=mutates_args)


def require_triton(what: str) -> None:
    """Raise a clear error for a CUDA path when triton is missing."""
    if not HAS_TRITON:
        raise RuntimeError(f"{what} runs a Triton kernel on CUDA, but triton is not installed; "
                           "`pip install triton` (CUDA builds of torch bring it)")
