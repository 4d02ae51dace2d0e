"""The tensor-parallel check for a machine with 2+ CUDA devices: ``python -m benchmarks.tp_gpu_check``.

CI covers tensor parallel on CPU (gloo, ``tests/parallel``). On GPUs what is left to check is NCCL
and Inductor's Triton path with the functional all-reduce in the graph: ``generate --tp
--tp-backend nccl -o bits=4`` over N devices prints the same text as the single-process command
(fp32, compared with the CPU run, which CI already ties to TP on gloo), and its tok/s against one
device. Writes ``tp_gpu_check.json`` to ``--out``. ``--dry-run`` prints the commands only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Explain in three sentences why the sky is blue."


def commands(world: int, new_tokens: int) -> dict[str, list[str]]:
    args = ["-m", "csd_compile", "generate", "--prompt", PROMPT, "--max-new-tokens", str(new_tokens),
            "--dtype", "fp32", "-o", "bits=4"]
    return {
        "one-process-cpu": [sys.executable, *args],
        f"tp{world}-nccl": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                            *args, "--tp", "--tp-backend", "nccl"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default="tp_gpu_check")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    cmds = commands(args.world, args.max_new_tokens)
    if args.dry_run:
        for name, cmd in cmds.items():
            print(name + ": " + " ".join(cmd))
        return 0
    import torch

    if torch.cuda.device_count() < args.world:
        print(f"needs {args.world} CUDA devices, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    runs = {}
    for name, cmd in cmds.items():
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        stats = [line for line in proc.stderr.splitlines() if "| new tokens" in line]
        runs[name] = {"rc": proc.returncode, "text": proc.stdout, "stats": stats[-1] if stats else proc.stderr[-2000:],
                      "wall_s": time.perf_counter() - t0}
    texts = [r["text"] for r in runs.values()]
    result = {"world": args.world, "same_text": len(set(texts)) == 1 and all(r["rc"] == 0 for r in runs.values()),
              "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tp_gpu_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v["stats"] for k, v in runs.items()} | {"same_text": result["same_text"]}, indent=1))
    return 0 if result["same_text"] else 1


if __name__ == "__main__":
    sys.exit(main())
