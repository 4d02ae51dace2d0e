"""One GPU check, for a session lent a CUDA device: ``make gpu-check`` (or ``python -m benchmarks.gpu_check``).

Runs the CUDA tests (``tests/cuda``: the Triton kernels against their references on many shapes,
not interpreted, the backend end to end on the embedded model, and its decode step replayed as a
CUDA graph), then times greedy decoding on the device (Inductor bf16 against ``backend="csd"``
unquantized, 8 and 4 bits, HF static cache; and the 4-bit step in our own loop, ``GreedyDecoder``,
with and without ``mode="reduce-overhead"``), and writes everything to one folder (``--out``). It
is sized for one H200 in well under 8 minutes. ``--dry-run`` (what CI runs on CPU) checks that
every piece imports and prints the plan without a device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STEPS = [
    ("cuda tests", [sys.executable, "-m", "pytest", "-q", "tests/cuda", "-p", "no:cacheprovider"]),
    ("decode timing", [sys.executable, "-m", "benchmarks.gpu_check", "--time-decode"]),
]
ROWS = {"inductor-bf16": ("inductor", None), "csd-bf16": ("csd", None), "csd-int8": ("csd", 8), "csd-int4": ("csd", 4)}


def time_decode(new_tokens: int = 128, repeats: int = 3) -> dict:
    """tok/s of HF greedy decoding on the device (static cache, decode step compiled), median of
    ``repeats`` after a warm-up, for each row of :data:`ROWS`, same prompt, interleaved."""
    import statistics

    import torch

    from csd_compile import load_model
    from csd_compile.models.hf_generate import compile_config, encode_prompt

    runs = {}
    for name, (backend, bits) in ROWS.items():
        model, tok = load_model("smollm2-135m-instruct", dtype="bf16")
        model = model.to("cuda")
        ids = encode_prompt(tok, "Write a Python function that returns the n-th Fibonacci number.", chat=True).to("cuda")
        options = {"bits": bits, "group_size": 32} if bits else {}
        kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.eos_token_id,
                  cache_implementation="static", compile_config=compile_config(options, backend=backend))
        with torch.inference_mode():
            model.generate(ids, **kw)  # compile
        runs[name] = (model, ids, kw)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (model, ids, kw) in runs.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, **kw)
            torch.cuda.synchronize()
            times[name].append(new_tokens / (time.perf_counter() - t0))
    result = {name: statistics.median(v) for name, v in times.items()}
    result.update(time_loop(new_tokens, repeats))
    return result


def time_loop(new_tokens: int, repeats: int) -> dict:
    """tok/s of our greedy loop (``GreedyDecoder``) over the 4-bit step on the device, with and
    without CUDA graphs (``mode="reduce-overhead"``), interleaved, and whether their tokens agree."""
    import statistics

    import torch

    from csd_compile import load_model
    from csd_compile.models.greedy import GreedyDecoder
    from csd_compile.models.hf_generate import encode_prompt

    base = {"bits": 4, "group_size": 32}
    loops = {}
    for name, options in (("csd-int4-loop", base), ("csd-int4-loop-cudagraphs", {**base, "mode": "reduce-overhead"})):
        model, tok = load_model("smollm2-135m-instruct", dtype="bf16")  # a model each: one step graph per loop
        loops[name] = GreedyDecoder(model.to("cuda"), backend="csd", options=options)
    ids = encode_prompt(tok, "Write a Python function that returns the n-th Fibonacci number.", chat=True).to("cuda")
    outs = {name: loop(ids, max_new_tokens=new_tokens, eos_token_id=[]) for name, loop in loops.items()}  # compile
    times = {name: [] for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loop(ids, max_new_tokens=new_tokens, eos_token_id=[])
            torch.cuda.synchronize()
            times[name].append(new_tokens / (time.perf_counter() - t0))
    result = {name: statistics.median(v) for name, v in times.items()}
    result["cudagraphs_same_tokens"] = torch.equal(*outs.values())
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check", help="folder for the log and results (default gpu_check)")
    ap.add_argument("--dry-run", action="store_true", help="no device: import everything, print the plan")
    ap.add_argument("--time-decode", action="store_true", help="only the decode timing (prints JSON)")
    args = ap.parse_args(argv)
    if args.time_decode:
        print(json.dumps(time_decode()))
        return 0
    import torch

    import tests.cuda.test_cuda_kernels  # noqa: F401  (the tests import)

    out = Path(args.out)
    if args.dry_run:
        for name, cmd in STEPS:
            print(f"[gpu-check] would run {name}: {' '.join(cmd[1:])}")
        print(f"[gpu-check] dry run: CUDA available here: {torch.cuda.is_available()}")
        return 0
    if not torch.cuda.is_available():
        print("[gpu-check] no CUDA device: run with --dry-run on CPU", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(0), "steps": {}}
    for name, cmd in STEPS:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        report["steps"][name] = {"returncode": proc.returncode, "seconds": time.perf_counter() - t0,
                                 "tail": (proc.stdout + proc.stderr)[-4000:]}
        print(f"[gpu-check] {name}: exit {proc.returncode} in {time.perf_counter() - t0:.0f}s", flush=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return max(s["returncode"] for s in report["steps"].values())


if __name__ == "__main__":
    sys.exit(main())
