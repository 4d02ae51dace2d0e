"""The Triton kernel of csd.qlinear, run on CPU through the Triton interpreter (tiny shapes)."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import csd_compile.kernels.qlinear as qmod
from csd_compile.quant.nested import dequantize, quantize


@pytest.fixture
def interpreted(monkeypatch):
    # triton.jit picks the interpreter at decoration time: re-wrap the kernel's function.
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(qmod, "_qlinear_kernel", InterpretedFunction(qmod._qlinear_kernel.fn))


def _case(n, k, group, m, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    nw = quantize(torch.randn(n, k, generator=g) * 0.1, group)
    x = torch.randn(m, k, generator=g).to(dtype)
    return x, nw


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.sampled_from([16, 34, 64, 96, 130]),
    group=st.sampled_from([32, 64, 128]),
    groups=st.integers(1, 2),
    m=st.sampled_from([1, 3, 17]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
@example(n=16, group=64, groups=1, m=1, dtype=torch.bfloat16, seed=6664)  # 0.61% in norm: two roundings
def test_triton_kernel_matches_reference(interpreted, n, group, groups, m, dtype, seed):
    x, nw = _case(n, group * groups, group, m, dtype, seed)
    for bits in (2, 3, 4, 8):
        b = torch.tensor(bits, dtype=torch.int32)
        y = qmod.qlinear_triton(x, *nw, b, block_m=16, block_n=32, block_k=32)
        r = qmod.qlinear_ref(x, *nw, b)
        assert y.dtype == dtype and y.shape == r.shape
        if dtype == torch.float32:
            err = ((y - r).norm() / r.norm()).item()
            assert err < 1e-5, (bits, err)
        else:  # per output: both results rounded to the dtype (half an ulp each), plus tf32 products
            # (both factors rounded to 10-bit mantissas: at most 2^-10 of sum |x||w|)
            yf, rf = y.float(), r.float()
            mags = x.float().abs() @ dequantize(*nw, bits).abs().T
            slack = torch.finfo(dtype).eps / 2 * (yf.abs() + rf.abs()) + 2.0**-10 * mags
            assert ((yf - rf).abs() <= slack).all(), bits


@pytest.mark.parametrize("layout", ["row-major", "mixed"])
def test_triton_reads_any_scale_layout(interpreted, layout):
    """Stored column-major (the other tests); row-major, or each its own, reads the same numbers."""
    x, (qdata, scale, zero) = _case(130, 128, 32, 3, torch.float32, 1)
    b = torch.tensor(4, dtype=torch.int32)
    y = qmod.qlinear_triton(x, qdata, scale, zero, b)
    assert scale.stride(0) == 1
    scale2 = scale.contiguous()
    zero2 = zero.contiguous() if layout == "row-major" else zero
    assert torch.equal(qmod.qlinear_triton(x, qdata, scale2, zero2, b), y)


def test_triton_reads_bits_from_a_plan_view(interpreted):
    x, nw = _case(64, 64, 32, 2, torch.float32, 0)
    plan = torch.tensor([2, 8, 3], dtype=torch.int32)
    for i in range(3):
        torch.testing.assert_close(qmod.qlinear_triton(x, *nw, plan[i]), qmod.qlinear_ref(x, *nw, plan[i]))
    with pytest.raises(ValueError, match="bits must be a 0-d"):
        qmod.qlinear_triton(x, *nw, plan)
