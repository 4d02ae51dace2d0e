"""Packed scale/zero (``quant.nested.pack_scale_zero``): the layout, in float32 and in float16 (a
GGUF Q4 file's own d and m), what QLinear keeps and passes on CPU, the compile pass, and the errors
for tensors that are not that layout.

The kernel's arithmetic on packed scales is checked on every instruction-set path by the hypothesis
tests of ``test_qlinear_simd.py`` ("packed" is one of their layouts: against the reference, and bit
for bit against row-major scales)."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.kernels import native
from csd_compile.kernels.qlinear import check_qlinear_args, qlinear_ref, qlinear_triton
from csd_compile.passes.quantize_linear import quantize_linear
from csd_compile.config import CSDConfig
from csd_compile.quant import QLinear
from csd_compile.quant.gguf import grid_from_blocks
from csd_compile.quant.nested import column_major, pack_codes, pack_scale_zero, quantize, unpack_scale_zero
from tests.conftest import make_tiny_llama
from tests.gguf_files import T, random_blocks


@pytest.fixture(scope="module")
def built():
    assert native.load(), "the C++ CPU kernels should build on this machine"


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300).map(lambda v: 2 * v), g=st.integers(1, 20), cols=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_pack_puts_each_value_where_the_layout_says_and_unpacks_back(n, g, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    scale, zero = torch.randn(n, g, generator=gen), torch.randn(n, g, generator=gen)
    if cols:
        scale, zero = column_major(scale), column_major(zero)
    before = (scale.clone(), zero.clone())
    packed = pack_scale_zero(scale, zero)
    blocks = (n + 63) // 64
    assert packed.shape == (blocks, g, 2, 64) and packed.dtype == torch.float32 and packed.is_contiguous()
    # element by element, from the documented formula
    rows = torch.arange(n)
    for col in range(g):
        assert torch.equal(packed[rows // 64, col, 0, rows % 64], scale[:, col])
        assert torch.equal(packed[rows // 64, col, 1, rows % 64], zero[:, col])
    pad = torch.arange(n, blocks * 64)
    assert not packed[pad // 64, :, :, pad % 64].any()  # rows past N hold 0
    assert torch.equal(scale, before[0]) and torch.equal(zero, before[1])  # inputs untouched
    s2, z2 = unpack_scale_zero(packed, n)
    assert torch.equal(s2, scale) and torch.equal(z2, zero) and s2.stride() == z2.stride() == (1, n)  # column-major
    assert s2.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr()  # new tensors


def test_pack_and_unpack_refuse_what_they_cannot_read():
    s = torch.rand(128, 4)
    with pytest.raises(ValueError, match="float32"):
        pack_scale_zero(s.double(), s.double())
    with pytest.raises(ValueError, match=r"shape \(128, 4\).*shape \(128, 3\)"):
        pack_scale_zero(s, torch.rand(128, 3))
    with pytest.raises(ValueError, match="list"):
        pack_scale_zero(s, [0.0])
    packed = pack_scale_zero(s, s)
    with pytest.raises(ValueError, match=r"ceil\(200/64\)"):
        unpack_scale_zero(packed, 200)  # 4 blocks expected, 2 given
    with pytest.raises(ValueError, match="packed"):
        unpack_scale_zero(s, 128)


def _nested(n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize(w, 32)


@pytest.mark.parametrize("n", [130, 192, 576])
def test_the_op_on_packed_scales_is_the_op_on_the_pair_bit_for_bit(built, n):
    nw = _nested(n, 96, seed=n)
    packed = pack_scale_zero(nw.scale, nw.zero)
    for m in (1, 5, 40):  # decode, verify, dequantize + GEMM
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m)).to(dtype)
            b = torch.tensor(4)
            y = torch.ops.csd.qlinear_cpu_native(x, nw.qdata, packed, packed, b)
            assert torch.equal(y, torch.ops.csd.qlinear_cpu_native(x, nw.qdata, nw.scale, nw.zero, b))
            # one call, one weight packed and one not (the K split follows the call's total rows)
            bs = [b, torch.tensor(8)]
            ys = torch.ops.csd.qlinear_cpu_multi_native(x, [nw.qdata, nw.qdata], [packed, nw.scale],
                                                        [packed, nw.zero], bs)
            ys_pairs = torch.ops.csd.qlinear_cpu_multi_native(x, [nw.qdata, nw.qdata], [nw.scale, nw.scale],
                                                              [nw.zero, nw.zero], bs)
            assert all(torch.equal(a, c) for a, c in zip(ys, ys_pairs))


def test_the_op_refuses_packed_scales_it_cannot_read(built):
    nw = _nested(192, 64, seed=1)
    packed = pack_scale_zero(nw.scale, nw.zero)
    x, b = torch.randn(1, 64), torch.tensor(4)
    other = packed.clone()
    with pytest.raises(ValueError, match="packed tensor as zero too"):
        torch.ops.csd.qlinear_cpu_native(x, nw.qdata, packed, other, b)
    with pytest.raises(ValueError, match=r"ceil\(N/64\)=3"):
        torch.ops.csd.qlinear_cpu_native(x, nw.qdata, packed[:2], packed[:2], b)
    with pytest.raises(ValueError, match="contiguous float32"):
        torch.ops.csd.qlinear_cpu_native(x, nw.qdata, packed.double(), packed.double(), b)
    with pytest.raises(ValueError, match=r"ceil\(N/64\)=3"):  # the Python check, before any work
        check_qlinear_args(x, nw.qdata, packed[:2], packed[:2], b)
    with pytest.raises(ValueError, match="CPU kernel's layout"):
        qlinear_triton(x, nw.qdata, packed, packed, b)
    # one member per group is a symmetric grid's fp16 steps: float32 has no such layout, nor three members
    steps = pack_scale_zero(nw.scale, -128 * nw.scale, fp16=True)
    for bad in (steps.float().contiguous(), torch.cat([steps, steps, steps], dim=2)):
        with pytest.raises(ValueError, match=r"float32 or float16 \[ceil\(N/64\)=3, K/group, 2, 64\]"):
            torch.ops.csd.qlinear_cpu_native(x, nw.qdata, bad, bad, b)
        with pytest.raises(ValueError, match=r"float32 or float16 \[ceil\(N/64\)=3, K/group, 2, 64\]"):
            check_qlinear_args(x, nw.qdata, bad, bad, b)
    torch.ops.csd.qlinear_cpu_native(x, nw.qdata, steps, steps, b)  # the layout itself is read


def test_qlinear_keeps_a_packed_copy_and_runs_on_it(built):
    lin = torch.nn.Linear(96, 130, bias=True)
    q = QLinear.from_linear(lin, bits=4, group_size=32)
    assert torch.equal(q.scale_zero, pack_scale_zero(q.scale, q.zero))
    assert q.kernel_scales() == (q.scale_zero, q.scale_zero)
    assert "scale_zero" not in q.state_dict()  # derived, not saved
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.ops.csd.qlinear_cpu_native(x, q.qdata, q.scale, q.zero, q.bits) + lin.bias
        assert torch.equal(q(x), want)
        view = q.view(8)
        assert view.scale_zero is q.scale_zero  # a view shares it too


def test_the_packed_copy_follows_a_loaded_state_dict_and_repack(built):
    a = QLinear.from_linear(torch.nn.Linear(64, 128, bias=False), bits=4, group_size=32)
    b = QLinear.from_linear(torch.nn.Linear(64, 128, bias=False), bits=4, group_size=32)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    a.load_state_dict(torch.load(buf))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert torch.equal(a.scale_zero, pack_scale_zero(b.scale, b.zero))
        a.scale.mul_(2.0)  # by hand: repack() brings the packed copy along
        a.repack()
        assert torch.equal(a(x), torch.ops.csd.qlinear_cpu_native(x, a.qdata, a.scale, a.zero, a.bits))
        torch.testing.assert_close(a(x), qlinear_ref(x, a.qdata, a.scale, a.zero, a.bits), rtol=1e-5, atol=1e-5)


def test_the_packed_copy_exists_on_cpu_only():
    q = QLinear.from_linear(torch.nn.Linear(64, 128), bits=4, group_size=32)
    q.to("meta")
    assert q.scale_zero is None and q.kernel_scales() == (q.scale, q.zero)
    q.to_empty(device="cpu")
    assert q.scale_zero is not None and q.scale_zero.shape == (2, 2, 2, 64)


def test_the_compile_pass_hands_the_cpu_kernel_the_packed_copy(built):
    model = make_tiny_llama(seed=3)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    got = {}

    def backend(gm, example_inputs):
        got["gm"], got["ex"] = gm, list(example_inputs)
        return gm

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(ids, use_cache=False)
        out = quantize_linear(got["gm"], got["ex"], CSDConfig(bits=4, group_size=32))
    calls = [n for n in out.graph.nodes if n.target is torch.ops.csd.qlinear.default]
    assert len(calls) == 14
    for n in calls:
        scale, zero = (getattr(out, a.target) for a in n.args[2:4])
        assert scale is zero and scale.dim() == 4  # the QLinear's packed copy, twice


def test_the_python_paths_refuse_a_zero_that_is_not_the_packed_tensor():
    """The pure-torch reference and the fallback without the C++ kernels unpack the packed tensor;
    a different ``zero`` would be ignored there, so it is refused as the C++ kernel refuses it."""
    nw = _nested(128, 64, seed=2)
    packed = pack_scale_zero(nw.scale, nw.zero)
    x, b = torch.randn(2, 64), torch.tensor(4)
    with pytest.raises(ValueError, match="packed tensor as zero too"):
        qlinear_ref(x, nw.qdata, packed, packed.clone(), b)
    with pytest.raises(ValueError, match="packed tensor as zero too"):
        torch.ops.csd.qlinear_cpu(x, nw.qdata, packed, packed.clone(), b)
    y = torch.ops.csd.qlinear_cpu(x, nw.qdata, packed, packed, b)  # the fallback on the packed tensor
    torch.testing.assert_close(y, qlinear_ref(x, nw.qdata, nw.scale, nw.zero, b), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# fp16 packing: the 4-bit rung's step and zero (16 s, z + 7.5 s), which a GGUF Q4_0 / Q4_1 block
# stores as two fp16 numbers (d, m)


def _q4_file_pair(raw, kind, n, g):
    """The (d, m) of every block, read from the raw bytes: fp16 d at bytes 0-1; Q4_1's m at 2-3,
    Q4_0's -8 d."""
    blocks = raw.reshape(n, g, -1)
    d = torch.from_numpy(np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].copy())
    m = (torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].copy()) if kind == "Q4_1"
         else (-8 * d.float()).half())
    return d, m


@settings(max_examples=40, deadline=None)
@given(n_half=st.integers(1, 100), g=st.integers(1, 12), kind=st.sampled_from(["Q4_0", "Q4_1"]),
       seed=st.integers(0, 2**32 - 1))
def test_auto_packs_a_q4_files_own_d_and_m_in_fp16(n_half, g, kind, seed):
    n, k = 2 * n_half, 32 * g
    raw = random_blocks(np.random.default_rng(seed), T[kind], n, k)
    _, s, z, _ = grid_from_blocks(raw, kind, k)
    scale, zero = torch.from_numpy(s), torch.from_numpy(z)
    before = (scale.clone(), zero.clone())
    packed = pack_scale_zero(scale, zero)
    assert packed.dtype == torch.float16 and packed.shape == ((n + 63) // 64, g, 2, 64)
    d, m = _q4_file_pair(raw, kind, n, g)
    rows = torch.arange(n)
    for col in range(g):
        assert torch.equal(packed[rows // 64, col, 0, rows % 64], d[:, col])  # the file's numbers, bit for bit
        assert torch.equal(packed[rows // 64, col, 1, rows % 64], m[:, col])
    pad = torch.arange(n, (n + 63) // 64 * 64)
    assert not packed[pad // 64, :, :, pad % 64].any()
    assert torch.equal(scale, before[0]) and torch.equal(zero, before[1])
    s2, z2 = unpack_scale_zero(packed, n)
    assert torch.equal(s2, scale)  # d / 16: exact
    ulp = torch.finfo(torch.float32).eps * (zero.abs() + 8 * scale.abs())
    assert ((z2 - zero).abs() <= ulp).all()  # m - 7.5 s, rounded once more or less


@settings(max_examples=30, deadline=None)
@given(n_half=st.integers(1, 100), g=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_auto_packs_a_q8_0_files_own_d_alone(n_half, g, seed):
    """A symmetric grid (a Q8_0 block: z = -128 d) is packed as its fp16 steps alone, [.., 1, 64]:
    the file's d bit for bit, a quarter of the float32 pair's bytes; unpacked, zero = -128 scale."""
    n, k = 2 * n_half, 32 * g
    raw = random_blocks(np.random.default_rng(seed), T.Q8_0, n, k)
    _, s, z, _ = grid_from_blocks(raw, "Q8_0", k)
    scale, zero = torch.from_numpy(s), torch.from_numpy(z)
    packed = pack_scale_zero(scale, zero)
    assert packed.dtype == torch.float16 and packed.shape == ((n + 63) // 64, g, 1, 64)
    d = torch.from_numpy(np.ascontiguousarray(raw.reshape(n, g, -1)[..., 0:2]).view(np.float16)[..., 0].copy())
    rows = torch.arange(n)
    for col in range(g):
        assert torch.equal(packed[rows // 64, col, 0, rows % 64], d[:, col])
    pad = torch.arange(n, (n + 63) // 64 * 64)
    assert not packed[pad // 64, :, :, pad % 64].any()
    s2, z2 = unpack_scale_zero(packed, n)
    assert torch.equal(s2, scale) and torch.equal(z2, zero)


def test_auto_keeps_float32_where_fp16_would_round():
    # quantize's grids: steps and origins from float32 arithmetic on the weight
    nw = _nested(192, 96, seed=4)
    assert torch.equal(pack_scale_zero(nw.scale, nw.zero), pack_scale_zero(nw.scale, nw.zero, fp16=False))
    # a Q8_0 grid with one zero off -128 d: not symmetric, and its 4-bit zero z + 7.5 d is not an fp16
    # number (-120.5 d); one step fp16 cannot hold: not the symmetric layout either
    raw = random_blocks(np.random.default_rng(5), T.Q8_0, 64, 64)
    _, s, z, _ = grid_from_blocks(raw, "Q8_0", 64)
    scale, zero = torch.from_numpy(s), torch.from_numpy(z)
    assert pack_scale_zero(scale, zero).shape[2] == 1
    zero[3, 0] = zero[3, 0] * (1 + 2**-20)
    assert pack_scale_zero(scale, zero).dtype == torch.float32
    scale2 = scale.clone()
    scale2[5, 1] = scale2[5, 1] * (1 + 2**-20)
    assert pack_scale_zero(scale2, -128 * scale2).dtype == torch.float32
    # a Q4_1 grid with one zero moved off it, by far less than an fp16 step
    raw = random_blocks(np.random.default_rng(6), T.Q4_1, 64, 64)
    _, s, z, _ = grid_from_blocks(raw, "Q4_1", 64)
    scale, zero = torch.from_numpy(s), torch.from_numpy(z)
    assert pack_scale_zero(scale, zero).dtype == torch.float16
    zero[17, 1] += 2e-4 * zero[17, 1].abs()
    assert pack_scale_zero(scale, zero).dtype == torch.float32
    # a step fp16 cannot hold (too large) and a non-finite one
    big = torch.full((64, 1), 8192.0)
    assert pack_scale_zero(big, torch.zeros(64, 1)).dtype == torch.float32
    assert pack_scale_zero(torch.full((64, 1), float("nan")), torch.zeros(64, 1)).dtype == torch.float32


def test_fp16_true_rounds_and_false_keeps_float32():
    nw = _nested(130, 64, seed=7)
    half = pack_scale_zero(nw.scale, nw.zero, fp16=True)
    assert half.dtype == torch.float16
    s2, z2 = unpack_scale_zero(half, 130)
    torch.testing.assert_close(s2, nw.scale, rtol=2**-11, atol=0)
    torch.testing.assert_close(z2, nw.zero, rtol=0, atol=float(2**-11 * (nw.zero.abs() + 8 * nw.scale.abs()).max()))
    assert pack_scale_zero(nw.scale, nw.zero, fp16=False).dtype == torch.float32
    with pytest.raises(ValueError, match=r"fp16='yes' is not one of True, False, 'auto'"):
        pack_scale_zero(nw.scale, nw.zero, fp16="yes")
    with pytest.raises(ValueError, match="float32 or float16"):
        unpack_scale_zero(half.double(), 130)
    sym = pack_scale_zero(nw.scale, -128 * nw.scale, fp16=True)  # symmetric exactly: the step alone, rounded
    assert sym.shape[2] == 1 and torch.equal(unpack_scale_zero(sym, 130)[0], nw.scale.half().float())
    with pytest.raises(ValueError, match="symmetric grid"):
        unpack_scale_zero(sym.float(), 130)  # a float32 step alone is not a layout


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_every_path_on_fp16_scales_multiplies_by_the_file_weights(built, kind):
    """Every instruction-set path, one row and several: the op on the fp16-packed scales computes
    x @ W^T with W the file's weights (d q + m, or d q for Q8_0 at 8 bits), within float32 rounding."""
    import gguf

    n, k = 192, 256
    raw = random_blocks(np.random.default_rng(8), T[kind], n, k)
    w = torch.from_numpy(gguf.dequantize(raw, T[kind]).reshape(n, k).copy())
    q8, s, z, bits = grid_from_blocks(raw, kind, k)
    nw = pack_codes(torch.from_numpy(q8), torch.from_numpy(s), torch.from_numpy(z))
    packed = pack_scale_zero(nw.scale, nw.zero)
    assert packed.dtype == torch.float16 and packed.shape[2] == (1 if kind == "Q8_0" else 2)
    b = torch.tensor(bits, dtype=torch.int32)
    for m in (1, 5, 30):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        want = F.linear(x.double(), w.double())
        bound = 256 * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().T).double().clamp_min(1e-3)
        for isa in native.supported_isas():
            with native.use_isa(isa):
                y = torch.ops.csd.qlinear_cpu_native(x, nw.qdata, packed, packed, b).double()
                assert ((y - want).abs() <= bound).all(), (isa, m, float(((y - want).abs() / bound).max()))
                yb = torch.ops.csd.qlinear_cpu_native(x.bfloat16(), nw.qdata, packed, packed, b).double()
                want_b = F.linear(x.bfloat16().double(), w.double())
                # bf16 output rounding; past 24 rows (bf16 GEMM on the dequantized weight) each product's
                sums = x.bfloat16().double().abs() @ w.double().abs().T
                assert ((yb - want_b).abs() <= 2**-8 * (want_b.abs() + sums) + bound).all(), (isa, m)
        # the reference and the fallback without the C++ kernels read the fp16 pair alike
        torch.testing.assert_close(qlinear_ref(x, nw.qdata, packed, packed, b).double(), want, rtol=0,
                                   atol=float(bound.max()))
        torch.testing.assert_close(torch.ops.csd.qlinear_cpu(x, nw.qdata, packed, packed, b).double(), want,
                                   rtol=0, atol=float(bound.max()))


def test_a_q4_gguf_weight_at_group_32_is_the_files_grid_in_fp16(built, tmp_path):
    """QLinear at group 32 on a weight loaded from a Q4_1 tensor takes the file's grid (it decodes
    to the file's weights exactly, where quantize only estimates the grid from the weight rounded to
    bf16) and packs it in fp16; at group 64, or from a Q8_0 tensor, quantize's grid in float32; a
    weight changed since loading is quantized afresh."""
    from csd_compile import load_model
    from csd_compile.quant.gguf import source_of
    from csd_compile.quant.nested import dequantize
    from tests.gguf_files import write_tiny_llama

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, {"attn_q": T.Q4_1, "attn_k": T.Q8_0})
    model, _ = load_model(path, dtype="bf16", cache_dir=tmp_path / "cache")
    attn = model.model.layers[0].self_attn
    q_w, k_w = attn.q_proj.weight, attn.k_proj.weight
    assert source_of(q_w).type == "Q4_1"
    with torch.no_grad():
        q32 = QLinear(q_w, None, bits=4, group_size=32)
        q64 = QLinear(q_w, None, bits=4, group_size=64)
        k32 = QLinear(k_w, None, bits=8, group_size=32)
    src = source_of(q_w)
    raw = src.raw_blocks()
    _, s, z, _ = grid_from_blocks(raw, "Q4_1", q_w.shape[1])
    rows = np.arange(q_w.shape[0]) if src.rows is None else np.asarray(src.rows)  # HF's order of q's rows
    assert src.rows is not None  # (llama's q rows are permuted for the rotary layout: the test covers it)
    assert torch.equal(q32.scale, torch.from_numpy(s[rows])) and torch.equal(q32.zero, torch.from_numpy(z[rows]))
    assert q32.scale_zero.dtype == torch.float16
    file_w = torch.from_numpy(gguf_dequantize(raw, "Q4_1").reshape(q_w.shape)[rows].copy())
    assert torch.equal(dequantize(q32.qdata, q32.scale, q32.zero, 4), file_w)
    assert q64.scale_zero.dtype == torch.float32 and torch.equal(q64.scale, quantize(q_w, 64).scale)
    assert k32.scale_zero.dtype == torch.float32 and torch.equal(k32.scale, quantize(k_w, 32).scale)
    with torch.no_grad():
        q_w.mul_(1.5)  # no longer the file's tensor: quantized from the weight as it is now
        changed = QLinear(q_w, None, bits=4, group_size=32)
    assert changed.scale_zero.dtype == torch.float32
    assert torch.equal(changed.scale, quantize(q_w, 32).scale)


def gguf_dequantize(raw, kind):
    import gguf

    return gguf.dequantize(raw, T[kind])


@pytest.mark.parametrize("m", [1, 5, 40])
def test_one_call_mixes_fp16_fp32_and_symmetric_weights(built, m):
    """A layer's grouped call (q/k/v as one csd::qlinear_cpu_multi_native) may hold weights packed
    three ways, each at its own bits: every output is its weight's product (against the reference),
    and the same bits whatever the weights' order in the call (the K split follows the call's total
    blocks, so a call of one weight may sum in another order)."""
    rng = np.random.default_rng(m)
    k = 128
    weights = []
    for kind, n in (("Q4_1", 192), ("Q8_0", 64), ("quantize", 130)):
        if kind == "quantize":
            nw = _nested(n, k, seed=m)
        else:
            q8, s, z, _ = grid_from_blocks(random_blocks(rng, T[kind], n, k), kind, k)
            nw = pack_codes(torch.from_numpy(q8), torch.from_numpy(s), torch.from_numpy(z))
        packed = pack_scale_zero(nw.scale, nw.zero)
        weights.append((nw.qdata, packed))
    assert [p.dtype for _, p in weights] == [torch.float16, torch.float16, torch.float32]
    assert weights[1][1].shape[2] == 1  # the Q8_0 grid's steps alone
    bits = [torch.tensor(4), torch.tensor(8), torch.tensor(2)]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    ys = torch.ops.csd.qlinear_cpu_multi_native(x, [q for q, _ in weights], [p for _, p in weights],
                                                [p for _, p in weights], bits)
    rev = torch.ops.csd.qlinear_cpu_multi_native(x, [q for q, _ in weights[::-1]], [p for _, p in weights[::-1]],
                                                 [p for _, p in weights[::-1]], bits[::-1])[::-1]
    for (q, p), b, y, y_rev in zip(weights, bits, ys, rev):
        assert torch.equal(y, y_rev)
        ref = qlinear_ref(x, q, p, p, b).float()
        assert ((y.float() - ref).norm() / ref.norm()).item() < 6e-3
