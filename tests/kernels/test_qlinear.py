import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from csd_compile.kernels.qlinear import qlinear_ref
from csd_compile.quant import QLinear, set_bits
from csd_compile.quant.nested import dequantize, quantize

BITS = (2, 3, 4, 8)


def _nested(n, k, group, seed):
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(n, k, generator=g) * 0.1, group)


def _rel_err(y, r):
    return ((y.float() - r.float()).norm() / r.float().norm()).item()


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from([16, 32, 48, 64, 96, 130, 192]),
    groups=st.integers(1, 3),
    group=st.sampled_from([32, 64, 128]),
    m=st.sampled_from([1, 2, 3, 5, 9, 16, 17, 40]),  # 17 and 40 take the dequantize + GEMM path
    lead=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    bits=st.sampled_from(BITS),
    seed=st.integers(0, 2**16),
)
def test_cpu_op_matches_reference(n, groups, group, m, lead, dtype, bits, seed):
    k = groups * group
    nw = _nested(n, k, group, seed)
    x = torch.randn(*((2,) if lead else ()), m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    b = torch.tensor(bits, dtype=torch.int32)
    y = torch.ops.csd.qlinear(x, *nw, b)
    r = qlinear_ref(x, *nw, b)
    assert y.shape == r.shape == (*x.shape[:-1], n) and y.dtype == dtype
    # reference itself == fp32 dequantize + matmul
    exact = (x.float() @ dequantize(*nw, bits).T).to(dtype)
    torch.testing.assert_close(r, exact, rtol=0, atol=0)
    assert _rel_err(y, r) < (1e-5 if dtype == torch.float32 else 6e-3)


@settings(max_examples=30, deadline=None)
@given(
    n=st.sampled_from([2, 16, 64, 130, 256]),
    group=st.sampled_from([32, 64, 128]),
    m=st.integers(1, 20),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bits=st.sampled_from(BITS),
    seed=st.integers(0, 2**16),
)
def test_native_and_pytorch_cpu_kernels_agree_with_reference(n, group, m, dtype, bits, seed):
    """Both CPU kernels directly: the C++ one (the default) and the PyTorch fallback."""
    from csd_compile.kernels import native

    assert native.load(), "the C++ CPU kernels should build on this machine"
    nw = _nested(n, 2 * group, group, seed)
    x = torch.randn(m, 2 * group, generator=torch.Generator().manual_seed(seed + 7)).to(dtype)
    b = torch.tensor(bits)
    r = qlinear_ref(x, *nw, b)
    tol = 1e-5 if dtype == torch.float32 else 6e-3
    for op in (torch.ops.csd.qlinear_cpu_native, torch.ops.csd.qlinear_cpu):
        y = op(x, *nw, b)
        assert y.shape == r.shape and y.dtype == dtype
        assert _rel_err(y, r) < tol, op


def test_native_kernel_rejects_bad_bits_at_run_time():
    from csd_compile.kernels import native

    assert native.load()
    nw = _nested(64, 64, 32, 0)
    with pytest.raises(ValueError, match="bits=5"):
        torch.ops.csd.qlinear_cpu_native(torch.randn(1, 64), *nw, torch.tensor(5))


def test_bits_from_a_plan_entry_and_int64():
    nw = _nested(64, 128, 64, 0)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    plan = torch.tensor([8, 2, 3], dtype=torch.int64)
    for i in range(3):
        assert _rel_err(torch.ops.csd.qlinear(x, *nw, plan[i]), qlinear_ref(x, *nw, plan[i])) < 6e-3
    assert _rel_err(torch.ops.csd.qlinear(x, *nw, plan[1:2]), qlinear_ref(x, *nw, plan[1])) < 6e-3


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(-4, 40).filter(lambda b: b not in BITS))
def test_unsupported_bits_value(bits):
    nw = _nested(32, 64, 32, 0)
    with pytest.raises(ValueError, match="bits"):
        torch.ops.csd.qlinear(torch.randn(1, 64), *nw, torch.tensor(bits))


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from([torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool]),
    m=st.integers(1, 4),
)
def test_integer_activations_rejected(dtype, m):
    nw = _nested(32, 64, 32, 0)
    x = torch.randint(0, 2, (m, 64)).to(dtype)
    with pytest.raises(TypeError, match="floating point"):
        torch.ops.csd.qlinear(x, *nw, torch.tensor(4))


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3).filter(lambda s: s != [1]))
def test_bits_wrong_shape(shape):
    nw = _nested(32, 64, 32, 0)
    with pytest.raises(ValueError, match="bits must be a 0-d"):
        torch.ops.csd.qlinear(torch.randn(1, 64), *nw, torch.full(shape, 4))


def test_bits_wrong_dtype_and_shape_mismatch():
    nw = _nested(32, 64, 32, 0)
    with pytest.raises(TypeError, match="integer tensor"):
        torch.ops.csd.qlinear(torch.randn(1, 64), *nw, torch.tensor(4.0))
    with pytest.raises(ValueError, match="in_features=64"):
        torch.ops.csd.qlinear(torch.randn(1, 48), *nw, torch.tensor(4))


def test_device_mismatch_rejected():
    nw = _nested(32, 64, 32, 0)
    x = torch.randn(1, 64, device="meta")
    with pytest.raises(ValueError, match="share a device"):
        torch.ops.csd.qlinear(x, *nw, torch.tensor(4))


def test_qlinear_module_from_linear_shares_bias():
    lin = torch.nn.Linear(128, 64).to(torch.bfloat16)
    q = QLinear.from_linear(lin, bits=8, group_size=64)
    assert q.bias is lin.bias and q.bits.dtype == torch.int32 and q.bits.dim() == 0
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert _rel_err(q(x), lin(x)) < 0.02
    with pytest.raises(TypeError, match="nn.Linear"):
        QLinear.from_linear(torch.nn.Conv1d(2, 2, 1), bits=4)
    with pytest.raises(ValueError, match="bits"):
        QLinear.from_linear(lin, bits=5)


class _Decoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 128)
        self.b = torch.nn.Linear(128, 64, bias=False)

    def forward(self, x):
        return self.b(torch.nn.functional.silu(self.a(x)))


@torch.no_grad()
def test_changing_bits_every_step_never_recompiles():
    torch.manual_seed(0)
    model = _Decoder().to(torch.bfloat16)
    model.a = QLinear.from_linear(model.a, bits=4)
    model.b = QLinear.from_linear(model.b, bits=4)
    step = torch.compile(model, fullgraph=True)
    plans = [[8, 2], [2, 3], [3, 8], [4, 4]]
    counters.clear()
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    for i in range(20):
        plan = plans[i % 4] if i % 2 else [plans[i % 4][0]] * 2
        set_bits(model, plan)
        y = step(x)
        assert _rel_err(y, model(x)) < 1e-2  # compiled code sees the new widths
        x = torch.tanh(y)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0


_ISA_CHECK = r"""
import sys, torch
from csd_compile.kernels.qlinear import qlinear_ref
from csd_compile.quant.nested import quantize
worst = 0.0
for n in (16, 64, 128, 130, 192, 256, 576):
    for group in (32, 64):
        g = torch.Generator().manual_seed(n + group)
        nw = quantize(torch.randn(n, 2 * group, generator=g) * 0.1, group)
        for m in (1, 3, 4):
            x = torch.randn(m, 2 * group, generator=g).to(torch.bfloat16)
            for bits in (2, 3, 4, 8):
                b = torch.tensor(bits)
                r = qlinear_ref(x, *nw, b).float()
                y = torch.ops.csd.qlinear_cpu(x, *nw, b).float()
                worst = max(worst, ((y - r).norm() / r.norm()).item())
print(torch.backends.cpu.get_cpu_capability(), worst)
sys.exit(0 if worst < 6e-3 else 1)
"""


@pytest.mark.parametrize("capability", ["default", "avx2", None])
def test_pytorch_fallback_is_right_for_every_instruction_set(capability):
    """The fallback uses PyTorch's int4 CPU kernel, whose packed layout differs between the kernels
    PyTorch builds for each instruction set. ATen can be told to dispatch to a lower one
    (``ATEN_CPU_CAPABILITY``), so this machine runs the AVX2 and the plain kernels too (None: its
    own best), each checked against the reference for N multiples of 64 and not."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    proc = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
