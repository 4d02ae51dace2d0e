"""The benchmark harness: every system on the same prompts, interleaved, after warm-up.

A system is one small function registered with ``@system(name, description)``: it receives the
:class:`BenchContext` and returns a runner ``run(input_ids [1, S]) -> dict`` whose dict holds at
least ``ids`` (prompt + new tokens, ``[1, S + n]``) and may add ``mean_accepted`` etc. Timing
(:mod:`.timing`: warm-up, interleaved runs, medians), ratios against plain HF bf16 greedy, quality
(agreement with that baseline's tokens), JSON, markdown and the PNG chart are done here, once, for
all of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from csd_compile.data import load_prompts

from .roofline import Precision, measure_bandwidth, roofline_row
from .timing import measure, median_tok_s, warm_up

__all__ = ["BASELINE", "SYSTEMS", "BenchContext", "System", "run", "system"]

BASELINE = "hf-bf16"
Runner = Callable[[torch.Tensor], dict]


@dataclasses.dataclass
class System:
    name: str
    description: str
    setup: Callable[["BenchContext"], Runner]
    default: bool = True  # part of a plain `csd-compile bench`
    available: Callable[[], str | None] = lambda: None  # returns why it cannot run, or None
    plain: str | None = None  # the row's own plain decoding (same model and precision): a lossless row must match it
    precision: Precision | None = None  # what it reads per step (roofline); None: not applicable


SYSTEMS: dict[str, System] = {}


def system(name: str, description: str, *, default: bool = True, available=None, plain: str | None = None,
           precision: Precision | None = None):
    """Register a benchmark system: decorate ``setup(ctx) -> runner``. ``plain`` names the system
    whose greedy output a lossless speculative row must reproduce token for token (when both run,
    the table shows the speed ratio and how many outputs are identical). ``precision`` says what
    the row reads per decode step (weight format, dtype, drafting) for the roofline columns."""

    def deco(setup):
        SYSTEMS[name] = System(name, description, setup, default, available or (lambda: None), plain, precision)
        return setup

    return deco


@dataclasses.dataclass
class BenchContext:
    """What systems share: the model name, its tokenizer, fresh model copies on demand."""

    model_name: str
    max_new_tokens: int
    tokenizer: object = None
    max_cache_len: int = 256

    def load(self, dtype: str = "bf16"):
        """A fresh model instance (compiled systems must not share one: HF caches the compiled call)."""
        from csd_compile import load_model

        model, tokenizer = load_model(self.model_name, dtype=dtype)
        if self.tokenizer is None:
            self.tokenizer = tokenizer
        return model

    def greedy_kwargs(self) -> dict:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return dict(do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=pad)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# Every compiled row compiles the same HF forward (one code object) for its own model instance:
# Dynamo's default of 8 cache entries per code object suits one model, not a bench of a dozen.
@torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096)
def run(
    *,
    model_name: str,
    num_prompts: int = 8,
    max_new_tokens: int = 128,
    systems: list[str] | None = None,
    out_dir: Path = Path("bench_results"),
    warmup: bool = True,
    bandwidth_bytes: int | None = None,
) -> dict:
    """Run the benchmark and write ``results.json``, ``results.md`` and ``results.png`` to ``out_dir``.

    The machine's streaming-read bandwidth is measured after the warm-ups (``bandwidth_bytes``,
    default 8x the last-level cache, see :func:`roofline.measure_bandwidth`) and each row gets its
    memory roofline: bytes per token, the tok/s limit they allow, its fraction of that limit.
    """
    from csd_compile import load_model
    from csd_compile.models.hf_generate import encode_prompt

    from . import systems as _  # noqa: F401  (registers the systems)

    names = list(systems) if systems else [n for n, s in SYSTEMS.items() if s.default]  # never edit the caller's list
    if BASELINE not in names:
        names = [BASELINE] + names
    skipped = {}
    for n in list(names):
        why = SYSTEMS[n].available()
        if why:
            skipped[n] = why
            names.remove(n)
            print(f"[bench] skipping {n}: {why}", file=sys.stderr)

    _model, tokenizer = load_model(model_name, dtype="bf16", verbose=True)
    ctx = BenchContext(model_name=model_name, max_new_tokens=max_new_tokens, tokenizer=tokenizer)
    prompts = load_prompts(num_prompts)
    inputs = [encode_prompt(tokenizer, text, chat=True) for _, text in prompts]
    longest = max(x.shape[1] for x in inputs) + max_new_tokens + 16
    ctx.max_cache_len = max(ctx.max_cache_len, 256 * math.ceil(longest / 256))

    runners: dict[str, Runner] = {}
    setup_s: dict[str, float] = {}
    for n in names:
        t0 = time.perf_counter()
        runners[n] = SYSTEMS[n].setup(ctx)
        setup_s[n] = time.perf_counter() - t0
        if warmup:  # compiles happen here, outside the timed runs (measure's warm-up, one system at a time)
            setup_s[n] += warm_up({n: runners[n]}, inputs[0])[n]
        print(f"[bench] {n}: ready in {setup_s[n]:.1f}s (setup + warm-up)", file=sys.stderr, flush=True)

    bandwidth = measure_bandwidth(bandwidth_bytes)
    print(f"[bench] streaming read: {bandwidth['gb_s']:.1f} GB/s ({bandwidth['bytes'] / 2**20:.0f} MiB, "
          f"{bandwidth['threads']} threads)", file=sys.stderr, flush=True)

    timings = measure(runners, inputs, warmup=False, progress="bench")
    records: dict[str, list[dict]] = {}
    for n, recs in timings.records.items():
        records[n] = []
        for r in recs:
            out = r["output"]
            extra = {k: v for k, v in out.items() if k != "ids"}
            tokens = out["ids"][0, inputs[r["prompt"]].shape[1]:].tolist()
            records[n].append({k: v for k, v in r.items() if k != "output"} | {"tokens": tokens, **extra})

    base = {r["prompt"]: r["tokens"] for r in records[BASELINE]}
    summary = {}
    for n in names:
        recs = records[n]
        agree = [_common_prefix(r["tokens"], base[r["prompt"]]) / max(1, len(base[r["prompt"]])) for r in recs]
        row = {
            "description": SYSTEMS[n].description,
            "median_tok_s": median_tok_s(recs),
            "identical_to_baseline": sum(r["tokens"] == base[r["prompt"]] for r in recs),
            "mean_prefix_agreement": statistics.fmean(agree),
            "setup_s": setup_s[n],
        }
        for key in ("mean_accepted", "tokens_per_target_forward"):
            vals = [r[key] for r in recs if key in r]
            if vals:
                row[key] = statistics.fmean(vals)
        # roofline: KV positions read = prompt + mean generated position, averaged over the prompts
        context = statistics.fmean(inputs[r["prompt"]].shape[1] + (r["new_tokens"] - 1) / 2 for r in recs)
        row |= roofline_row(SYSTEMS[n].precision, _model, context_len=context, gb_s=bandwidth["gb_s"],
                            tok_s=row["median_tok_s"], tokens_per_target_forward=row.get("tokens_per_target_forward"))
        summary[n] = row
    for n in names:
        summary[n]["ratio_vs_baseline"] = summary[n]["median_tok_s"] / summary[BASELINE]["median_tok_s"]
        ref = SYSTEMS[n].plain
        if ref in records:
            own = {r["prompt"]: r["tokens"] for r in records[ref]}
            summary[n]["plain"] = ref
            summary[n]["ratio_vs_plain"] = summary[n]["median_tok_s"] / summary[ref]["median_tok_s"]
            summary[n]["identical_to_plain"] = sum(r["tokens"] == own[r["prompt"]] for r in records[n])

    result = {
        "model": model_name,
        "num_prompts": len(inputs),
        "max_new_tokens": max_new_tokens,
        "baseline": BASELINE,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "bandwidth": bandwidth,
        "summary": summary,
        "skipped": skipped,
        "prompts": [{"source": s, "prompt_tokens": x.shape[1]} for (s, _), x in zip(prompts, inputs)],
        "records": {n: [{k: v for k, v in r.items() if k != "tokens"} for r in recs] for n, recs in records.items()},
    }
    write_report(out_dir, "results", result, markdown_table(result), plot, tag="bench")
    return result


def write_report(out_dir: Path, stem: str, result: dict, table: str, plot_fn, *, tag: str) -> None:
    """``stem.json``, ``stem.md`` (``table``) and ``stem.png`` (``plot_fn(result, path)``) in ``out_dir``;
    the table goes to stdout too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{stem}.md").write_text(table + "\n")
    plot_fn(result, out_dir / f"{stem}.png")
    print(table)
    print(f"[{tag}] wrote {out_dir}/{stem}.json, {stem}.md, {stem}.png", file=sys.stderr)


def markdown_table(result: dict) -> str:
    lines = [
        f"{result['model']}, {result['num_prompts']} prompts (MT-Bench + HumanEval), {result['max_new_tokens']} new tokens,"
        f" greedy, {result['threads']} threads, torch {result['torch']}; medians, interleaved runs after warm-up.",
        "",
        _bandwidth_line(result.get("bandwidth")),
        "",
        "| system | tok/s (median) | vs HF bf16 | identical to HF bf16 | prefix agreement "
        "| accepted/step / tokens/target forward "
        "| vs its plain decoding | setup+warm-up s | weights | MB/token | roofline tok/s | of roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n = result["num_prompts"]
    for name, row in result["summary"].items():
        acc = (f"{row['mean_accepted']:.2f} / {row['tokens_per_target_forward']:.2f}"
               if "mean_accepted" in row and "tokens_per_target_forward" in row else "-")
        own = (f"{row['ratio_vs_plain']:.2f}x {row['plain']}, {row['identical_to_plain']}/{n} identical"
               if "plain" in row else "-")
        lines.append(
            f"| {name} | {row['median_tok_s']:.1f} | {row['ratio_vs_baseline']:.2f}x | {row['identical_to_baseline']}/{n}"
            f" | {row['mean_prefix_agreement']:.0%} | {acc} | {own} | {row['setup_s']:.0f} | {_roof_cells(row)} |"
        )
    for name, why in result.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} | | | | | | | | | | |")
    return "\n".join(lines)


def _bandwidth_line(bw: dict | None) -> str:
    if not bw:
        return "Memory bandwidth: not measured."
    llc = f", last-level cache {bw['llc_bytes'] / 2**20:.0f} MiB" if bw.get("llc_bytes") else ""
    return (f"Memory bandwidth (streaming read, sum of a {bw['bytes'] / 2**20:.0f} MiB fp32 tensor{llc}, "
            f"{bw['threads']} threads, median of {bw['repeats']}): **{bw['gb_s']:.1f} GB/s**"
            + (f" (fastest repeat {bw['gb_s_best']:.1f})" if "gb_s_best" in bw else "") + ". Roofline = bandwidth "
            "/ bytes per token (weights at their format + KV cache at prompt + mean generated position + embedding "
            "row + norms; speculative rows with a free draft: per target forward / tokens per target forward); "
            "tok/s above include the prefill, the roofline is decode only.")


def _roof_cells(row: dict) -> str:
    if "weights" not in row:
        return "- | - | - | -"
    mb = f"{row['bytes_per_token'] / 1e6:.1f}" if row.get("bytes_per_token") else f"n/a ({row['step_bytes']['total'] / 1e6:.1f}/step)"
    if row.get("roofline_tok_s") is None:
        return f"{row['weights']} | {mb} | n/a | n/a"
    return f"{row['weights']} | {mb} | {row['roofline_tok_s']:.0f} | {row['roofline_fraction']:.0%}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["summary"])
    speeds = [result["summary"][n]["median_tok_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    bars = ax.barh(names, speeds, color=["#888" if n == BASELINE else "#3a7" for n in names])
    for bar, n in zip(bars, names):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {result['summary'][n]['ratio_vs_baseline']:.2f}x", va="center")
    limits = [(i, result["summary"][n].get("roofline_tok_s")) for i, n in enumerate(names)]
    limits = [(i, v) for i, v in limits if v]
    if limits:
        ax.scatter([v for _, v in limits], [i for i, _ in limits], marker="|", s=300, color="k", label="memory roofline")
        ax.legend(loc="lower right")
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (median, end to end)")
    ax.set_title(f"{result['model']}: greedy decode, {result['max_new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
