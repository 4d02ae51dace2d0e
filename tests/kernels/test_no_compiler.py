"""Without a C++ compiler the CPU op warns once and computes the right values with PyTorch ops."""

import os
import subprocess
import sys

_SCRIPT = r"""
import warnings, torch
from csd_compile.kernels import native
from csd_compile.kernels.qlinear import qlinear_ref
from csd_compile.quant.nested import quantize

g = torch.Generator().manual_seed(0)
worst = 0.0
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    # the embedded model's linear shapes (q/o, k/v, gate/up, down) and a verify pass's rows
    for n, k in ((576, 576), (192, 576), (1536, 576), (576, 1536)):
        nw = quantize(torch.randn(n, k, generator=g) * 0.05, 32)
        for dtype in (torch.bfloat16, torch.float32):
            for m in (1, 5, 17):
                x = torch.randn(m, k, generator=g).to(dtype)
                for bits in (2, 3, 4, 8):
                    b = torch.tensor(bits)
                    y = torch.ops.csd.qlinear(x, *nw, b).float()
                    r = qlinear_ref(x, *nw, b).float()
                    worst = max(worst, ((y - r).norm() / r.norm()).item())
ours = [w for w in caught if issubclass(w.category, native.NativeBuildWarning)]
print("available", native.available(), "warnings", len(ours), "worst", worst)
print(ours[0].message if ours else "")
assert not native.available()
assert len(ours) == 1, [str(w.message) for w in caught]
assert "C++" in str(ours[0].message)
assert worst < 6e-3, worst
"""


def test_missing_compiler_warns_once_and_falls_back_correctly(tmp_path):
    env = dict(os.environ)
    env["CXX"] = str(tmp_path / "no-such-compiler")  # what torch's extension builder invokes
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext")  # no earlier build to reuse
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warnings 1" in proc.stdout


def test_disable_forces_the_pytorch_path_and_refuses_once_loaded():
    script = r"""
import torch
from csd_compile.kernels import native
from csd_compile.kernels.qlinear import qlinear_ref
from csd_compile.quant.nested import quantize
native.disable()
nw = quantize(torch.randn(64, 64), 32)
x = torch.randn(2, 64)
torch.testing.assert_close(torch.ops.csd.qlinear(x, *nw, torch.tensor(4)), qlinear_ref(x, *nw, torch.tensor(4)),
                           rtol=1e-5, atol=1e-5)
from csd_compile.kernels.attention import attention_ref
q, k, v = torch.randn(1, 4, 2, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
mask = torch.arange(9).view(1, 1, 1, 9) < 5
torch.testing.assert_close(torch.ops.csd.decode_attention(q, k, v, mask, 0.25), attention_ref(q, k, v, mask, 0.25))
assert not native.available() and native.isa() is None
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
    from csd_compile.kernels import native

    assert native.load()
    import pytest

    with pytest.raises(RuntimeError, match="already loaded"):
        native.disable()
