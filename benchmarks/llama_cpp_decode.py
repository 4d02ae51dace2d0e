"""Decode-only speed against llama.cpp's own ``llama-bench``, side by side in one run.

    python -m benchmarks.llama_cpp_decode --llama-bench /path/to/llama-bench [--rounds 5] [--threads 2] [--json PATH]

Both decode the embedded GGUF (SmolLM2-135M-Instruct, Q4_1 linears, Q8_0 LM head) after the same
prompt length, with the same thread count; rounds alternate between the two so that a noisy
machine slows both alike, and medians are reported with their ratio.

- llama.cpp: ``llama-bench -m FILE -t T -p 0 -n N -d P -r 1 -o json``: N tokens generated after a
  context of P tokens (decode only, prompt processing excluded), one repetition per round.
- ours: ``GreedyDecoder`` with ``backend="csd"`` on a bf16 model and ``--options`` (default
  ``bits=auto``: every weight at its file's own grid; ``bits=4,group_size=32`` is the issue's row
  with a bf16 LM head), decode-only ms/token = (time of P-prompt + N-token call - time of the
  P-prompt + 1-token call) / (N - 1), median over ``--inner`` call pairs per round.

Each round also measures the memory bandwidth (the bench's streaming read, same thread count, on
a buffer allocated for that sample): on the development VM one sample differs from the next by as
much as 35 against 57 GB/s, with where the buffer's pages land rather than with the minute, so the
roofline uses the median of the rounds' samples and prints their range. The run prints each side's
roofline: bandwidth / bytes per decoded token
(``csd_compile.bench.roofline``; ours at the options' precision, the KV cache at the mean position,
llama.cpp at the file's Q4_1 linears and Q8_0 head with its fp16 cache), and each median as a
fraction of ours (the issue's figure) and of its own.

llama-bench is not built by this project: build llama.cpp yourself (for the CPUs of the development
machines, see the README's kernel section for the cmake flags that run there).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch


def _llama_round(binary: str, gguf: Path, threads: int, n: int, depth: int) -> float:
    cmd = [binary, "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(n), "-d", str(depth), "-r", "1",
           "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    rows = [r for r in json.loads(out) if r.get("n_gen") == n]
    if len(rows) != 1:
        raise RuntimeError(f"llama-bench printed {len(rows)} generation rows; expected one:\n{out[:2000]}")
    return float(rows[0]["avg_ts"])


def _parse_options(text: str) -> dict:
    """``k=v[,k=v]``, each value read as ``csd-compile generate -o`` reads it (JSON: 4, true, 0.5;
    else the bare string, e.g. reduce-overhead)."""
    from csd_compile.cli import _option

    try:
        return dict(_option(item.strip()) for item in filter(None, text.split(",")))
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"--options {text!r}: {e}") from None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bench", required=True, help="path of a llama-bench binary")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inner", type=int, default=3, help="our call pairs per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=53, help="prompt tokens before decoding")
    ap.add_argument("--tokens", type=int, default=96, help="tokens decoded per measurement")
    ap.add_argument("--options", default="bits=auto", help="backend options, k=v[,k=v]")
    ap.add_argument("--json", help="also write the medians, rounds and rooflines here (JSON)")
    args = ap.parse_args(argv)
    binary = Path(args.llama_bench)
    if not binary.is_file():
        raise SystemExit(f"--llama-bench {binary}: no such file")
    for name in ("rounds", "inner", "threads", "prompt", "tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")

    from csd_compile.models import EMBEDDED_MODELS
    from csd_compile.models.greedy import GreedyDecoder
    from csd_compile.models.loader import DEFAULT_MODEL, load_model

    gguf = EMBEDDED_MODELS[DEFAULT_MODEL].gguf_path()
    torch.set_num_threads(args.threads)
    options = _parse_options(args.options)
    model, _ = load_model(dtype="bf16")
    dec = GreedyDecoder(model, backend="csd", options=options)
    rng = random.Random(0)
    ids = torch.tensor([[rng.randrange(100, 20000) for _ in range(args.prompt)]])
    t = time.perf_counter()
    dec.warm_up(ids, max_new_tokens=args.tokens + 1)
    print(f"ours: options {options}, warm-up (compile) {time.perf_counter() - t:.1f} s", flush=True)

    def ours() -> float:
        per = []
        for _ in range(args.inner):
            t0 = time.perf_counter()
            dec(ids, max_new_tokens=args.tokens + 1, eos_token_id=[])
            a = time.perf_counter() - t0
            t0 = time.perf_counter()
            dec(ids, max_new_tokens=1, eos_token_id=[])
            b = time.perf_counter() - t0
            per.append(args.tokens / (a - b))
        return statistics.median(per)

    from csd_compile.bench.roofline import measure_bandwidth

    llama, mine, bandwidth = [], [], []
    _llama_round(str(binary), gguf, args.threads, args.tokens, args.prompt)  # warm the file cache
    for r in range(args.rounds):
        llama.append(_llama_round(str(binary), gguf, args.threads, args.tokens, args.prompt))
        mine.append(ours())
        bandwidth.append(measure_bandwidth(repeats=3, threads=args.threads))
        print(f"round {r + 1}: llama.cpp {llama[-1]:.1f} tok/s, ours {mine[-1]:.1f} tok/s, "
              f"streaming read {bandwidth[-1]['gb_s']:.1f} GB/s", flush=True)
    lm, om = statistics.median(llama), statistics.median(mine)
    print(f"\n{args.threads} threads, prompt {args.prompt}, {args.tokens} decoded tokens, {args.rounds} rounds")
    print(f"llama.cpp (llama-bench tg{args.tokens} @ d{args.prompt}): median {lm:.1f} tok/s  {sorted(round(v, 1) for v in llama)}")
    print(f"ours (GreedyDecoder, csd {args.options}): median {om:.1f} tok/s  {sorted(round(v, 1) for v in mine)}")
    print(f"ours / llama.cpp: {om / lm:.2f}x")
    rows = roofline(model, options, args, {"ours": om, "llama.cpp": lm}, bandwidth)
    if args.json:
        report = {"threads": args.threads, "prompt": args.prompt, "tokens": args.tokens, "options": options,
                  "ours_tok_s": om, "llama_tok_s": lm, "ratio": om / lm, "rounds": {"ours": mine, "llama.cpp": llama},
                  "bandwidth_gb_s": [b["gb_s"] for b in bandwidth], "roofline": rows}
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


def _precision(options: dict):
    """The bench's precision of a decoder compiled with ``options`` on the bf16 model; None for
    ``bits="dynamic"`` (its bytes per token change with every token)."""
    from csd_compile.bench.roofline import Precision
    from csd_compile.config import CSDConfig

    if options.get("bits") == "dynamic":
        return None
    cfg = CSDConfig.from_options({k: v for k, v in options.items() if k in ("bits", "group_size",
                                                                             "quantize_lm_head")})
    return Precision(bits=cfg.bits, group_size=cfg.group_size, dtype="bf16", quantize_lm_head=cfg.quantize_lm_head)


def roofline(model, options: dict, args, tok_s: dict, samples: list[dict] | None = None) -> dict:
    """Each side's roofline and each median's fraction of it (module doc), at the median of the
    rounds' bandwidth ``samples`` (``measure_bandwidth`` results), or at one measured now when none
    are given."""
    from csd_compile.bench.roofline import GGUF_Q4_1, GGUF_Q8_0, Precision, measure_bandwidth, roofline_row

    if samples:
        rates = sorted(b["gb_s"] for b in samples)
        bw = {**samples[0], "gb_s": statistics.median(rates)}
        how = (f"median of {len(rates)} rounds' samples (each the median of {samples[0]['repeats']}), "
               f"range {rates[0]:.1f}-{rates[-1]:.1f}")
    else:
        bw = measure_bandwidth(threads=args.threads)
        how = f"median of {bw['repeats']}"
    context = args.prompt + (args.tokens - 1) / 2
    llama = Precision(dtype="fp32", weight_format=GGUF_Q4_1, head_format=GGUF_Q8_0, kv_dtype="fp16")
    ours = _precision(options)
    rows = {name: roofline_row(precision, model, context_len=context, gb_s=bw["gb_s"], tok_s=tok_s[name])
            for name, precision in (("ours", ours), ("llama.cpp", llama))}
    if ours is None:
        rows["ours"]["roofline_note"] = "bits=dynamic: its bytes change from token to token"
    limit = rows["ours"]["roofline_tok_s"]
    print(f"\nmemory bandwidth (streaming read of {bw['bytes'] / 2**20:.0f} MiB, {bw['threads']} threads, {how}): "
          f"{bw['gb_s']:.1f} GB/s")
    for name, row in rows.items():
        if row["roofline_tok_s"] is None:
            print(f"{name}: no roofline ({row.get('roofline_note')})")
            continue
        of_ours = f" = {tok_s[name] / limit:.0%} of ours," if limit else ""
        print(f"{name}: {row['weights']}, {row['bytes_per_token'] / 1e6:.1f} MB/token, roofline "
              f"{row['roofline_tok_s']:.0f} tok/s; median {tok_s[name]:.1f} tok/s{of_ours} "
              f"{row['roofline_fraction']:.0%} of its own")
    return rows


if __name__ == "__main__":
    main()
