"""``import csd_compile`` and every CPU path work where triton is not installed."""

import subprocess
import sys

_SCRIPT = r"""
import sys

class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is not installed here")

sys.meta_path.insert(0, _NoTriton())
import torch
import csd_compile
from csd_compile.kernels import gate, qlinear
from csd_compile.quant.nested import quantize
from tests.conftest import make_tiny_llama

assert not csd_compile.kernels._triton.HAS_TRITON
g = torch.Generator().manual_seed(0)
nw = quantize(torch.randn(96, 64, generator=g), 32)
x = torch.randn(3, 64, generator=g)
for bits in (2, 3, 4, 8):
    b = torch.tensor(bits)
    torch.testing.assert_close(torch.ops.csd.qlinear(x, *nw, b), qlinear.qlinear_ref(x, *nw, b), rtol=1e-5, atol=1e-5)
mem = csd_compile.CorrectionMemory(num_buckets=16, ways=4)
drafts, logits = torch.randint(0, 50, (2, 3), generator=g), torch.randn(2, 4, 50, generator=g)
out, n = torch.ops.csd.gate(drafts, logits, mem.keys.clone(), mem.counts.clone(), 6.0, -1.0, True)
ref, n_ref = gate.gate_ref(drafts, logits, mem.keys.clone(), mem.counts.clone(), 6.0, -1.0)
assert torch.equal(out, ref) and torch.equal(n, n_ref)
model = make_tiny_llama()
ids = torch.randint(0, 128, (1, 5), generator=g)
with torch.no_grad():
    y = torch.compile(model, backend="csd", options={"bits": 8, "group_size": 32}, fullgraph=True)(ids).logits
    torch.testing.assert_close(y, model(ids).logits, rtol=0.05, atol=0.05)
try:
    qlinear.qlinear_triton(x, *nw, torch.tensor(4))
except RuntimeError as e:
    assert "triton is not installed" in str(e)
else:
    raise AssertionError("the Triton launcher ran without triton")
assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules)
print("ok")
"""


def test_package_imports_and_runs_on_cpu_without_triton():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]
