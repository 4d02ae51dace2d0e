"""The done-when command: ``torchrun --nproc-per-node 2 -m csd_compile generate --tp -o bits=4`` on the
embedded model prints (rank 0 only) the same text as the single-process command (fp32, 16 tokens)."""

import os
import subprocess
import sys
from pathlib import Path

from tests.parallel._spawn import free_port

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["generate", "--prompt", "The three primary colours are", "--max-new-tokens", "16", "--dtype", "fp32",
        "-o", "bits=4"]


def _run(launcher: list[str], threads: int, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, *launcher, "-m", "csd_compile", *ARGS, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_torchrun_tp2_prints_the_single_process_text():
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    tp = _run(torchrun, 1, "--tp")  # one core per rank
    one = _run([], 2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert one.stdout.strip() and tp.stdout == one.stdout  # the text, printed once (rank 0)
    assert "tensor parallel: 2 ranks (gloo)" in tp.stderr and "| tp 2 ranks" in tp.stderr
    assert tp.stderr.count("[csd-compile] prompt tokens") == 1
