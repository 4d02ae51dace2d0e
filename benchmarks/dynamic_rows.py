"""FlexQuant frontier: dynamic precision vs static plans (average bits vs perplexity vs tok/s).

Rows (each gives ``tok_s``, ``texts``, ``ids``, ``avg_bits``, ``ppl``; the model passed in is the
unquantized bf16 model, never modified):

- ``full``: the bf16 model as is (reference for perplexity and greedy agreement);
- ``static8`` / ``static4``: every quantized linear at 8 / 4 bits;
- ``sensitivity``: one static mixed plan from the precision table at the same average bits as
  the dynamic policy (layers lowered least-sensitive first, no entropy);
- ``random``: a static plan with the same average, layers lowered in a random order;
- ``dynamic``: the entropy-driven policy (``enable_dynamic_precision``).

Speed: compiled (HF static cache; ``full`` with Inductor bf16, the rest with ``backend="csd"``,
``dynamic`` through ``options={"bits": "dynamic"}``) when a table is given, else eager (``--eager``
forces eager), timed with the bench's one timing definition (``csd_compile.bench.timing``: every row
warmed up, then interleaved prompt by prompt, median tok/s over prompts). Quality: perplexity on two slices of the Britannica text scored token by token (the
dynamic plan of each token comes from the previous token's output, as in decoding) and greedy
agreement with the full model on HumanEval prompts (matching prefix / max_new_tokens), batch 1.
Run: ``python -m benchmarks.dynamic_rows --table T --avg-bits 6 --out DIR``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from pathlib import Path

import torch

from csd_compile.quant import quantize_, set_bits
from csd_compile.quant.calibrate import calibration_text
from csd_compile.quant.policy import enable_dynamic_precision, plan_for_budget, weighted_average
from csd_compile.quant.table import PrecisionTable

__all__ = ["frontier", "make_rows", "perplexity", "plot_frontier", "greedy_agreement"]


def _runner(model, tokenizer, max_cache_len: int, max_new_tokens: int, compile_options=None, backend=None):
    """A bench runner (:mod:`csd_compile.bench.timing`): greedy ``model.generate`` of one prompt. With
    ``backend``, HF's static cache and that backend (``compile_options`` as its options) compile the
    decode step, as the bench's compiled rows do."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad)
    if backend is not None:
        from csd_compile.models.hf_generate import compile_config

        kwargs |= dict(cache_implementation="static", max_cache_len=max_cache_len,
                       compile_config=compile_config(compile_options, backend=backend))

    def run(ids):
        return {"ids": model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)}

    return run


@torch.no_grad()
def perplexity(model, tokenizer, text: str | None = None, *, context: int = 16, tokens: int = 96,
               offsets: tuple[int, ...] = (60_000, 200_000)) -> float:
    """Perplexity of ``tokens`` tokens after ``context`` tokens, scored one token at a time, at each
    character offset of ``offsets`` into the text (default: two slices of the Britannica text, far
    from each other; the calibration windows are short and few, see ``calibrate``); one NLL mean
    over all scored tokens."""
    from transformers import DynamicCache

    text = calibration_text() if text is None else text
    nll, n = 0.0, 0
    for offset in offsets:
        ids = tokenizer(text[offset:], return_tensors="pt")["input_ids"][:, : context + tokens + 1]
        cache = DynamicCache()
        for i in range(ids.shape[1] - 1):
            logits = model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits[:, -1].float()
            if i >= context:
                nll -= float(torch.log_softmax(logits, -1)[0, ids[0, i + 1]])
                n += 1
    return float(torch.exp(torch.tensor(nll / n)))


def greedy_agreement(ref_ids: list[list[int]], ids: list[list[int]]) -> float:
    """Mean over prompts of (length of the common prefix) / (reference length)."""
    fr = []
    for a, b in zip(ref_ids, ids):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        fr.append(k / max(len(a), 1))
    return sum(fr) / len(fr)


def _static(plan_fn, backend=None):
    def setup(model, tokenizer, gen):
        m = copy.deepcopy(model)
        quantize_(m, bits=8)
        plan = plan_fn(m)
        set_bits(m, plan)
        return {"runner": gen(m, backend=backend), "ppl": perplexity(m, tokenizer),
                "plan": plan if isinstance(plan, int) else list(plan)}
    return setup


def make_rows(table: PrecisionTable | None, avg_bits: float, *, seed: int = 0, num_buckets: int | None = None,
              spread: float | None = None,
              table_path: str | None = None):
    """``{name: setup}`` for the frontier at the dynamic policy's budget ``avg_bits`` (without a
    table: only ``full``, ``static8`` and ``static4``). ``setup(model, tokenizer, gen)`` builds the
    row on a copy of ``model`` and returns its ``runner`` (``gen(model, compile_options=None,
    backend=None)`` makes one), ``ppl`` and ``avg_bits``; :func:`frontier` times every runner together.

    With ``table_path`` (the table's file) speed is measured compiled, HF static cache: ``full``
    with Inductor (bf16), the static plans with ``backend="csd"`` on ``QLinear`` modules, and
    ``dynamic`` with ``options={"bits": "dynamic", ...}``; without it, eager. Perplexity and the
    average bits always come from the eager model (the dynamic policy as a forward hook).
    """
    compiled = table_path is not None
    if table is None:  # only the rows that need no precision table
        avg_of = sens_plan = rand_plan = None
    else:
        avg_of = lambda plan: weighted_average(table, plan)  # noqa: E731
        sens_plan = plan_for_budget(table, avg_bits)
        rng = random.Random(seed)
        rand_kl = tuple(tuple(sorted((rng.random() for _ in table.ladder), reverse=True)) for _ in table.names)
        rand_table = PrecisionTable(table.fingerprint, table.ladder, table.names, table.numels, rand_kl,
                                    table.entropy_quantiles, table.settings)
        rand_plan = plan_for_budget(rand_table, avg_bits)

    def full(model, tokenizer, gen):
        runner = gen(copy.deepcopy(model) if compiled else model, backend="inductor" if compiled else None)
        return {"runner": runner, "ppl": perplexity(model, tokenizer), "avg_bits": 16.0}

    def with_avg(setup, avg):
        def wrapped(*a):
            return setup(*a) | {"avg_bits": avg}
        return wrapped

    def dynamic(model, tokenizer, gen):
        m = copy.deepcopy(model)
        policy = enable_dynamic_precision(m, table, avg_bits, num_buckets=num_buckets, spread=spread)
        plans = []
        head = m.get_output_embeddings()
        handle = head.register_forward_hook(lambda *_: plans.append(policy.plan.clone()))  # no sync
        ppl = perplexity(m, tokenizer)  # one plan per scored token
        handle.remove()
        used = [avg_of(p.tolist()) for p in plans]
        if compiled:  # timed: the backend's own dynamic mode
            options = {"bits": "dynamic", "calibration": table_path, "avg_bits": avg_bits}
            runner = gen(copy.deepcopy(model), options, "csd")
        else:  # timed: the eager policy (its forward hook)
            runner = gen(m)
        return {"runner": runner, "ppl": ppl, "avg_bits": sum(used) / len(used) if used else float("nan")}

    backend = "csd" if compiled else None
    rows = {
        "full": full,
        "static8": with_avg(_static(lambda m: 8, backend), 8.0),
        "static4": with_avg(_static(lambda m: 4, backend), 4.0),
    }
    if table is None:
        return rows
    return rows | {
        "sensitivity": with_avg(_static(lambda m: sens_plan, backend), avg_of(sens_plan)),
        "random": with_avg(_static(lambda m: rand_plan, backend), avg_of(rand_plan)),
        "dynamic": dynamic,
    }


_BUDGETED = ("sensitivity", "random", "dynamic")


def frontier(model, tokenizer, table: PrecisionTable | None, prompts: list[str], max_new_tokens: int,
             avg_bits: float, *, rows: list[str] | None = None, previous: list[dict] = (), **kw) -> list[dict]:
    """Set up the rows of :func:`make_rows` (all, or those named in ``rows``), time them together with
    the bench's timing (:func:`csd_compile.bench.timing.measure`: warm-up, interleaved, median tok/s
    over prompts), append them to the ``previous`` results and add greedy agreement with the ``full``
    row. Rows planned for the budget are named ``row@budget`` (``dynamic@7``), so runs at several
    budgets merge into one frontier (speeds from different runs are not comparable: rerun them
    together to compare)."""
    from csd_compile.bench.timing import measure

    table_rows = make_rows(table, avg_bits, **kw)
    unknown = set(rows or ()) - set(table_rows)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; choose from {list(table_rows)}")
    encoded = [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]
    longest = max(ids.shape[1] for ids in encoded) + max_new_tokens + 16
    cache_len = 256 * -(-longest // 256)

    def gen(m, compile_options=None, backend=None):
        return _runner(m, tokenizer, cache_len, max_new_tokens, compile_options, backend)

    built = {}
    for name, setup in table_rows.items():
        if rows is None or name in rows:
            built[f"{name}@{avg_bits:g}" if name in _BUDGETED else name] = setup(model, tokenizer, gen)
    timings = measure({n: b["runner"] for n, b in built.items()}, encoded, progress="frontier")
    results = list(previous)
    for name, b in built.items():
        recs = timings.records[name]
        ids = [r["output"]["ids"][0, x.shape[1]:].tolist() for r, x in zip(recs, encoded)]
        r = {k: v for k, v in b.items() if k != "runner"} | {
            "tok_s": timings.median_tok_s(name), "ids": ids,
            "texts": [tokenizer.decode(t, skip_special_tokens=True) for t in ids]}
        results.append({"name": name} | r)
        print(f"{name}: ppl {r['ppl']:.3f} avg_bits {r['avg_bits']:.2f} tok/s {r['tok_s']:.2f}", flush=True)
    ref = next((r["ids"] for r in results if r["name"] == "full"), None)
    for r in results:
        r["agreement"] = greedy_agreement(ref, r["ids"]) if ref is not None else float("nan")
    return results


def plot_frontier(results: list[dict], path: str | Path, speed_label: str = "tok/s (eager, bs 1)") -> None:
    """Two panels: perplexity and tok/s against average bits, one point per row (a marker per kind
    of row: full / static / sensitivity / random / dynamic, a colour per row, named in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"full": "*", "static8": "s", "static4": "s", "sensitivity": "o", "random": "x", "dynamic": "D"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "ppl", "perplexity (Britannica)"), (axes[1], "tok_s", speed_label)):
        for i, r in enumerate(results):
            ax.scatter(r["avg_bits"], r[key], marker=markers.get(r["name"].split("@")[0], "o"), color=f"C{i % 10}",
                       label=r["name"], s=45)
        ax.set_xlabel("average weight bits")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("FlexQuant frontier, SmolLM2-135M bf16 (shared 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: list[dict]) -> str:
    """A markdown table of the results."""
    full = next((r for r in results if r["name"] == "full"), None)
    lines = ["| row | avg bits | perplexity | vs full | greedy agreement | tok/s | vs full |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ppl = f"{100 * (r['ppl'] / full['ppl'] - 1):+.2f}%" if full else "-"
        speed = f"{r['tok_s'] / full['tok_s']:.2f}x" if full else "-"
        lines.append(f"| {r['name']} | {r['avg_bits']:.2f} | {r['ppl']:.2f} | {ppl} | {r['agreement']:.2f} "
                     f"| {r['tok_s']:.1f} | {speed} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", default=None, help="precision table (needed by sensitivity/random/dynamic)")
    ap.add_argument("--avg-bits", type=float, default=6.0)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--ppl-tokens", type=int, default=96)
    ap.add_argument("--rows", nargs="*", default=None, help="rows to run (default: all)")
    ap.add_argument("--previous", default=None, help="JSON results of an earlier run to merge")
    ap.add_argument("--eager", action="store_true", help="time eager generate instead of compiled (static cache)")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    global perplexity
    import functools

    perplexity = functools.partial(perplexity, tokens=args.ppl_tokens)
    from csd_compile.bench.prompts import humaneval_problems
    from csd_compile import load_model

    model, tokenizer = load_model("smollm2-135m-instruct", dtype="bf16")
    table = PrecisionTable.load(args.table, model) if args.table else None
    probs = humaneval_problems()
    prompts = [probs[(i * len(probs)) // args.prompts]["prompt"] for i in range(args.prompts)]
    previous = json.loads(Path(args.previous).read_text()) if args.previous else []
    compiled = args.table is not None and not args.eager
    results = frontier(model, tokenizer, table, prompts, args.max_new_tokens, args.avg_bits, rows=args.rows,
                       previous=previous, table_path=args.table if compiled else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dynamic_frontier.json").write_text(json.dumps(
        results, indent=1))
    plot_frontier(results, out / "dynamic_frontier.png",
                  "tok/s (compiled, static cache, bs 1)" if compiled else "tok/s (eager, bs 1)")
    print(markdown(results))


if __name__ == "__main__":
    main()
