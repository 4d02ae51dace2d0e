"""``native.direct_qlinear``: the C++ kernel as a plain Python function, which Inductor's Python
wrapper calls instead of ``torch.ops.csd.qlinear_cpu_native`` (no dispatcher round trip). It must be
that op exactly: the same values bit for bit, the same errors, visible to the profiler, and what the
compiled code actually calls."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.kernels import native
from csd_compile.quant.nested import quantize

_ALIAS = native._DIRECT["torch.ops.csd.qlinear_cpu_native.default"][1]  # the name the wrapper calls
OP = None


@pytest.fixture(scope="module", autouse=True)
def _built():
    global OP
    assert native.load(), "the C++ CPU kernels should build on this machine"
    OP = torch.ops.csd.qlinear_cpu_native.default


def _weight(n, k, group, seed):
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(n, k, generator=g) * 0.05, group)


@settings(max_examples=60, deadline=None)
@given(n=st.sampled_from([2, 62, 64, 130, 192]), group=st.sampled_from([32, 64, 128]), k_groups=st.integers(1, 4),
       rows=st.sampled_from([(1,), (1, 1), (3,), (2, 5), (17,), (1, 20)]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), bits=st.sampled_from([2, 3, 4, 8]),
       bits_dtype=st.sampled_from([torch.int32, torch.int64, torch.int16, torch.uint8]),
       bits_shape=st.sampled_from([(), (1,)]), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_direct_equals_the_op_bit_for_bit(n, group, k_groups, rows, dtype, bits, bits_dtype, bits_shape, transposed,
                                          seed):
    k = group * k_groups
    nw = _weight(n, k, group, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*rows, k, generator=g).to(dtype)
    if transposed and len(rows) == 2:  # a non-contiguous input: read as its values, like the op
        x = torch.randn(k, *rows[::-1], generator=g).to(dtype).transpose(0, -1)
    b = torch.tensor(bits, dtype=bits_dtype).reshape(bits_shape)
    y = native.direct_qlinear(x, *nw, b)
    r = OP(x, *nw, b)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], n)
    assert r.abs().max() > 0 and torch.equal(y, r)


def test_direct_rejects_what_the_op_rejects():
    nw = _weight(64, 64, 32, 0)
    x = torch.randn(2, 64)
    for bad, match in ((torch.tensor(5), "bits=5 is not supported; choose one of"),
                       (torch.tensor(4.0), "bits must be a 0-d integer tensor"),
                       (torch.tensor([4, 4]), "bits must be a 0-d integer tensor")):
        with pytest.raises(ValueError, match=match):
            native.direct_qlinear(x, *nw, bad)
        with pytest.raises(ValueError, match=match):
            OP(x, *nw, bad)
    with pytest.raises(ValueError, match="its last dim must be in_features=64"):
        native.direct_qlinear(torch.randn(2, 32), *nw, torch.tensor(4))
    with pytest.raises(TypeError):
        native.direct_qlinear(x, *nw)
    with pytest.raises(AttributeError, match="no attribute 'direct_qlinearx'"):
        native.direct_qlinearx  # noqa: B018


def test_the_profiler_sees_the_direct_call_and_its_shapes():
    nw = _weight(64, 64, 32, 1)
    with torch.profiler.profile(record_shapes=True) as prof:
        native.direct_qlinear(torch.randn(3, 64), *nw, torch.tensor(4))
    (event,) = [e for e in prof.events() if e.name == "csd::qlinear_cpu_native"]
    assert event.input_shapes == [[3, 64], [2, 64, 32], [64, 2], [64, 2], []]


def test_compiled_code_calls_the_direct_function_and_matches_eager():
    from torch._inductor.utils import run_and_get_code

    from csd_compile.quant import quantize_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    quantize_(model, bits=4, group_size=32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=False):
            out, (code,) = run_and_get_code(torch.compile(model, backend="inductor"), x)
    assert code.count(f"{_ALIAS}(") == 2
    assert "torch.ops.csd.qlinear_cpu_native.default(" not in code
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_call_inside_a_nested_region_finds_the_direct_function():
    """Only the region holds quantized linears: the import must reach the module all the same."""
    from torch._inductor.utils import run_and_get_code

    from csd_compile.quant import quantize_

    torch.manual_seed(1)
    inner = quantize_(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()), bits=8, group_size=32)

    @torch.compiler.nested_compile_region
    def block(x):
        return inner(x)

    def f(x):
        return block(block(x) * 2.0)

    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = f(x)
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=False):
            out, codes = run_and_get_code(torch.compile(f, backend="inductor", fullgraph=True), x)
    code = "\n".join(codes)
    assert f"direct_qlinear as {_ALIAS}" in code and f"{_ALIAS}(" in code
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
