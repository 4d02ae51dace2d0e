"""The ``csd-tp2`` bench row's ranks: a tensor-parallel model serving prompts from the harness.

Started by the row under ``torchrun`` (``python -m torch.distributed.run --nproc-per-node 2 -m
csd_compile.bench.tp_server ...``). Rank 0 reads one JSON list of prompt ids per line on stdin and
sends it to every rank; all ranks decode it (HF greedy, static cache, the csd backend with the
given options); rank 0 answers one JSON line ``{"tokens": [...], "seconds": s}`` on stdout.
An empty line or end of input stops every rank.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.distributed as dist

_REPLY = "csd-tp:"  # prefix of answer lines: anything else on stdout is not an answer


def main(argv: list[str] | None = None) -> int:
    from csd_compile import load_model, parallel
    from csd_compile.models.hf_generate import compile_config

    ap = argparse.ArgumentParser(prog="csd_compile.bench.tp_server")
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--options", default="{}", help="backend options as JSON")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--max-cache-len", type=int, required=True)
    ap.add_argument("--pad-token-id", type=int, required=True)
    args = ap.parse_args(argv)
    options = json.loads(args.options) or None

    info = parallel.init()
    full, _ = load_model(args.model, dtype=args.dtype)
    parallel.check_split(full.config, info.world, options)
    model = parallel.shard_model(full, info)
    del full
    kwargs = dict(do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=args.pad_token_id,
                  cache_implementation="static", max_cache_len=args.max_cache_len,
                  compile_config=compile_config(options))
    while True:
        box = [None]
        if info.rank == 0:
            line = sys.stdin.readline()
            box[0] = json.loads(line) if line.strip() else None
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            break
        ids = torch.tensor([box[0]], dtype=torch.int64)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            seconds = time.perf_counter() - t0
        if info.rank == 0:
            reply = {"tokens": out[0, ids.shape[1]:].tolist(), "seconds": seconds}
            print(_REPLY + json.dumps(reply), flush=True)
    parallel.close()
    return 0


class TPServer:
    """The harness's side: start the ranks, send prompts, read answers; :meth:`close` stops them."""

    def __init__(self, *, model: str, options: dict | None, max_new_tokens: int, max_cache_len: int,
                 pad_token_id: int, world: int = 2, dtype: str = "bf16"):
        import os
        import socket
        import subprocess

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        threads = max(1, (os.cpu_count() or world) // world)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
               str(port), "-m", "csd_compile.bench.tp_server", "--model", model, "--dtype", dtype,
               "--options", json.dumps(options or {}), "--max-new-tokens", str(max_new_tokens),
               "--max-cache-len", str(max_cache_len), "--pad-token-id", str(pad_token_id)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def __call__(self, ids: torch.Tensor) -> dict:
        self.proc.stdin.write(json.dumps(ids[0].tolist()) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        raise RuntimeError(f"the tensor-parallel ranks exited (status {self.proc.wait()}); see their output above")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, __import__("subprocess").TimeoutExpired):
                self.proc.kill()


if __name__ == "__main__":
    sys.exit(main())
