"""csd::decode_attention on CPU: the C++ kernel (every instruction-set path this CPU runs) and the op
against the pure-torch reference, on many shapes, dtypes and masks; closed slots are never read."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.kernels import native
from csd_compile.kernels.attention import attention_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MASKS = ["none", "bool", "float-inf", "float-finite", "bf16"]
# shapes a mask may have, as the dims of [B, Hq, T, S] it keeps (the others broadcast)
MASK_SHAPES = [(1, 0, 1, 1), (0, 0, 1, 1), (1, 1, 1, 1), (0, 0, 0, 1)]


@pytest.fixture(scope="module", autouse=True)
def _built():
    if not native.load():
        pytest.fail("the C++ kernels did not build on this machine (see the NativeBuildWarning)")


def _mask(kind, shape_keep, b, hq, t, s, g, pattern):
    if kind == "none":
        return None
    dims = [n if keep else 1 for n, keep in zip((b, hq, t, s), shape_keep)]
    if pattern == "prefix":  # a cache filled up to a random length per row, as in decoding
        filled = torch.randint(1, s + 1, dims[:-1] + [1], generator=g)
        visible = torch.arange(s).expand(dims) < filled
    else:
        visible = torch.rand(dims, generator=g) < 0.6
    if kind == "bool":
        return visible
    if kind == "float-finite":  # HF's eager masks: a very negative number, not -inf
        return torch.zeros(dims).masked_fill(~visible, torch.finfo(torch.float32).min) + torch.randn(dims, generator=g)
    m = torch.zeros(dims).masked_fill(~visible, float("-inf")) + torch.randn(dims, generator=g)
    return m.to(torch.bfloat16) if kind == "bf16" else m


def _close(out, ref, dtype):
    """``out`` against the reference: fp32 to ~1e-5; bf16/fp16 within the output's rounding (half an
    ulp of either result) plus 1e-5; NaN exactly where the reference has NaN."""
    assert out.dtype == dtype and out.shape == ref.shape
    o, r = out.float(), ref.float()
    assert torch.equal(o.isnan(), r.isnan())
    o, r = o.nan_to_num(0.0), r.nan_to_num(0.0)
    tol = 1e-5 * (1 + r.abs()) if dtype == torch.float32 else torch.finfo(dtype).eps / 2 * (o.abs() + r.abs()) + 1e-5
    assert ((o - r).abs() <= tol).all(), (o - r).abs().max().item()


def _reference(q, k, v, mask, scale):
    """The reference on the same inputs in fp32, rounded to the inputs' dtype at the end."""
    return attention_ref(q.float(), k.float(), v.float(), mask, scale).to(q.dtype)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3]),
    t=st.integers(1, 16),
    s=st.integers(1, 300),
    d=st.sampled_from([5, 16, 64, 80, 128]),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(MASKS),
    shape_keep=st.sampled_from(MASK_SHAPES),
    pattern=st.sampled_from(["prefix", "random"]),
    seed=st.integers(0, 2**16),
)
def test_native_matches_reference_on_every_path(b, hkv, group, t, s, d, dtype, kind, shape_keep, pattern, seed):
    g = torch.Generator().manual_seed(seed)
    hq = hkv * group
    q = torch.randn(b, hq, t, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    mask = _mask(kind, shape_keep, b, hq, t, s, g, pattern)
    scale = 1.0 / math.sqrt(d) * float(torch.rand((), generator=g) + 0.5)
    ref = _reference(q, k, v, mask, scale)
    for isa in native.supported_isas():
        for loops in native.ATTENTION_LOOPS:  # head sizes 64 and 128 run either; the others "general"
            with native.use_isa(isa), native.use_attention_loops(loops):
                out = torch.ops.csd.decode_attention_cpu_native(q, k, v, mask, scale)
                direct = native.direct_attention(q, k, v, mask, scale)
            _close(out, ref, dtype)
            assert torch.equal(out.nan_to_num(7.0), direct.nan_to_num(7.0)), (isa, loops)
    _close(torch.ops.csd.decode_attention(q, k, v, mask, scale), ref, dtype)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("rows", [(1, 1), (3, 1), (2, 2), (3, 5), (4, 4), (7, 1), (1, 9)])
def test_register_path_every_row_block_on_every_path(d, rows):
    # the register path takes query rows (query heads per cache head x queries) by blocks of up to 4
    # (fewer for wide vectors on narrow paths), the last block narrower: every remainder, decode (3 x
    # 1: SmolLM2) and verify passes (3 x 5), against the reference and against the general loops
    group, t = rows
    g = torch.Generator().manual_seed(group * 100 + t + d)
    q = torch.randn(1, 2 * group, t, d, generator=g).bfloat16()
    k, v = (torch.randn(1, 2, 190, d, generator=g).bfloat16() for _ in range(2))
    causal = torch.arange(190).view(1, 1, 1, 190) < (150 + torch.arange(t)).view(1, 1, t, 1)  # a verify pass
    ref = _reference(q, k, v, causal, 0.125)
    for isa in native.supported_isas():
        with native.use_isa(isa):
            out = torch.ops.csd.decode_attention_cpu_native(q, k, v, causal, 0.125)
            with native.use_attention_loops("general"):
                general = torch.ops.csd.decode_attention_cpu_native(q, k, v, causal, 0.125)
        _close(out, ref, torch.bfloat16)
        _close(out, general, torch.bfloat16)


def test_attention_loops_switch_is_checked_and_restored():
    assert native.attention_loops() == "registers"
    with native.use_attention_loops("general") as mode:
        assert mode == "general" and native.attention_loops() == "general"
    assert native.attention_loops() == "registers"
    with pytest.raises(ValueError, match="'vectorized' is not one of"):
        native.set_attention_loops("vectorized")
    with pytest.raises(ValueError, match="unknown loops 'fast'"):
        torch.ops.csd.decode_attention_cpu_set_loops("fast")
    assert native.attention_loops() == "registers"


def test_matches_sdpa_for_a_decode_step_over_a_static_cache():
    # SmolLM2's attention: 9 query heads over 3 cache heads of 64, one query, a cache of 256 slots
    # of which 100 are written, HF's boolean mask
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 9, 1, 64, generator=g)
    k, v = (torch.randn(1, 3, 256, 64, generator=g) for _ in range(2))
    mask = torch.arange(256).view(1, 1, 1, 256) < 100
    out = torch.ops.csd.decode_attention(q, k, v, mask, 0.125)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [32, 64, 128])  # the general loops; the register path (64, 128)
@pytest.mark.parametrize("dtype", DTYPES)
def test_closed_slots_are_never_read(dtype, d):
    # inf / NaN behind the mask would poison a kernel that reads (or multiplies by) those slots
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 3, d, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 64, d, generator=g).to(dtype) for _ in range(2))
    mask = torch.arange(64).view(1, 1, 1, 64) < torch.tensor([20, 41]).view(2, 1, 1, 1)
    clean = _reference(q, k, v, mask, 0.2)
    for t in (k, v):
        t[0, :, 20:] = float("nan")
        t[1, :, 41:] = float("inf")
    for isa in native.supported_isas():
        for loops in native.ATTENTION_LOOPS:
            with native.use_isa(isa), native.use_attention_loops(loops):
                out = torch.ops.csd.decode_attention(q, k, v, mask, 0.2)
            assert out.isfinite().all(), (isa, loops)
            _close(out, clean, dtype)


def test_a_row_with_no_open_slot_is_nan_like_the_reference():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 2, 2, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    mask = torch.ones(1, 1, 2, 5, dtype=torch.bool)
    mask[0, 0, 1] = False
    out = torch.ops.csd.decode_attention(q, k, v, mask, 0.3)
    assert out[:, :, 1].isnan().all() and out[:, :, 0].isfinite().all()
    _close(out, _reference(q, k, v, mask, 0.3), torch.float32)


def test_strided_inputs_and_inputs_left_unchanged():
    # q as HF lays it out ([B, T, H, D] transposed), the cache a slice of a larger buffer, mask a view
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 5, 6, 16, generator=g).transpose(1, 2)
    big = torch.randn(2, 3, 90, 32, generator=g)
    k, v = big[..., :16], big[..., 16:]
    mask = (torch.rand(2, 1, 90, 5, generator=g) < 0.7).transpose(-1, -2)
    mask[..., 0] = True
    before = [t.clone() for t in (q, k, v, mask)]
    out = torch.ops.csd.decode_attention(q, k, v, mask, 0.25)
    _close(out, _reference(q.contiguous(), k.contiguous(), v.contiguous(), mask.contiguous(), 0.25), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, mask)))
    assert out.is_contiguous()


@pytest.mark.parametrize("args, error, match", [
    (lambda q, k, v, m: (q[0], k, v, m, 0.1), ValueError, "query must be 4-d"),
    (lambda q, k, v, m: (q, k.double(), v, m, 0.1), TypeError, "key and value must have query's dtype"),
    (lambda q, k, v, m: (q.int(), k.int(), v.int(), m, 0.1), TypeError, "query must be float32, bfloat16 or float16"),
    (lambda q, k, v, m: (q, k[:, :, :3], v, m, 0.1), ValueError, "key and value must both be"),
    (lambda q, k, v, m: (q[:, :5], k, v, m, 0.1), ValueError, r"query heads \(5\) must be a multiple of key/value heads \(2\)"),
    (lambda q, k, v, m: (q, k[:, :, :0], v[:, :, :0], None, 0.1), ValueError, "at least one slot"),
    (lambda q, k, v, m: (q, k, v, m[..., :3], 0.1), ValueError, "does not broadcast"),
    (lambda q, k, v, m: (q, k, v, m.int(), 0.1), TypeError, "attn_mask must be bool or floating point"),
    (lambda q, k, v, m: (q, k, v, m, float("nan")), ValueError, "scale must be a finite number"),
])
def test_bad_arguments_raise_before_any_work(args, error, match):
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    m = torch.ones(1, 1, 2, 7, dtype=torch.bool)
    with pytest.raises(error, match=match):
        torch.ops.csd.decode_attention(*args(q, k, v, m))


def test_a_bool_scale_is_refused_where_python_sees_it():
    # (the op's schema turns True into 1.0 before the op body runs)
    from csd_compile.kernels.attention import check_attention_args

    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="scale must be a finite number, got True"):
        check_attention_args(q, k, k, None, True)


def test_native_op_checks_its_arguments_too():
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 4, 7, 8), torch.randn(1, 4, 7, 8)
    with pytest.raises(ValueError, match="must be a multiple of key/value heads"):
        torch.ops.csd.decode_attention_cpu_native(q, k, v, None, 0.1)
    with pytest.raises(ValueError, match="must have query's dtype"):
        native.direct_attention(q, k.bfloat16(), v, None, 0.1)


def test_compiled_op_calls_the_kernel_directly_with_the_same_values():
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 2, 16, generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 40, 16, generator=g, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.arange(40).view(1, 1, 1, 40) < 23

    def step(q, k, v, mask):
        return torch.ops.csd.decode_attention(q * 2, k, v, mask, 0.25) + 1

    eager = step(q, k, v, mask)
    with torch._inductor.config.patch(fx_graph_cache=False):
        out, (code,) = run_and_get_code(torch.compile(step, backend="inductor"), q, k, v, mask)
    alias = native._DIRECT["torch.ops.csd.decode_attention_cpu_native.default"][1]
    assert f"{alias}(" in code and "torch.ops.csd.decode_attention_cpu_native.default(" not in code
    assert torch.equal(out, eager)
