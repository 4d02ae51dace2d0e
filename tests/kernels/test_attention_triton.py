"""The Triton kernel of csd.decode_attention against the reference, on CPU through Triton's
interpreter (in a child Python started with ``TRITON_INTERPRET=1``: ``tests/interpreted.py``)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.interpreted import run_interpreted


def _compare(out, q, k, v, mask, scale):
    from csd_compile.kernels.attention import attention_ref

    ref = attention_ref(q.float(), k.float(), v.float(), mask, scale)
    assert out.dtype == q.dtype and out.shape == ref.shape
    o = out.float()
    assert torch.equal(o.isnan(), ref.isnan())
    o, r = o.nan_to_num(0.0), ref.nan_to_num(0.0)
    eps = 1e-5 if q.dtype == torch.float32 else torch.finfo(q.dtype).eps
    assert ((o - r).abs() <= eps * (1 + r.abs())).all(), (o - r).abs().max().item()


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    t=st.integers(1, 4),
    s=st.integers(1, 70),
    d=st.sampled_from([5, 16, 32]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    kind=st.sampled_from(["none", "bool", "float"]),
    block_s=st.sampled_from([16, 64]),
    seed=st.integers(0, 2**16),
)
def _check_matches_reference(b, hkv, group, t, s, d, dtype, kind, block_s, seed):
    from csd_compile.kernels.attention import attention_triton

    g = torch.Generator().manual_seed(seed)
    hq = hkv * group
    q = torch.randn(b, hq, t, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, s, d, generator=g).to(dtype) for _ in range(2))
    mask = None
    if kind != "none":  # rows with no open slot included (NaN, as the reference)
        visible = torch.rand(b, 1, t, s, generator=g) < 0.6
        mask = visible if kind == "bool" else torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    scale = 1.0 / math.sqrt(d)
    _compare(attention_triton(q, k, v, mask, scale, block_s=block_s), q, k, v, mask, scale)


def _check_closed_slots_are_not_read():
    from csd_compile.kernels.attention import attention_ref, attention_triton

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 2, 16, generator=g)
    k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(2))
    mask = torch.arange(40).view(1, 1, 1, 40) < 23
    clean = attention_ref(q, k, v, mask, 0.25)
    k[:, :, 23:] = float("nan")
    v[:, :, 23:] = float("inf")
    out = attention_triton(q, k, v, mask, 0.25, block_s=16)
    assert out.isfinite().all()
    torch.testing.assert_close(out, clean, rtol=1e-5, atol=1e-5)


def test_triton_kernel_matches_reference_interpreted():
    run_interpreted(__file__, "csd_compile.kernels.attention", "_attention_kernel",
                    [_check_matches_reference, _check_closed_slots_are_not_read])


def test_triton_entry_checks_arguments_before_launching():
    from csd_compile.kernels.attention import attention_triton

    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="power of two"):
        attention_triton(q, k, k, None, 0.1, block_s=24)
    with pytest.raises(ValueError, match="does not broadcast"):
        attention_triton(q, k, k, torch.ones(3, dtype=torch.bool), 0.1)
