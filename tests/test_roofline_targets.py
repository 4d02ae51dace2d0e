"""benchmarks.roofline_targets: its plan, bad arguments, and its verdicts read from the reports the
benchmarks it runs really write (the kernel's from a short real run)."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import roofline_targets as rt

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "benchmarks.roofline_targets", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_every_step_and_skips_llama_without_a_binary(tmp_path):
    proc = _run("--dry-run", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    for step in rt.STEPS:
        assert f"would run {step}:" in proc.stdout
    assert "skipped (no --llama-bench)" in proc.stdout
    assert not (tmp_path / "o").exists()  # a plan writes nothing


@pytest.mark.parametrize("argv, match", [
    (["--steps", "kernel,roofs"], "--steps 'kernel,roofs': each must be one of kernel, llama, bits, speculation, compile"),
    (["--steps", ""], "--steps '': each must be one of"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--llama-bench", "/no/such/llama-bench"], "--llama-bench /no/such/llama-bench: no such file"),
])
def test_bad_arguments_are_refused_before_any_work(argv, match, tmp_path):
    proc = _run(*argv, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert match in proc.stderr
    assert not (tmp_path / "o").exists()


def test_kernel_verdicts_from_a_real_micro_run(tmp_path):
    shapes = {(128, 64): 3, (64, 96): 2}
    out = tmp_path / "kernel.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.qlinear_micro", "--rows", "1", "--bits", "4",
                           "--repeats", "1", "--pool-mib", "1", "--sample-ms", "0.2",
                           "--shapes", *[f"{n}x{k}" for n, k in shapes], "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    rows = rt.kernel_targets(report, shapes)
    simd = [p for p in report["kernel_paths"] if p != "scalar"]
    assert len(rows) == len(simd)
    for path, row in zip(simd, rows):
        assert f"`{path}`" in row["target"]
        mine = {(r["n"], r["k"]): r for r in report["rows"] if r["kernel"] == f"native/{path}/fp16"}
        dense = {(r["n"], r["k"]): r for r in report["rows"] if r["kernel"] == "dense bf16"}
        # the step's weighting: bytes over time, each shape counted as often as a token calls it
        rate = (sum(mine[s]["bytes"] * c for s, c in shapes.items())
                / sum(mine[s]["us"] * 1e-6 * c for s, c in shapes.items()) / 1e9)
        assert row["values"]["of_bandwidth"] == pytest.approx(rate / report["bandwidth_gb_s"])
        assert row["values"]["min_vs_dense_bf16"] == pytest.approx(min(dense[s]["us"] / mine[s]["us"] for s in shapes))
        met = row["values"]["of_bandwidth"] >= 0.6 and row["values"]["min_vs_dense_bf16"] > 1.0
        assert row["verdict"] == ("met" if met else "missed")
    with pytest.raises(ValueError, match=r"expected \[\(64, 96\), \(128, 64\), \(256, 64\)\]"):
        rt.kernel_targets(report, {**shapes, (256, 64): 1})


def _kernel_report(rates, dense_us, bw=40.0):
    """A qlinear_micro report with one path whose rows stream at ``rates`` (fraction of ``bw`` per
    shape) and dense bf16 rows taking ``dense_us``."""
    rows = []
    for (n, k), frac, d in zip(rt.STEP_SHAPES, rates, dense_us):
        nbytes = n * k // 2 + n * (k // 32) * 4
        us = nbytes / (frac * bw * 1e9) * 1e6
        rows.append({"n": n, "k": k, "m": 1, "bits": 4, "kernel": "native/avx2/fp16", "us": us, "bytes": nbytes,
                     "gb_s": frac * bw, "of_bandwidth": frac, "vs_dense_bf16": d / us})
        rows.append({"n": n, "k": k, "m": 1, "bits": None, "kernel": "dense bf16", "us": d, "bytes": n * k * 2,
                     "gb_s": 0.0, "of_bandwidth": 0.0, "vs_dense_bf16": 1.0})
    return {"bandwidth_gb_s": bw, "kernel_paths": ["scalar", "avx2"], "default_path": "avx2", "rows": rows}


def test_kernel_verdict_needs_both_the_bandwidth_and_every_shape_faster_than_dense():
    rng = random.Random(7)
    fast = [rng.uniform(0.62, 0.95) for _ in rt.STEP_SHAPES]
    slow_dense = [1e4] * len(rt.STEP_SHAPES)
    (row,) = rt.kernel_targets(_kernel_report(fast, slow_dense))
    assert row["verdict"] == "met" and "forced" not in row["target"]
    assert min(fast) <= row["values"]["of_bandwidth"] <= max(fast)
    (row,) = rt.kernel_targets(_kernel_report([rng.uniform(0.2, 0.55) for _ in fast], slow_dense))
    assert row["verdict"] == "missed"
    (row,) = rt.kernel_targets(_kernel_report(fast, [1e4, 1e4, 1e-3, 1e4]))  # dense faster at one shape
    assert row["verdict"] == "missed" and row["values"]["min_vs_dense_bf16"] < 1.0


def test_step_verdicts_follow_their_thresholds():
    def bits(four, eight, own):
        return {"bits": {"4": {"ms_per_token": four, "mb_per_token": 98.8, "vs_first_rounds": 1.0,
                               "rounds_ms": [four * 0.97, four, four * 1.2]},
                         "8": {"ms_per_token": eight, "mb_per_token": 152.0, "vs_first_rounds": own,
                               "rounds_ms": [eight, eight * 0.9, eight * 1.1]}}}

    (row,) = rt.bits_targets(bits(3.5, 4.97, 1.41))
    assert row["verdict"] == "met" and row["values"]["ratio"] == pytest.approx(4.97 / 3.5)
    assert "4-bit rounds 3.40-4.20, 8-bit rounds 4.47-5.47 ms" in row["figure"]  # the spread shows a noisy run
    (row,) = rt.bits_targets(bits(3.5, 4.7, 1.35))
    assert row["verdict"] == "missed"

    def llama(ours, theirs, frac):
        return {"ours_tok_s": ours, "llama_tok_s": theirs, "ratio": ours / theirs, "bandwidth_gb_s": [36.0, 41.0],
                "rounds": {"ours": [ours * 0.9, ours], "llama.cpp": [theirs, theirs * 1.1]},
                "roofline": {"ours": {"roofline_fraction": frac, "roofline_tok_s": 370.0, "bytes_per_token": 99e6},
                             "llama.cpp": {"roofline_fraction": 0.4, "roofline_tok_s": 368.0}}}

    assert [r["verdict"] for r in rt.llama_targets(llama(296.5, 145.4, 0.81))] == ["met", "met"]
    assert [r["verdict"] for r in rt.llama_targets(llama(140.0, 145.4, 0.69))] == ["missed", "missed"]
    assert [r["verdict"] for r in rt.llama_targets(None)] == ["not run"]

    def spec(ratio, identical):
        row = {"median_tok_s": 80.0 * ratio, "ratio_vs_plain": ratio, "identical_to_plain": identical,
               "mean_accepted": 2.8}
        return {"num_prompts": 4, "summary": {"csd-int8-fp32-graph": {"median_tok_s": 80.0},
                                              "csd-int8-self-graph": row,
                                              "csd-int8-self-csd-graph": {**row, "ratio_vs_plain": 1.02}}}

    assert rt.speculation_targets(spec(1.6, 4))[0]["verdict"] == "met"
    assert rt.speculation_targets(spec(1.6, 3))[0]["verdict"] == "missed"  # not lossless
    assert rt.speculation_targets(spec(0.8, 4))[0]["verdict"] == "missed"
    assert rt.compile_targets(85.0)[0]["verdict"] == "met"
    assert rt.compile_targets(150.0)[0]["verdict"] == "missed"


def test_compile_seconds_reads_generates_own_summary_line():
    proc = subprocess.run([sys.executable, "-m", "csd_compile", "generate", "--no-compile", "--max-new-tokens", "2",
                           "--prompt", "Hello"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert rt.compile_seconds(proc.stderr) == 0.0  # --no-compile prints "| compile 0.0 s |"
    with pytest.raises(ValueError, match="no '| compile N s |'"):
        rt.compile_seconds("[csd-compile] prompt tokens 3 | new tokens 2 | 9.0 tok/s")
