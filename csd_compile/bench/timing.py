"""The one timing definition every benchmark uses (``csd-compile bench``, the profile's ms/token and
the research scripts in ``benchmarks/``).

A *runner* is ``run(input) -> dict``: it decodes one prompt and returns at least ``ids`` (the
prompt as passed followed by the new tokens, ``[1, S + n]``) or ``new_tokens`` (their number), and
may add anything else (``mean_accepted``, texts, stats). :func:`measure` then:

1. warms every runner up once (on ``warmup_input``, default the first input), untimed: compiles,
   autotuning and first-touch allocation happen here, never inside a timed run;
2. runs every input through every runner, the order of the runners rotated from one input to the
   next (no runner always goes first, none always runs right after the same neighbour);
3. times each call by wall clock (``time.perf_counter``) around the runner alone, under
   ``torch.inference_mode``: prefill and the decoding loop included, scoring and I/O excluded;
4. reports, per runner, the per-input records (``seconds``, ``new_tokens``, ``tok_s = new_tokens /
   seconds``) and their **median** tok/s.

Ratios between runners are ratios of these medians, taken within one call of :func:`measure`:
figures from different calls (or machines, or loads) are not compared.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["Measurement", "measure", "median_tok_s", "timed_call", "warm_up"]

Runner = Callable[[object], dict]


def timed_call(runner: Runner, inp) -> tuple[dict, float]:
    """``(runner(inp), wall seconds)`` under ``torch.inference_mode``: the single timed region."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = runner(inp)
        return out, time.perf_counter() - t0


def warm_up(runners: dict[str, Runner], inp) -> dict[str, float]:
    """Step 1 of :func:`measure` alone: each runner once on ``inp``, untimed as far as the results
    go; returns each call's seconds (setup cost, reported apart)."""
    return {n: timed_call(r, inp)[1] for n, r in runners.items()}


def _new_tokens(out: dict, inp) -> int:
    if "new_tokens" in out:
        return int(out["new_tokens"])
    if "ids" not in out:
        raise KeyError("a runner must return 'ids' (prompt + new tokens) or 'new_tokens'")
    return int(out["ids"].shape[-1] - inp.shape[-1])


@dataclasses.dataclass
class Measurement:
    """What :func:`measure` returns. ``records[name][i]`` is input ``i`` through runner ``name``:
    ``prompt`` (the input's index), ``seconds``, ``new_tokens``, ``tok_s`` and ``output`` (the
    runner's dict). ``warmup_s[name]``: the untimed warm-up call's seconds."""

    records: dict[str, list[dict]]
    warmup_s: dict[str, float]

    def median_tok_s(self, name: str) -> float:
        return median_tok_s(self.records[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Median tok/s of ``name`` over that of ``baseline`` (same inputs, same run)."""
        return self.median_tok_s(name) / self.median_tok_s(baseline)


def median_tok_s(records: Sequence[dict]) -> float:
    """The median over inputs of new tokens / second: the figure every table reports."""
    if not records:
        raise ValueError("no records to summarise")
    return statistics.median(r["tok_s"] for r in records)


def measure(runners: dict[str, Runner], inputs: Sequence, *, warmup: bool = True, warmup_input=None,
            progress: str | None = "bench", on_record: Callable[[str, dict], None] | None = None) -> Measurement:
    """Time ``runners`` on ``inputs`` as the module docstring says. ``warmup=False`` skips step 1
    (for runners already warm). ``progress`` labels a tqdm bar on stderr (``None``: none).
    ``on_record(name, record)`` is called after each timed call (outside the timed region), e.g. to
    log or to score the output while the next call waits."""
    if not runners:
        raise ValueError("no runners to measure")
    if not inputs:
        raise ValueError("no inputs to measure on")
    names = list(runners)
    warmup_s = warm_up(runners, inputs[0] if warmup_input is None else warmup_input) if warmup else {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(inputs) * len(names), desc=progress, unit="run", file=sys.stderr)
    records: dict[str, list[dict]] = {n: [] for n in names}
    for i, inp in enumerate(inputs):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            out, dt = timed_call(runners[n], inp)
            new = _new_tokens(out, inp)
            rec = {"prompt": i, "seconds": dt, "new_tokens": new, "tok_s": new / dt, "output": out}
            records[n].append(rec)
            if on_record is not None:
                on_record(n, rec)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return Measurement(records, warmup_s)
