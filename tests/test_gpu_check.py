"""The GPU check starts on CPU in its dry mode (CI cannot run it for real: no device)."""

import subprocess
import sys
from pathlib import Path


def test_gpu_check_dry_run_imports_everything_and_prints_the_plan():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "would run cuda tests" in proc.stdout and "would run decode timing" in proc.stdout
