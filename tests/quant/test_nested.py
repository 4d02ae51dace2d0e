import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.quant.nested import (
    dequantize,
    fake_quantize,
    nested_codes,
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


@pytest.mark.parametrize("group", [32, 64, 128])
def test_nested_error_vs_direct_rtn(group):
    w = _weight(256, 512, 0)
    mse = lambda a: ((a.float() - w) ** 2).mean().item()  # noqa: E731
    for b in BITS:
        nested, rtn = mse(fake_quantize(w, b, group)), mse(rtn_fake_quantize(w, b, group))
        assert nested <= rtn * (1.1 if b == 8 else 1.0), (b, nested, rtn)
    # error falls with every rung
    errs = [mse(fake_quantize(w, b, group)) for b in BITS]
    assert errs == sorted(errs, reverse=True)


def test_memory_is_plain_8bit():
    w = _weight(128, 256, 1)
    nw = quantize(w, 64)
    stored = sum(t.numel() * t.element_size() for t in nw)
    plain8 = w.numel() + 2 * 4 * w.numel() // 64  # uint8 codes + float32 scale/zero per group
    assert stored <= 1.1 * plain8


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
