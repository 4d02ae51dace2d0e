"""Packed scale/zero (``quant.nested.pack_scale_zero``): the layout, what QLinear keeps and passes on
CPU, the compile pass, and the errors for tensors that are not that layout.

The kernel's arithmetic on packed scales is checked on every instruction-set path by the hypothesis
tests of ``test_qlinear_simd.py`` ("packed" is one of their layouts: against the reference, and bit
for bit against row-major scales)."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.kernels import native
from csd_compile.kernels.qlinear import check_qlinear_args, qlinear_ref, qlinear_triton
from csd_compile.passes.quantize_linear import quantize_linear
from csd_compile.config import CSDConfig
from csd_compile.quant import QLinear
from csd_compile.quant.nested import column_major, pack_scale_zero, quantize, unpack_scale_zero
from tests.conftest import make_tiny_llama


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
