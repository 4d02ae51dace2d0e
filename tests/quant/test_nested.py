import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.quant.nested import (
    dequantize,
    fake_quantize,
    nested_codes,
    pack_codes,
    pack_nibbles,
    quantize,
    rtn_fake_quantize,
    unpack_nibbles,
)

BITS = (2, 3, 4, 8)


def _weight(n, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05 + 0.01 * torch.randn(n, 1, generator=g)).to(dtype)


@settings(max_examples=40, deadline=None)
@given(nb=st.integers(0, 3), nt=st.integers(0, 31), k2=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_roundtrip_and_matches_torch_int4_layout(nb, nt, k2, seed):
    n, k = nb * 64 + 2 * nt, 2 * k2
    if n == 0:
        n = 2
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (n, k // 2)
    assert torch.equal(unpack_nibbles(packed), codes)
    if n % 16 == 0 and k % 32 == 0:
        ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        assert torch.equal(packed, ref)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40).map(lambda v: 2 * v),
    groups=st.integers(1, 4),
    group=st.sampled_from([32, 64, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_every_rung_is_top_bits_of_8bit_code(n, groups, group, dtype, seed):
    w = _weight(n, groups * group, seed, dtype)
    nw = quantize(w, group)
    assert nw.group_size == group
    c8 = nested_codes(nw.qdata, 8)
    for b in BITS:
        assert torch.equal(nested_codes(nw.qdata, b), c8 >> (8 - b))
        deq = dequantize(*nw, b)
        torch.testing.assert_close(deq.to(dtype), fake_quantize(w, b, group), rtol=0, atol=0)
        # b-bit midpoint quantizer: error at most half a b-bit step (+ float slack)
        step = (nw.scale * 2 ** (8 - b)).repeat_interleave(group, 1)
        assert ((deq - w.float()).abs() <= step / 2 + 1e-6 + 1e-2 * step).all()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 24).map(lambda v: 2 * v),
    groups=st.integers(1, 4),
    group=st.sampled_from([32, 64, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_4bit_rung_is_direct_rtn(n, groups, group, dtype, seed):
    w = _weight(n, groups * group, seed, dtype).float()  # bf16 values, compared in fp32
    nested, rtn = dequantize(*quantize(w, group), 4), rtn_fake_quantize(w, 4, group)
    lo, hi = w.reshape(n, groups, group).aminmax(dim=-1)
    step = ((hi - lo) / 15).repeat_interleave(group, 1)
    diff = (nested - rtn).abs()
    # same grid, same codes; they may differ only where w sits on a rounding tie (both equally near)
    off = diff > 1e-5 * step + 1e-7
    assert off.float().mean() <= 0.02, off.float().mean()
    gap = ((nested - w).abs() - (rtn - w).abs()).abs()
    assert (gap[off] <= 1e-4 * step[off]).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_nested_error_vs_direct_rtn(group):
    w = _weight(256, 512, 0)
    mse = lambda a: ((a.float() - w) ** 2).mean().item()  # noqa: E731
    nested = {b: mse(fake_quantize(w, b, group)) for b in BITS}
    rtn = {b: mse(rtn_fake_quantize(w, b, group)) for b in BITS}
    assert nested[4] == pytest.approx(rtn[4], rel=1e-3)
    # 8-bit: 240 steps over the range instead of 255 -> (255/240)^2 = 1.13x the MSE of RTN-8
    assert nested[8] <= rtn[8] * 1.2
    # 3 and 2 bits: bins of 2 and 4 RTN-4 steps (2/15, 4/15 of the range; RTN: 1/7, 1/3)
    assert nested[3] <= rtn[3] * 1.1 and nested[2] <= rtn[2] * 1.1
    # error falls with every rung
    assert [nested[b] for b in BITS] == sorted(nested.values(), reverse=True)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 16).map(lambda v: 2 * v), groups=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_4bit_rung_reads_a_q4_1_checkpoint_back_exactly(n, groups, seed):
    """A weight on a GGUF Q4_1 grid (blocks of 32: w = d * q + m, q in 0..15, every block using codes
    0 and 15 as Q4_1's min-max quantizer does) decodes to itself at group_size=32; held in bf16 (off
    the grid by bf16 rounding) it still gets Q4_1's codes back, and decodes to within that rounding."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, groups, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0.0, 15.0
    q = q[..., torch.randperm(32, generator=g)]
    d = (torch.rand(n, groups, 1, generator=g) * 0.02 + 1e-2).to(torch.float16).float()
    m = (torch.randn(n, groups, 1, generator=g) * 0.02).to(torch.float16).float()
    w = (d * q + m).reshape(n, groups * 32)
    top = float(w.abs().max())
    torch.testing.assert_close(dequantize(*quantize(w, 32), 4), w, rtol=0, atol=2e-6 * top)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(nested_codes(quantize(w.to(dtype), 32).qdata, 4).reshape(n, groups, 32).float(), q)
    torch.testing.assert_close(dequantize(*quantize(w.to(torch.bfloat16), 32), 4), w, rtol=0, atol=2 ** -8 * top)
    # the integer zero point moves the grid off Q4_1's and misses some of the weights
    assert (rtn_fake_quantize(w, 4, 32) - w).abs().max() > 1e-3 * float(d.min())


def test_memory_is_plain_8bit():
    w = _weight(128, 256, 1)
    nw = quantize(w, 64)
    stored = sum(t.numel() * t.element_size() for t in nw)
    plain8 = w.numel() + 2 * 4 * w.numel() // 64  # uint8 codes + float32 scale/zero per group
    assert stored <= 1.1 * plain8


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 100).map(lambda v: 2 * v), groups=st.integers(1, 5), group=st.sampled_from([32, 64, 128]),
       seed=st.integers(0, 2**16))
def test_scales_and_zeros_are_stored_column_major(n, groups, group, seed):
    """The layout the CPU kernel reads with vector loads: a group's values of consecutive rows adjacent."""
    nw = quantize(_weight(n, groups * group, seed), group)
    for t in (nw.scale, nw.zero):
        assert t.shape == (n, groups) and t.dtype == torch.float32
        assert t.stride(0) == 1 and t.T.is_contiguous()  # (1, n); a 1-column tensor's stride(1) is 1
    rows = torch.randint(0, 16, (n, groups * group), dtype=torch.uint8)
    packed = pack_codes(rows, nw.scale.contiguous(), nw.zero.contiguous())  # row-major in: column-major out
    assert packed.scale.stride(0) == packed.zero.stride(0) == 1 and packed.scale.T.is_contiguous()
    assert torch.equal(packed.scale, nw.scale) and torch.equal(packed.zero, nw.zero)


def test_bits16_is_identity_and_constant_groups_are_exact():
    w = _weight(4, 64, 2)
    assert fake_quantize(w, 16, 64) is w
    c = torch.full((4, 64), 0.37)
    for b in BITS:
        torch.testing.assert_close(fake_quantize(c, b, 64), c, rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(bits=st.one_of(st.integers(-3, 20).filter(lambda b: b not in (2, 3, 4, 8, 16)), st.just(4.0), st.just(True)))
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        fake_quantize(_weight(4, 64, 0), bits, 64)


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 300), group=st.sampled_from([32, 64, 128]))
def test_group_size_must_divide_in_features(k, group):
    w = _weight(4, k, 0)
    if k % group:
        with pytest.raises(ValueError, match="does not divide"):
            quantize(w, group)
    else:
        quantize(w, group)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8])
def test_integer_weight_rejected(dtype):
    with pytest.raises(TypeError, match="floating"):
        quantize(torch.randint(0, 5, (4, 64), dtype=dtype), 64)


def test_bad_group_size_and_odd_rows():
    with pytest.raises(ValueError, match="group_size"):
        quantize(_weight(4, 96, 0), 48)
    with pytest.raises(ValueError, match="even"):
        quantize(_weight(3, 64, 0), 64)


@settings(max_examples=40, deadline=None)
@given(widths=st.lists(st.integers(1, 90), min_size=2, max_size=4), groups=st.integers(1, 4),
       group=st.sampled_from([32, 64]), seed=st.integers(0, 2**16))
def test_a_fused_projection_quantizes_as_its_parts(widths, groups, group, seed):
    """q/k/v or gate/up stored as one matrix (parts stacked along the output rows, widths not multiples
    of the 64-row block): groups run along K inside each row, so every rung of the fused copy decodes,
    row for row, to the parts quantized one by one, and the kernel gives the parts' outputs."""
    if sum(widths) % 2:
        widths = [*widths[:-1], widths[-1] + 1]  # the format stores an even number of rows
    k = group * groups
    parts = [_weight(w, k, seed + i) for i, w in enumerate(widths)]
    fused = quantize(torch.cat(parts), group)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(seed))
    for bits in BITS:
        whole = dequantize(*fused, bits)
        assert torch.equal(whole, torch.cat([fake_quantize(p, bits, group) for p in parts])), bits
        y = torch.ops.csd.qlinear(x, *fused, torch.tensor(bits, dtype=torch.int32))
        ref = torch.cat([x @ fake_quantize(p, bits, group).T for p in parts], dim=-1)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
