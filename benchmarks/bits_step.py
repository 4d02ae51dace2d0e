"""Decode-only step time at each bit-width, side by side in one process: does the step track bytes?

    python -m benchmarks.bits_step [--bits 4 8] [--group-size 32] [--rounds 9] [--threads 2] [--no-graph]
        [--json PATH]

One ``GreedyDecoder`` per bit-width over its own copy of the embedded model (``backend="csd"``,
``bits=b, group_size=g``, ``mode="reduce-overhead"`` unless ``--no-graph``), all warmed up first,
then rounds that time each decoder in turn (the order alternates from round to round, so a machine
whose speed drifts slows every side alike). Decode-only ms/token = (time of a 53-token prompt + 97
new tokens - time of the same call stopped after 1 token) / 96. Prints each width's median, its
weight bytes per token (linears at their width with their scale and zero per group, fp32 or the
fp16 that a GGUF Q4 file's grid gets (``csd_compile.bench.roofline.step_bytes``), the LM head as
the file stores it) and each width's time relative to the first, as the ratio of the medians and the
median of the rounds' own ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch


def _ms_per_token(dec, ids) -> float:
    t0 = time.perf_counter()
    dec(ids, max_new_tokens=97, eos_token_id=[])
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec(ids, max_new_tokens=1, eos_token_id=[])
    return (full - (time.perf_counter() - t0)) / 96 * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-graph", action="store_true", help="without mode='reduce-overhead' (no CPU graph)")
    ap.add_argument("--json", help="also write each width's figures here (JSON)")
    args = ap.parse_args(argv)
    from csd_compile.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

    bad = [b for b in args.bits if b not in SUPPORTED_BITS]
    if bad or len(set(args.bits)) != len(args.bits) or len(args.bits) < 2:
        raise SystemExit(f"--bits must be two or more distinct widths from {list(SUPPORTED_BITS)}, got {args.bits}")
    if args.group_size not in SUPPORTED_GROUP_SIZES:
        raise SystemExit(f"--group-size must be one of {list(SUPPORTED_GROUP_SIZES)}, got {args.group_size}")
    if args.rounds < 1 or args.threads < 1:
        raise SystemExit("--rounds and --threads must be >= 1")

    from csd_compile.bench.roofline import step_bytes
    from csd_compile.models.greedy import GreedyDecoder
    from csd_compile.models.loader import load_model

    torch.set_num_threads(args.threads)
    ids = torch.tensor([[random.Random(0).randrange(100, 20000) for _ in range(53)]])
    decoders, mb = {}, {}
    for b in args.bits:
        model, _ = load_model(dtype="bf16")
        options = {"bits": b, "group_size": args.group_size}
        if not args.no_graph:
            options["mode"] = "reduce-overhead"
        t = time.perf_counter()
        decoders[b] = GreedyDecoder(model, backend="csd", options=options)
        decoders[b].warm_up(ids, max_new_tokens=97)
        mb[b] = step_bytes(model, bits=b, group_size=args.group_size, context_len=53 + 48)["total"] / 1e6
        print(f"bits={b}: options {options}, warm-up (compile) {time.perf_counter() - t:.1f} s", flush=True)
    times: dict[int, list[float]] = {b: [] for b in args.bits}
    for r in range(args.rounds):
        for b in (args.bits if r % 2 == 0 else args.bits[::-1]):
            times[b].append(_ms_per_token(decoders[b], ids))
    first = args.bits[0]
    print(f"\n{args.threads} threads, prompt 53, 96 decoded tokens, {args.rounds} rounds, group size {args.group_size}, "
          f"{'no CPU graph' if args.no_graph else 'CPU graph'}")
    widths = {}
    for b in args.bits:
        med = statistics.median(times[b])
        own = statistics.median(x / y for x, y in zip(times[b], times[first]))
        print(f"bits={b}: median {med:.2f} ms/token ({1e3 / med:.1f} tok/s), {mb[b]:.1f} MB/token; "
              f"vs bits={first}: {med / statistics.median(times[first]):.2f}x (rounds' own ratios {own:.2f}x)  "
              f"{[round(x, 2) for x in times[b]]}")
        widths[b] = {"ms_per_token": med, "mb_per_token": mb[b], "vs_first": med / statistics.median(times[first]),
                     "vs_first_rounds": own, "rounds_ms": times[b]}
    if args.json:
        report = {"threads": args.threads, "rounds": args.rounds, "group_size": args.group_size,
                  "cpu_graph": not args.no_graph, "first": first, "bits": widths}
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
