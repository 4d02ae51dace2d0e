"""The C++ kernel's instruction-set paths (scalar, AVX2+FMA, AVX-512, AVX-512 VNNI, AVX-512 BF16), each forced in turn,
with float activations and with int8 ones (``native.use_activations("int8")``).

The kernel picks the best path at run time; ``native.use_isa`` forces one so that this machine tests
every path it can run (an AVX-512 machine runs the AVX2 path that AMD Zen 3 machines use). A path
the CPU cannot run is checked to be refused, never skipped. What the CPU can run is read here from
/proc/cpuinfo, independently of the kernel's own detection.
"""

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from csd_compile.kernels import native
from csd_compile.kernels.qlinear import qlinear_ref, qlinear_ref_int8
from csd_compile.quant.nested import column_major, dequantize, nested_codes, pack_scale_zero, unpack_scale_zero

ISAS = ("scalar", "avx2", "avx512", "avx512vnni", "avx512bf16")
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "fma"}
_NEEDS = {"scalar": set(), "avx2": {"avx2", "fma"}, "avx512": _AVX512, "avx512vnni": _AVX512 | {"avx512_vnni"},
          "avx512bf16": _AVX512 | {"avx512_vnni", "avx512vbmi", "avx512_bf16"}}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo: cannot tell independently which paths this CPU runs")
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    if m is None:
        pytest.skip("/proc/cpuinfo lists no x86 flags (not an x86 CPU)")
    return set(m.group(1).split())


def _runnable() -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return ["scalar"]  # the SIMD paths are x86 code; other CPUs build the scalar one only
    flags = _cpu_flags()
    return [isa for isa in ISAS if _NEEDS[isa] <= flags]


@pytest.fixture(scope="module", autouse=True)
def _built():
    assert native.load(), "the C++ CPU kernels should build on this machine"
    yield
    native.set_isa("auto")
    native.set_activations("float")


def _rel_err(y, r):
    return ((y.float() - r.float()).norm() / r.float().norm()).item()


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 6e-3


# How scale and zero lie in memory: the kernel reads a group's rows with vector loads where adjacent
# rows are adjacent (stride(0) == 1: column-major as nested.py stores them, or rows sliced out of a
# larger column-major tensor) and gathers them otherwise (row-major; or the two tensors' strides differ).
# "packed": both in one [ceil(N/64), G, 2, 64] tensor (nested.pack_scale_zero), passed twice;
# "packed fp16": the same in float16, for a grid whose 4-bit step and zero are float16 numbers (a GGUF
# Q4_0 / Q4_1 file's d and m), which pack_scale_zero then holds in float16; "packed symmetric fp16": a
# symmetric grid (zero = -128 scale, a GGUF Q8_0 file's), whose fp16 steps are packed alone.
LAYOUTS = ("row-major", "column-major", "column-major slice", "mixed", "packed", "packed fp16",
           "packed symmetric fp16")


def _lay_out(t, layout, gen):
    if layout == "row-major":
        return t.contiguous()
    if layout == "column-major slice":  # rows [r, r + N) of a taller column-major tensor
        r = int(torch.randint(0, 5, (), generator=gen))
        big = torch.randn(r + t.shape[0] + 3, t.shape[1], generator=gen).T.contiguous().T
        big[r : r + t.shape[0]] = t
        return big[r : r + t.shape[0]]
    return column_major(t)


def _random_nested(n, k, group, gen, layout="row-major"):
    """Random planes (every byte value, so every 8-bit code), positive scales, signed zeros."""
    qdata = torch.randint(0, 256, (2, n, k // 2), generator=gen, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=gen) * 0.01 + 1e-3
    zero = torch.randn(n, k // group, generator=gen) * 0.3
    if layout == "packed symmetric fp16":
        scale = scale.half().float()
        packed = pack_scale_zero(scale, -128 * scale)
        assert packed.dtype == torch.float16 and packed.shape[2] == 1
        return qdata, packed, packed
    if layout == "packed fp16":
        step4, zero4 = (16 * scale).half().float(), zero.half().float()
        scale = step4 / 16
        packed = pack_scale_zero(scale, zero4 - 7.5 * scale)
        assert packed.dtype == torch.float16
        return qdata, packed, packed
    if layout == "packed":
        packed = pack_scale_zero(scale, zero)
        return qdata, packed, packed
    scale = _lay_out(scale, layout, gen)
    zero = _lay_out(zero, "row-major" if layout == "mixed" else layout, gen)
    return qdata, scale, zero


def _scales(nw):
    """The weight's (scale, zero) as [N, G] tensors, unpacked if they are packed."""
    qdata, scale, zero = nw
    return unpack_scale_zero(scale, qdata.shape[1]) if scale.dim() == 4 else (scale, zero)


def test_supported_paths_match_the_cpu_and_auto_is_the_best():
    assert native.supported_isas() == _runnable()
    assert native.set_isa("auto") == native.set_isa("auto") == "auto"
    assert native.isa() == _runnable()[-1] == str(torch.ops.csd.qlinear_cpu_isa())


@pytest.mark.parametrize("isa", ISAS)
def test_forcing_a_path(isa):
    before = native.isa()
    if isa not in _runnable():
        with pytest.raises(RuntimeError, match=f"cannot run the '{isa}' path"):
            native.set_isa(isa)
        assert native.isa() == before
        return
    with native.use_isa(isa) as active:
        assert active == native.isa() == isa
        with native.use_isa("scalar"):
            assert native.isa() == "scalar"
        assert native.isa() == isa
    assert native.isa() == before


def test_unknown_path_name():
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        native.set_isa("sse9")


# weight shapes and call settings both hypothesis tests draw from
_WEIGHT = dict(
    n=st.one_of(st.sampled_from([64, 128, 192, 576]), st.integers(1, 288).map(lambda v: 2 * v)),
    group=st.sampled_from([32, 64, 128]),
    k_groups=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    bits=st.sampled_from([2, 3, 4, 8]),
    threads=st.sampled_from([1, 2, 4]),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**31 - 1),
)


def _forced(x, nw, b, *, isa, threads, activations="float"):
    """The C++ op on one path, activation mode and thread count (the K split depends on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with native.use_isa(isa), native.use_activations(activations):
            return torch.ops.csd.qlinear_cpu_native(x, *nw, b)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=60, deadline=None)
@given(
    # 17-24 rows: blocked on the SIMD float paths, 25-64 on the bf16 dot products, past those (and
    # past 16 on the scalar path) the dequantize + GEMM path
    m=st.one_of(st.integers(1, 16), st.sampled_from([17, 24, 25, 33, 64, 65])),
    lead=st.booleans(),
    **_WEIGHT,
)
def test_every_path_matches_reference(isa, n, group, k_groups, m, lead, dtype, bits, threads, layout, seed):
    if isa not in _runnable():
        with pytest.raises(RuntimeError, match="cannot run"):
            native.set_isa(isa)
        return
    k = min(group * k_groups, 1536 // group * group)
    gen = torch.Generator().manual_seed(seed)
    nw = _random_nested(n, k, group, gen, layout)
    x = (torch.randn(*((2,) if lead else ()), m, k, generator=gen) + 0.1).to(dtype)
    b = torch.tensor(bits, dtype=torch.int32)
    y = _forced(x, nw, b, isa=isa, threads=threads)
    r = qlinear_ref(x, *nw, b)
    assert y.shape == r.shape == (*x.shape[:-1], n) and y.dtype == dtype
    assert _rel_err(y, r) < _tol(dtype), (isa, n, k, group, m, dtype, bits, layout)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["row-major", "column-major", "packed", "packed fp16", "packed symmetric fp16"])
@pytest.mark.parametrize("n,k", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
def test_embedded_model_shapes(isa, n, k, layout):
    """The model's linear shapes at decode (M = 1) and verify (M = 5, 16) rows, 4 and 8 bits."""
    if isa not in _runnable():
        with pytest.raises(RuntimeError, match="cannot run"):
            native.set_isa(isa)
        return
    gen = torch.Generator().manual_seed(n + k)
    nw = _random_nested(n, k, 32, gen, layout)
    with native.use_isa(isa):
        for m in (1, 5, 16):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k, generator=gen).to(dtype)
                for bits in (4, 8):
                    b = torch.tensor(bits)
                    y = torch.ops.csd.qlinear_cpu_native(x, *nw, b)
                    assert _rel_err(y, qlinear_ref(x, *nw, b)) < _tol(dtype), (m, dtype, bits)


_BF16_WEIGHT = {key: v for key, v in _WEIGHT.items() if key != "dtype"}


@settings(max_examples=80, deadline=None)
@given(m=st.one_of(st.integers(1, 16), st.sampled_from([17, 24])), scale_x=st.sampled_from([1e-3, 1.0, 30.0]),
       **_BF16_WEIGHT)
def test_bf16_dot_path_is_the_float_path_up_to_rounding(n, group, k_groups, m, scale_x, bits, threads, layout, seed):
    """avx512bf16 multiplies bf16 activations by the codes as bf16 pairs (vdpbf16ps), the codes
    offset by a constant A (in units of the code, A / U: 128 / 2^(4-b), 2176 at 8 bits) that the zero
    point takes out again. Its fp32 sums are the float path's (avx512vnni) up to the rounding of
    sums whose lanes reach (A / U + 2^b) times |x|: per group about sqrt(group) * 2^-24 of that,
    times the scale (the worst of 1500 random draws reached 5% of this bound; one wrong code would
    exceed it many times over). So the bf16 outputs differ by at most their two roundings (2^-8 of
    each) and that bound (up to 24 rows, where both are blocked; more rows are checked against the
    reference above). Float32 and float16 activations take the float path, bit for bit."""
    if "avx512bf16" not in _runnable():
        with pytest.raises(RuntimeError, match="cannot run"):
            native.set_isa("avx512bf16")
        return
    k = min(group * k_groups, 1536 // group * group)
    gen = torch.Generator().manual_seed(seed)
    nw = _random_nested(n, k, group, gen, layout)
    x = ((torch.randn(m, k, generator=gen) + 0.1) * scale_x).to(torch.bfloat16)
    b = torch.tensor(bits, dtype=torch.int32)
    dot = _forced(x, nw, b, isa="avx512bf16", threads=threads).double()
    flt = _forced(x, nw, b, isa="avx512vnni", threads=threads).double()
    offset = 2176.0 if bits == 8 else 128.0 / 2 ** (4 - bits)
    group_abs = x.double().abs().reshape(m, k // group, group).sum(-1)  # [m, G]
    summing = 2.0**-24 * group**0.5 * (offset + 2**bits) * 2.0 ** (8 - bits) * (group_abs @ _scales(nw)[0].double().T)
    assert summing.min() > 0
    assert ((dot - flt).abs() <= 2**-8 * (dot.abs() + flt.abs()) * 1.001 + summing).all()
    for dtype in (torch.float32, torch.float16):
        xd = x.to(dtype)
        assert torch.equal(_forced(xd, nw, b, isa="avx512bf16", threads=threads),
                           _forced(xd, nw, b, isa="avx512vnni", threads=threads))


def test_bf16_dot_path_keeps_nan_and_infinity_rows():
    """A NaN or an infinity in a row of x makes that row NaN or infinite, the other rows finite."""
    if "avx512bf16" not in _runnable():
        return  # refusal is checked above
    gen = torch.Generator().manual_seed(11)
    nw = _random_nested(130, 256, 32, gen, "column-major")
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    x[0, 17] = float("nan")
    x[2, 100] = float("inf")
    with native.use_isa("avx512bf16"):
        y = torch.ops.csd.qlinear_cpu_native(x, *nw, torch.tensor(4))
    assert y[0].isnan().all() and y[1].isfinite().all() and not y[2].isfinite().any()


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 16), scale_x=st.sampled_from([1e-3, 1.0, 30.0]), **_WEIGHT)
# two outputs that nearly cancel: a relative-error bound failed here, the rounding bound holds
@example(n=2, group=128, k_groups=7, m=1, dtype=torch.float32, bits=2, threads=1, scale_x=1e-3, layout="row-major",
         seed=1)
def test_int8_activations_match_their_reference(isa, n, group, k_groups, m, dtype, bits, threads, scale_x, layout,
                                                seed):
    """Every path with int8 activations against ``qlinear_ref_int8``: the integer sums are exact, so
    only float rounding separates them. Some 32-feature blocks are all zero (scale 0)."""
    if isa not in _runnable():
        return  # refusal is checked by the float test above
    k = min(group * k_groups, 1536 // group * group)
    gen = torch.Generator().manual_seed(seed)
    nw = _random_nested(n, k, group, gen, layout)
    x = torch.randn(m, k, generator=gen) * scale_x
    x[:, : 32 * int(torch.randint(0, k // 32, (), generator=gen))] *= torch.rand(m, 1, generator=gen) < 0.3
    x = x.to(dtype)
    b = torch.tensor(bits, dtype=torch.int32)
    y = _forced(x, nw, b, isa=isa, threads=threads, activations="int8")
    r = qlinear_ref_int8(x, *nw, b)
    assert y.shape == r.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, r) < _tol(dtype), (isa, n, k, group, m, dtype, bits)
    # and what it approximates: the float product, within the activations' rounding, which moves
    # each x[k] by at most half a step d = max|x| / 127 of its block, times the centred code's weight
    qdata, (scale, zero) = nw[0], _scales(nw)
    xf = x.float()
    half_step = (xf.reshape(m, k // 32, 32).abs().amax(-1) / 254).repeat_interleave(32, dim=1)
    weight = (scale * 2.0 ** (8 - bits)).repeat_interleave(group, dim=1) * (nested_codes(qdata, bits) - 2 ** (bits - 1))
    bound = half_step @ weight.abs().T
    r = qlinear_ref(x, *nw, b).float()
    rounding = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    slack = rounding * (r.abs() + y.float().abs()) + 1e-5 * (xf.abs() @ dequantize(qdata, scale, zero, bits).abs().T)
    assert ((y.float() - r).abs() <= bound * 1.001 + slack).all()


@pytest.mark.parametrize("isa", ISAS)
def test_int8_activations_rows_do_not_depend_on_the_pass(isa):
    """Each row is quantized on its own, so row i of a verify pass is bit for bit the decode pass of
    row i (what lossless speculation relies on); more than 16 rows take the float GEMM path."""
    if isa not in _runnable():
        return
    gen = torch.Generator().manual_seed(7)
    nw = _random_nested(1536 + 66, 576, 32, gen)  # full row blocks and a tail
    x = torch.randn(16, 576, generator=gen).to(torch.bfloat16)
    b = torch.tensor(4)
    with native.use_isa(isa), native.use_activations("int8"):
        rows = torch.ops.csd.qlinear_cpu_native(x, *nw, b)
        for i in (0, 5, 15):
            assert torch.equal(torch.ops.csd.qlinear_cpu_native(x[i : i + 1], *nw, b)[0], rows[i]), i
        assert torch.equal(torch.ops.csd.qlinear_cpu_native(x[3:8], *nw, b), rows[3:8])
        x17 = torch.randn(17, 576, generator=gen)
        long = torch.ops.csd.qlinear_cpu_native(x17, *nw, b)
    assert _rel_err(long, qlinear_ref(x17, *nw, b)) < 1e-5


def test_activation_mode_is_set_and_restored():
    assert native.activations() == "float"
    with native.use_activations("int8") as mode:
        assert mode == native.activations() == "int8" == str(torch.ops.csd.qlinear_cpu_activations())
        assert native.set_activations("int8") == "int8"
    assert native.activations() == "float"
    with pytest.raises(ValueError, match=r"activations='int4' is not one of \['float', 'int8'\]"):
        native.set_activations("int4")
    with pytest.raises(ValueError, match="unknown mode 'fp8'; choose 'int8' or 'float'"):
        torch.ops.csd.qlinear_cpu_set_activations("fp8")
    assert native.activations() == "float"


def _disassembly() -> str:
    maps = Path("/proc/self/maps").read_text()
    libs = {line.split()[-1] for line in maps.splitlines() if "csd_compile_cpu_kernels" in line}
    assert len(libs) == 1, libs
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump is not installed: cannot inspect the built instructions")
    return subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", libs.pop()], capture_output=True,
                          text=True, check=True).stdout


def test_only_the_selected_functions_use_wide_registers():
    """One build must run on any x86-64 CPU: AVX-512 registers only in the AVX-512 path's functions,
    256-bit ones only there and in the AVX2 path's (an AVX2-only CPU would die on the rest)."""
    funcs = re.split(r"\n(?=[0-9a-f]+ <)", _disassembly())
    seen = {"avx512": 0, "avx2": 0}
    for f in funcs:
        head = f.split("\n", 1)[0]
        wide512 = re.search(r"%zmm|%k[1-7]\b", f) is not None
        wide256 = "%ymm" in f
        # VNNI instructions (AVX-512 VNNI) only where the CPU was checked for them, and likewise the
        # BF16 dot products and VBMI byte permutes
        assert "vpdpbusd" not in f or "Vnni" in head, head
        assert ("vdpbf16ps" not in f and "vpermb" not in f) or "Bf16" in head, head
        if "Avx512" in head or "decode16" in head:
            seen["avx512"] += wide512
        elif "Avx2" in head or "decode8" in head:
            seen["avx2"] += wide256
            assert not wide512, head
        else:  # everything else, ATen's inline code included, is built for baseline x86-64
            assert not wide512 and not wide256, head
    assert seen["avx512"] and seen["avx2"], seen


_NO_X86 = r"""
import sys, torch
from torch.utils.cpp_extension import load
from csd_compile.kernels.qlinear import qlinear_ref, qlinear_ref_int8
from csd_compile.quant.nested import quantize
srcs, build = sys.argv[1].split(","), sys.argv[2]
load(name="csd_scalar_only", sources=srcs, extra_cflags=["-O3", "-fopenmp", "-DCSD_NO_X86"],
     extra_ldflags=["-fopenmp"], is_python_module=False, build_directory=build)
assert list(torch.ops.csd.qlinear_cpu_supported_isas()) == ["scalar"]
assert torch.ops.csd.qlinear_cpu_isa() == "scalar"
try:
    torch.ops.csd.qlinear_cpu_set_isa("avx2")
    raise SystemExit("avx2 accepted")
except RuntimeError as e:
    assert "cannot run the 'avx2' path" in str(e)
g = torch.Generator().manual_seed(0)
nw = quantize(torch.randn(130, 256, generator=g) * 0.1, 64)
for m in (1, 5, 20):
    x = torch.randn(m, 256, generator=g)
    for bits in (2, 3, 4, 8):
        b = torch.tensor(bits)
        r = qlinear_ref(x, *nw, b)
        y = torch.ops.csd.qlinear_cpu_native(x, *nw, b)
        assert ((y - r).norm() / r.norm()).item() < 1e-5, (m, bits)
torch.ops.csd.qlinear_cpu_set_activations("int8")
for m in (1, 5):
    x = torch.randn(m, 256, generator=g)
    for bits in (2, 3, 4, 8):
        b = torch.tensor(bits)
        r = qlinear_ref_int8(x, *nw, b)
        y = torch.ops.csd.qlinear_cpu_native(x, *nw, b)
        assert ((y - r).norm() / r.norm()).item() < 1e-5, ("int8", m, bits)
from csd_compile.kernels.attention import attention_ref
for dtype in (torch.float32, torch.bfloat16):
    q = torch.randn(1, 6, 3, 40, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, 70, 40, generator=g).to(dtype) for _ in range(2))
    mask = torch.arange(70).view(1, 1, 1, 70) < torch.tensor([30, 50, 70]).view(1, 1, 3, 1)
    y = torch.ops.csd.decode_attention_cpu_native(q, k, v, mask, 0.2).float()
    r = attention_ref(q.float(), k.float(), v.float(), mask, 0.2)
    assert (y - r).abs().max().item() < (1e-5 if dtype == torch.float32 else 1e-2), dtype
print("ok")
"""


def test_scalar_only_build_for_other_cpus(tmp_path):
    """On non-x86 CPUs (ARM, ...) the sources build their scalar paths only; ``-DCSD_NO_X86`` makes this
    machine build that variant, which must offer, and compute with, the scalar paths alone (the
    quantized kernel and the attention kernel)."""
    srcs = ",".join(str(p) for p in native._SOURCES)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    proc = subprocess.run([sys.executable, "-c", _NO_X86, srcs, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=25, deadline=None)
@given(m=st.one_of(st.integers(1, 16), st.just(17)), activations=st.sampled_from(["float", "int8"]), **_WEIGHT)
def test_scale_layout_changes_no_bit(isa, n, group, k_groups, m, dtype, bits, threads, layout, activations, seed):
    """Vector loads (adjacent rows adjacent in memory) and gathers read the same numbers: every path
    gives bit-identical outputs for one weight whatever the strides of its scale and zero."""
    if isa not in _runnable():
        return  # refusal is checked by the float test above
    k = min(group * k_groups, 1536 // group * group)
    qdata, scale, zero = _random_nested(n, k, group, torch.Generator().manual_seed(seed), layout)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    b = torch.tensor(bits)
    y = _forced(x, (qdata, scale, zero), b, isa=isa, threads=threads, activations=activations)
    if scale.dim() == 4:
        scale, zero = unpack_scale_zero(scale, n)
    y_rows = _forced(x, (qdata, scale.contiguous(), zero.contiguous()), b, isa=isa, threads=threads,
                     activations=activations)
    if layout in ("packed fp16", "packed symmetric fp16"):  # the same weight, its zero point rounded differently
        assert _rel_err(y, y_rows) < _tol(dtype), (isa, n, k, group, m, dtype, bits, activations)
        return
    assert torch.equal(y, y_rows), (isa, n, k, group, m, dtype, bits, layout, activations)
