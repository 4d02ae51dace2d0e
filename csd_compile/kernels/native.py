"""The C++ CPU kernels (``csrc/*.cpp``), compiled on first use with the C++ compiler Inductor uses.

``load()`` builds them once per source version (about 10 s; PyTorch's extension cache under
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions`` keeps the result) and registers their ops
under ``torch.ops.csd``. Without a working compiler it warns once and returns ``False``; callers
then use the pure-PyTorch CPU paths, which compute the same values more slowly. :func:`disable`
(before the first quantized op) skips the C++ kernels on purpose.

The build is for baseline x86-64 (``-O3 -fopenmp``, no ``-march=native``): the kernel's inner loops
exist for AVX-512, AVX2+FMA and plain C++, each compiled with its own target attribute, and the
kernel picks the best one the CPU has at run time, so one build (and one cache entry) serves any
x86-64 machine; other CPUs build the plain C++ path only. :func:`isa` names the active path; :func:`set_isa` / :func:`use_isa` force one
(tests and benchmarks run every path the CPU can run); :func:`supported_isas` lists them.

Activations: the kernel multiplies exact float activations by default. :func:`set_activations`
("int8") / :func:`use_activations` switch decode and verify passes (up to 16 rows) to activations
quantized to int8 per 32 features and integer byte-dot products (AVX-512 VNNI ``vpdpbusd``, AVX2
``vpmaddubsw``), as llama.cpp does: meant for CPUs where decoding codes, not memory, bounds the
kernel (on the development machine the AVX2 path gains up to 1.2x on the larger shapes and the
decode step nothing), at a likelihood cost (mean NLL +0.45% on shipped text for SmolLM2 at its
GGUF grid); see the README's kernel section for the measurements.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path


__all__ = ["load", "available", "disable", "isa", "set_isa", "use_isa", "supported_isas", "ISAS", "ACTIVATIONS",
           "activations", "set_activations", "use_activations", "ATTENTION_LOOPS", "attention_loops",
           "set_attention_loops", "use_attention_loops"]

# the kernel's paths, slowest first ("auto": the best the CPU has); avx512vnni runs the avx512 float
# loops and, with int8 activations, VNNI byte-dot products; avx512bf16 adds bf16 dot products
# (vdpbf16ps) for bf16 activations and is avx512vnni otherwise
ISAS = ("scalar", "avx2", "avx512", "avx512vnni", "avx512bf16")
# how the blocked (decode / verify) path takes activations
ACTIVATIONS = ("float", "int8")
# the decode-attention kernel's loops for head sizes 64 and 128 (other sizes always run "general")
ATTENTION_LOOPS = ("registers", "general")

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("qlinear_cpu.cpp", "attention_cpu.cpp", "cpu_graph.cpp")]
_lock = threading.Lock()
_state: dict[str, bool] = {}


class NativeBuildWarning(UserWarning):
    """The C++ CPU kernels could not be built; the slower PyTorch paths are used instead."""


def disable() -> None:
    """Use the pure-PyTorch CPU paths in this process even where the C++ kernels could be built.
    Call it before the first quantized op runs (once they are loaded, ops already use them)."""
    with _lock:
        if _state.get("ok"):
            raise RuntimeError("csd-compile: the C++ CPU kernels are already loaded in this process; "
                               "call native.disable() before the first quantized op")
        _state["ok"] = False


def _build() -> bool:
    from torch.utils.cpp_extension import load as load_extension

    # no -march=native: the SIMD paths carry their own target attributes and are chosen at run time
    flags = ["-O3", "-fopenmp"]
    log.info("csd-compile: building the C++ CPU kernels (once per version, about 10 s)")
    try:
        module = load_extension(
            name="csd_compile_cpu_kernels",
            sources=[str(s) for s in _SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=True,
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
    from . import attention, qlinear

    _state["direct_qlinear"] = module.qlinear
    _state["direct_qlinear_multi"] = module.qlinear_multi
    _state["direct_attention"] = module.decode_attention
    _state["CpuGraph"] = module.CpuGraph  # csd_compile/cpu_graph.py's replays
    _state["cpu_graph_max_words"] = module.cpu_graph_max_words
    qlinear.register_native_fake()
    attention.register_native_fake()
    _register_direct_codegen()
    return True


# the C++ ops Inductor's Python wrapper calls as plain functions: op -> (attribute here, name in the wrapper)
_DIRECT = {
    "torch.ops.csd.qlinear_cpu_native.default": ("direct_qlinear", "csd_qlinear_direct"),
    "torch.ops.csd.qlinear_cpu_multi_native.default": ("direct_qlinear_multi", "csd_qlinear_multi_direct"),
    "torch.ops.csd.decode_attention_cpu_native.default": ("direct_attention", "csd_attention_direct"),
}


def __getattr__(name: str):
    # ``direct_qlinear`` / ``direct_attention``: the C++ ops as plain Python functions (no
    # dispatcher), loading the kernels first (a compiled graph read back from Inductor's cache
    # imports them)
    if name in {attribute for attribute, _ in _DIRECT.values()} or name in ("CpuGraph", "cpu_graph_max_words"):
        if not load():
            raise AttributeError(f"csd-compile: the C++ CPU kernels are not available ({name})")
        return _state[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_direct_codegen() -> None:
    """Have Inductor's Python wrapper call :data:`direct_qlinear` where it would call
    ``torch.ops.csd.qlinear_cpu_native.default`` (and :data:`direct_attention` for
    ``csd::decode_attention_cpu_native``): same kernel, same checks, without the dispatcher's boxed
    call from Python (about 2-3 us of a 10-30 us product at decode sizes; two hundred calls per
    SmolLM2 token). The C++ wrapper keeps calling the ops through the dispatcher. Skipped (the op
    calls stay) where this PyTorch has no such hook."""
    try:  # a light module; the codegen's own imports wait for a compile (they cost ~1.3 s)
        from torch._inductor.codegen.custom_extern_kernel_codegen import CUSTOM_EXTERN_KERNEL_CODEGEN, CustomCodegen
    except ImportError:
        log.info("csd-compile: this PyTorch has no custom extern-kernel codegen; the C++ kernels are called as ops")
        return

    def codegen_for(attribute: str, alias: str):
        def codegen(node, writeline) -> None:
            from torch._inductor import config as inductor_config
            from torch._inductor.codegen.wrapper import ExternKernelAllocLine
            from torch._inductor.virtualized import V

            wrapper = V.graph.wrapper_code
            if node.codegen_kwargs() or inductor_config.generate_intermediate_hooks:
                writeline(ExternKernelAllocLine(wrapper, node))
                return
            # the module's imports are the root graph's (a nested region's wrapper writes none of its own)
            root = wrapper.get_root_graph() if hasattr(wrapper, "get_root_graph") else wrapper
            root.add_import_once(f"from csd_compile.kernels.native import {attribute} as {alias}")
            writeline(f"{node.get_name()} = {alias}({', '.join(node.codegen_args())})")

        return codegen

    for key, (attribute, alias) in _DIRECT.items():
        CUSTOM_EXTERN_KERNEL_CODEGEN[key] = CustomCodegen(python=codegen_for(attribute, alias))


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


def isa() -> str | None:
    """The instruction-set path the C++ kernel uses now (one of :data:`ISAS`); ``None``
    when the C++ kernels are not loaded (the PyTorch paths are used)."""
    return str(_ops().qlinear_cpu_isa()) if available() else None


def supported_isas() -> list[str]:
    """The paths this CPU can run, slowest first (empty when the C++ kernels are not loaded)."""
    return list(_ops().qlinear_cpu_supported_isas()) if available() else []


def set_isa(name: str) -> str:
    """Force the kernel's path (one of :data:`ISAS`) or go back to the best ("auto").
    Process-wide. Returns the previous setting (a path name, or "auto"). A path the CPU cannot run
    raises ``RuntimeError``; an unknown name ``ValueError``."""
    if not load():
        raise RuntimeError("csd-compile: the C++ CPU kernels are not available; no instruction set to choose")
    return str(_ops().qlinear_cpu_set_isa(name))


@contextlib.contextmanager
def _restoring(setter, value) -> Iterator[None]:
    """Run the block with ``setter(value)`` in force, then put back what ``setter`` returned."""
    before = setter(value)
    try:
        yield
    finally:
        setter(before)


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[str]:
    """``with use_isa("avx2"):`` runs the block on that path, then restores the one active before."""
    with _restoring(set_isa, name):
        yield isa()


def activations() -> str | None:
    """How the C++ kernel takes activations now ("float" or "int8"); ``None`` when the C++ kernels
    are not loaded."""
    return str(_ops().qlinear_cpu_activations()) if available() else None


def set_activations(mode: str) -> str:
    """``"int8"``: quantize every activation row to int8 per 32 features (scale max|x| / 127) and
    multiply with integer byte-dot products in decode and verify passes (up to 16 rows; longer passes
    dequantize the weight and run a float GEMM either way); ``"float"`` (the default): exact float
    activations. Process-wide, read at every call (no recompile). Returns the previous mode."""
    if mode not in ACTIVATIONS:
        raise ValueError(f"csd-compile: activations={mode!r} is not one of {list(ACTIVATIONS)}")
    if not load():
        raise RuntimeError("csd-compile: the C++ CPU kernels are not available; no activation mode to choose")
    return str(_ops().qlinear_cpu_set_activations(mode))


@contextlib.contextmanager
def use_activations(mode: str) -> Iterator[str]:
    """``with use_activations("int8"):`` runs the block in that mode, then restores the previous one."""
    with _restoring(set_activations, mode):
        yield mode


def attention_loops() -> str | None:
    """Which loops the C++ decode-attention kernel runs for head sizes 64 and 128 ("registers" or
    "general"); ``None`` when the C++ kernels are not loaded."""
    return str(_ops().decode_attention_cpu_loops()) if available() else None


def set_attention_loops(mode: str) -> str:
    """``"registers"`` (the default): for head sizes 64 and 128, a block of query rows' vectors and
    sums stay in registers while each open cache row is read once; ``"general"``: the loops every
    other head size runs (each cache row converted through memory, the sums added in memory). Same
    values either way up to float rounding; for A/B measurements (``benchmarks.fixed_cost_ab``) and
    tests. Process-wide, read at every call. Returns the previous mode."""
    if mode not in ATTENTION_LOOPS:
        raise ValueError(f"csd-compile: attention loops {mode!r} is not one of {list(ATTENTION_LOOPS)}")
    if not load():
        raise RuntimeError("csd-compile: the C++ CPU kernels are not available; no attention loops to choose")
    return str(_ops().decode_attention_cpu_set_loops(mode))


@contextlib.contextmanager
def use_attention_loops(mode: str) -> Iterator[str]:
    """``with use_attention_loops("general"):`` runs the block with those loops, then restores."""
    with _restoring(set_attention_loops, mode):
        yield mode


def _ops():
    import torch

    return torch.ops.csd
