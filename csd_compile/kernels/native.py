"""The C++ CPU kernels (``csrc/*.cpp``), compiled on first use with the C++ compiler Inductor uses.

``load()`` builds them once per source version (about 10 s; PyTorch's extension cache under
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions`` keeps the result) and registers their ops
under ``torch.ops.csd``. Without a working compiler it warns once and returns ``False``; callers
then use the pure-PyTorch CPU paths, which compute the same values more slowly. Set
``CSD_COMPILE_NO_NATIVE=1`` to skip the C++ kernels on purpose.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path


__all__ = ["load", "available"]

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("csrc") / "qlinear_cpu.cpp"]
_lock = threading.Lock()
_state: dict[str, bool] = {}


class NativeBuildWarning(UserWarning):
    """The C++ CPU kernels could not be built; the slower PyTorch paths are used instead."""


def _build() -> bool:
    if os.environ.get("CSD_COMPILE_NO_NATIVE", "") not in ("", "0"):
        return False
    from torch.utils.cpp_extension import load as load_extension

    flags = ["-O3", "-fopenmp"]
    if os.environ.get("CSD_COMPILE_NATIVE_PORTABLE", "") in ("", "0"):
        flags.append("-march=native")  # built on the machine it runs on, like Inductor's own kernels
    log.info("csd-compile: building the C++ CPU kernels (once per version, about 10 s)")
    try:
        load_extension(
            name="csd_compile_cpu_kernels",
            sources=[str(s) for s in _SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no headers, ...: fall back, loudly, once
        warnings.warn(
            f"csd-compile could not build its C++ CPU kernels ({type(e).__name__}: {str(e).strip()[:300]}); "
            "using the slower PyTorch paths. Install a C++ compiler (the one torch.compile needs on CPU) "
            "to get the fast ones.",
            NativeBuildWarning,
            stacklevel=3,
        )
        return False
    from .qlinear import register_native_fake

    register_native_fake()
    return True


def load() -> bool:
    """Build (first time) and load the C++ CPU kernels; ``True`` when ``torch.ops.csd`` has them."""
    ok = _state.get("ok")
    if ok is None:
        with _lock:
            ok = _state.get("ok")
            if ok is None:
                ok = _state["ok"] = _build()
    return ok


def available() -> bool:
    """Whether the C++ kernels are loaded (without trying to build them)."""
    return bool(_state.get("ok"))

