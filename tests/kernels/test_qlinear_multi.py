"""``csd::qlinear_multi``: several nested weights that read one input, in one call (a layer's q/k/v or
gate/up). Every weight keeps its own bit-width; the values are each weight's own ``csd::qlinear``
(up to the order of float additions: the C++ kernel splits the work over threads for all weights
together), on every instruction-set path, through the op, the C++ op and the direct function."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.kernels import native
from csd_compile.kernels.qlinear import qlinear_multi, qlinear_ref

from tests.kernels.test_qlinear_simd import ISAS, _rel_err, _runnable, _tol


@pytest.fixture(scope="module", autouse=True)
def _built():
    assert native.load(), "the C++ CPU kernels should build on this machine"
    yield
    native.set_isa("auto")


def _weights(ns, k, group, gen):
    """Random planes (every byte value), positive scales, signed zeros, one weight per entry of ns."""
    out = []
    for n in ns:
        qdata = torch.randint(0, 256, (2, n, k // 2), generator=gen, dtype=torch.uint8)
        scale = torch.rand(n, k // group, generator=gen) * 0.01 + 1e-3
        zero = torch.randn(n, k // group, generator=gen) * 0.3
        out.append((qdata, scale, zero))
    return out


def _lists(weights, bits):
    return [list(t) for t in zip(*weights)] + [[torch.tensor(b, dtype=torch.int32) for b in bits]]


_N = st.one_of(st.sampled_from([64, 192, 576]), st.integers(1, 160).map(lambda v: 2 * v))


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=40, deadline=None)
@given(ns=st.lists(_N, min_size=1, max_size=4), group=st.sampled_from([32, 64, 128]), k_groups=st.integers(1, 8),
       m=st.one_of(st.integers(1, 16), st.just(19)), lead=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       bits=st.lists(st.sampled_from([2, 3, 4, 8]), min_size=4, max_size=4), threads=st.sampled_from([1, 2, 3]),
       int8=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_each_output_is_its_own_weights_product(isa, ns, group, k_groups, m, lead, dtype, bits, threads, int8, seed):
    if isa not in _runnable():
        return  # refusing a path the CPU cannot run is tested in test_qlinear_simd
    k = group * k_groups
    gen = torch.Generator().manual_seed(seed)
    weights = _weights(ns, k, group, gen)
    x = (torch.randn(*((2,) if lead else ()), m, k, generator=gen) + 0.1).to(dtype)
    args = _lists(weights, bits[: len(ns)])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with native.use_isa(isa), native.use_activations("int8" if int8 else "float"):
            ys = torch.ops.csd.qlinear_cpu_multi_native(x, *args)
            direct = native.direct_qlinear_multi(x, *args)
            singles = [torch.ops.csd.qlinear_cpu_native(x, *w, b) for w, b in zip(weights, args[3])]
    finally:
        torch.set_num_threads(before)
    assert len(ys) == len(direct) == len(ns)
    for y, d, s, w, b, n in zip(ys, direct, singles, weights, args[3], ns):
        assert y.shape == (*x.shape[:-1], n) and y.dtype == dtype
        assert torch.equal(y, d)  # the direct function is the op
        assert _rel_err(y, s) < _tol(dtype), (isa, ns, k, m, dtype, bits)
        if not int8:
            assert _rel_err(y, qlinear_ref(x, *w, b)) < _tol(dtype), (isa, ns, k, m, dtype, bits)


def test_the_op_and_its_fallback_give_the_reference():
    """``csd::qlinear_multi`` (what graphs call) and the pure-PyTorch path (no C++ kernels) per weight."""
    gen = torch.Generator().manual_seed(3)
    weights = _weights([576, 192, 130], 576, 32, gen)
    x = torch.randn(3, 576, generator=gen).to(torch.bfloat16)
    args = _lists(weights, [4, 8, 2])
    ys = torch.ops.csd.qlinear_multi(x, *args)
    fallback = [torch.ops.csd.qlinear_cpu(x, *w, b) for w, b in zip(weights, args[3])]
    for y, f, w, b in zip(ys, fallback, weights, args[3]):
        r = qlinear_ref(x, *w, b)
        assert r.abs().max() > 0
        assert _rel_err(y, r) < _tol(torch.bfloat16) and _rel_err(f, r) < _tol(torch.bfloat16)


def test_bits_are_read_per_weight_at_every_call():
    gen = torch.Generator().manual_seed(5)
    weights = _weights([128, 64], 256, 64, gen)
    x = torch.randn(1, 256, generator=gen)
    args = _lists(weights, [8, 8])
    first = qlinear_multi(x, *args)
    args[3][1].fill_(2)  # only the second weight changes rung
    second = qlinear_multi(x, *args)
    assert torch.equal(first[0], second[0])
    assert not torch.allclose(first[1], second[1])
    assert _rel_err(second[1], qlinear_ref(x, *weights[1], args[3][1])) < 1e-5


def test_bad_arguments_are_refused_with_what_is_allowed():
    gen = torch.Generator().manual_seed(0)
    w32, w64 = _weights([64], 128, 32, gen)[0], _weights([64], 128, 64, gen)[0]
    x = torch.randn(1, 128)
    b = torch.tensor(4)
    with pytest.raises(ValueError, match="lists of one length >= 1"):
        qlinear_multi(x, [w32[0]], [w32[1]], [w32[2]], [b, b])
    with pytest.raises(ValueError, match="lists of one length >= 1"):
        qlinear_multi(x, [], [], [], [])
    with pytest.raises(ValueError, match=r"one group size, got \[32, 64\]"):
        qlinear_multi(x, [w32[0], w64[0]], [w32[1], w64[1]], [w32[2], w64[2]], [b, b])
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        qlinear_multi(x, [w32[0], w32[0]], [w32[1], w32[1]], [w32[2], w32[2]], [b, torch.tensor(5)])
    with pytest.raises(ValueError, match="last dim must be in_features=128"):
        qlinear_multi(torch.randn(1, 96), [w32[0]], [w32[1]], [w32[2]], [b])
    # the C++ op checks the same before any work
    for bad, match in (((x, [w32[0]], [w32[1]], [w32[2]], [b, b]), "lists of one length >= 1"),
                       ((x, [w32[0], w64[0]], [w32[1], w64[1]], [w32[2], w64[2]], [b, b]), "group size of the first"),
                       ((x, [w32[0]], [w32[1]], [w32[2]], [torch.tensor(7)]), "bits=7 is not supported")):
        with pytest.raises(ValueError, match=match):
            torch.ops.csd.qlinear_cpu_multi_native(*bad)
        with pytest.raises(ValueError, match=match):
            native.direct_qlinear_multi(*bad)


@settings(max_examples=30, deadline=None)
@given(m=st.sampled_from([1, 3, 16]), n=st.sampled_from([64, 130, 576]), special=st.sampled_from([None, "nan", "inf"]),
       seed=st.integers(0, 2**31 - 1))
def test_bf16_outputs_round_like_torch(m, n, special, seed):
    """The kernel rounds its fp32 sums to bf16 itself (a vectorized loop): bit for bit what
    ``Tensor.to(torch.bfloat16)`` makes of the same sums, infinities included; a NaN stays a NaN
    (its payload is not kept: the kernel writes the quiet NaN 0x7FC0, as c10::BFloat16 does)."""
    gen = torch.Generator().manual_seed(seed)
    (w,) = _weights([n], 256, 32, gen)
    x = torch.randn(m, 256, generator=gen).to(torch.bfloat16)
    if special == "nan":
        x[0, 5] = float("nan")
    elif special == "inf":
        x[-1, 7] = 3e38  # overflows the fp32 sums of that row
    b = torch.tensor(4)
    # a float path (the avx512bf16 one sums bf16 x in its own order, an fp32 x on the float path)
    with native.use_isa([isa for isa in _runnable() if isa != "avx512bf16"][-1]):
        y = native.direct_qlinear(x, *w, b)
        want = native.direct_qlinear(x.float(), *w, b).to(torch.bfloat16)  # same fp32 sums (bf16 -> fp32 is exact)
        (ym,) = native.direct_qlinear_multi(x, [w[0]], [w[1]], [w[2]], [b])
    nan = want.isnan()
    for got in (y, ym):
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    if special == "nan":
        assert y[0].isnan().all()
    if special == "inf":
        assert y[-1].isinf().any()
