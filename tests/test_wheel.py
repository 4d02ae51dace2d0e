"""The built wheel on its own: ``csd-compile bench`` runs from a fresh venv, outside the source tree.

The wheel is built offline from a copy of the sources (pip, no build isolation), installed with
``--no-deps`` into a new venv, and the running interpreter's site-packages are appended to that
venv through a ``.pth`` file so torch, transformers and the data packages need no download. A
plain path line in a ``.pth`` file only appends to ``sys.path``: the ``.pth`` files of the
appended folder (among them this checkout's editable install) are not processed, so the
package that runs is the wheel's, which the test checks.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_FILES = ["csd_compile/bench/__init__.py", "csd_compile/bench/harness.py",
               "csd_compile/bench/systems.py", "csd_compile/bench/prompts.py",
               "csd_compile/kernels/csrc/qlinear_cpu.cpp", "csd_compile/kernels/csrc/attention_cpu.cpp",
               "csd_compile/kernels/csrc/cpu_isa.h"]


def _run(cmd, timeout, **kw):
    """Run ``cmd``; fail with its output when it exits non-zero."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


def _parent_site_dirs() -> list[str]:
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel path, venv folder, env for its commands): the wheel built from a copy of the sources
    (so no build/ or .egg-info lands in the checkout, and no stale build/ leaks into the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "csd_compile", src / "csd_compile",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-q", "-w", tmp / "dist", src], timeout=600)
    wheels = list((tmp / "dist").glob("csd_compile-*.whl"))
    assert len(wheels) == 1, f"expected one csd_compile wheel in {tmp / 'dist'}, got {wheels}"

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], timeout=600)
    python = venv / "bin" / "python"
    # install before the .pth exists, so pip sees neither this environment nor its csd-compile
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", "-q",
          wheels[0]], timeout=600)
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=120)
    (Path(purelib.stdout.strip()) / "_csd_test_parent_env.pth").write_text("\n".join(_parent_site_dirs()) + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return wheels[0], venv, env


def test_the_wheel_ships_the_bench(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in BENCH_FILES if f not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    assert not any(n.startswith("benchmarks/") for n in names), "the research scripts are not part of the wheel"


@pytest.mark.slow
def test_installed_bench_runs_outside_the_source_tree(installed, tmp_path):
    _, venv, env = installed
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    probe = _run([venv / "bin" / "python", "-c",
                  "import importlib.util, csd_compile; s = importlib.util.find_spec('benchmarks'); "
                  "print(csd_compile.__file__); print(s.origin if s else '')"],
                 timeout=300, cwd=cwd, env=env)
    pkg_file, benchmarks_origin = (probe.stdout.splitlines() + ["", ""])[:2]
    assert Path(pkg_file).resolve().is_relative_to(venv.resolve()), f"csd_compile came from {pkg_file}, not the venv"
    assert not benchmarks_origin or not Path(benchmarks_origin).resolve().is_relative_to(ROOT), (
        f"the source tree's benchmarks/ is importable from the venv: {benchmarks_origin}")

    # the C++ kernels build from the wheel's own sources (every .cpp and the header they share)
    build_env = dict(env, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    _run([venv / "bin" / "python", "-c",
          "from csd_compile.kernels import native; assert native.load(); print(native.isa())"],
         timeout=600, cwd=cwd, env=build_env)

    cli = venv / "bin" / "csd-compile"
    help_ = _run([cli, "bench", "--help"], timeout=300, cwd=cwd, env=env)
    assert "--systems" in help_.stdout

    out = tmp_path / "results"
    _run([cli, "bench", "--prompts", "1", "--max-new-tokens", "4", "--systems", "hf-bf16", "--out", out],
         timeout=1200, cwd=cwd, env=env)
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).is_file(), f"{out / name} was not written"
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary) == {"hf-bf16"} and summary["hf-bf16"]["median_tok_s"] > 0
