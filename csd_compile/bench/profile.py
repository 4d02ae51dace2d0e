"""Where a decode step's time goes: ``csd-compile profile``.

For each system, after warm-up, a generation of ``1 + steps`` tokens runs under
``torch.profiler`` (3 times; the run with the fastest decode forwards is kept, since a shared
machine's other load only ever adds time). The trace is cut into forwards at the end of each LM-head matmul (the last
matmul of a forward, found by its vocabulary-wide shape); the prefill (the first forward) is
dropped, and the decode forwards' events are averaged per forward. (Cutting one trace is robust to
the run-to-run noise of a shared machine; differencing two runs was not.) Self CPU time of each
event goes to one bucket:

* ``quantized matmuls``: ``csd::qlinear*`` (and torchao's ``_weight_int8pack_mm`` /
  ``_weight_int4pack_mm*``) that are not the LM head;
* ``dense matmuls``: ``aten::mm`` / ``addmm`` / ``linear`` / ``matmul`` / mkldnn linears, not the LM head;
* ``LM head``: any matmul-like event one of whose recorded input shapes has the vocabulary size;
* ``attention``: events whose name contains ``scaled_dot_product``, ``sdpa``, ``attention``,
  ``flash``, ``softmax`` or ``bmm``. In Inductor-generated code this is approximate: a fused
  kernel is named after the ops it holds (``cpp_fused__softmax_...``), so a kernel that fuses the
  softmax with something else counts whole as attention, and an attention kernel named otherwise
  counts as elementwise;
* ``norms/rotary/elementwise``: the other generated kernels (``graph_<n>_cpp_fused_*``; their names are
  recorded because the profile compiles with ``torch._inductor.config.cpp.enable_kernel_profile``)
  and every other ``aten::`` op (views, copies, the argmax of greedy decoding, the embedding);
* ``other``: the forward's wall time (under the profiler, LM-head end to LM-head end) minus the
  buckets above: Python, the compiled graph's wrapper, HF's generate loop (the logits processing
  after the head falls in the next forward's window), the profiler's own overhead; also every
  event matched by no rule (e.g. ``record_function`` markers).

A system whose trace shows no LM-head matmul (llama.cpp, whose work the profiler cannot see) is
reported as not attributable. Speculative rows are cut the same way, so their figures are per
forward (draft or verify), not per token. ``ms/token (no profiler)`` is the plain wall clock:
(a ``1 + steps`` run minus a 1-token run) / the extra tokens, median of 3 pairs.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch

from .timing import timed_call

__all__ = ["BUCKETS", "DEFAULT_SYSTEMS", "bucket_of", "markdown_table", "plot", "profile"]

BUCKETS = ("quantized matmuls", "dense matmuls", "LM head", "attention", "norms/rotary/elementwise", "other")
DEFAULT_SYSTEMS = ("hf-bf16", "csd-int4", "csd-q4-g32")

_QUANT = ("csd::qlinear", "_weight_int8pack_mm", "_weight_int4pack_mm")
_DENSE = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "mkldnn::_linear", "aten::_mkldnn_linear")
_ATTENTION = ("scaled_dot_product", "sdpa", "attention", "flash", "softmax", "bmm")


def bucket_of(name: str, shapes, vocab: int) -> str:
    """The bucket of one profiled event (see the module doc); ``shapes``: its recorded input shapes."""
    low = name.lower()
    quant = any(k in name for k in _QUANT)
    dense = any(name.startswith(k) for k in _DENSE)
    if (quant or dense) and any(vocab in (s or ()) for s in (shapes or ()) if isinstance(s, (list, tuple))):
        return "LM head"
    if quant:
        return "quantized matmuls"
    if any(k in low for k in _ATTENTION):
        return "attention"
    if dense:
        return "dense matmuls"
    if "cpp_fused" in name or name.startswith(("aten::", "csd::")):  # Inductor: graph_<n>_cpp_fused_*
        return "norms/rotary/elementwise"
    return "other"


def _forward_ends(events, vocab: int) -> list[float]:
    """End times (us) of the forwards: one per merged interval of LM-head events (a forward's last
    matmul; ``linear`` / ``matmul`` / ``mm`` of one head call nest and merge into one interval)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if bucket_of(e.name, e.input_shapes, vocab) == "LM head")
    ends = []
    cur_start = cur_end = None
    for start, end in spans:
        if cur_end is not None and start < cur_end:
            cur_end = max(cur_end, end)
            continue
        if cur_end is not None:
            ends.append(cur_end)
        cur_start, cur_end = start, end
    if cur_end is not None:
        ends.append(cur_end)
    return ends


def _attribute(prof, vocab: int) -> dict:
    """Per-forward self CPU ms by bucket over the decode forwards of one profiled run: from the end
    of the first forward's LM head (the prefill) to the end of the last forward's."""
    events = list(prof.events())
    ends = _forward_ends(events, vocab)
    if len(ends) < 2:
        raise RuntimeError(f"found {len(ends)} LM-head matmul(s) (a matmul with a {vocab}-wide input) in the trace: "
                           "the decode forwards cannot be told apart")
    lo, hi, forwards = ends[0], ends[-1], len(ends) - 1
    out = dict.fromkeys(BUCKETS, 0.0)
    for e in events:
        if lo <= e.time_range.start < hi:
            b = bucket_of(e.name, e.input_shapes, vocab)
            if b != "other":
                out[b] += e.self_cpu_time_total / 1e3 / forwards
    wall = (hi - lo) / 1e3 / forwards
    out["other"] = max(0.0, wall - sum(out.values()))
    return {"forwards": forwards, "ms_per_forward_profiled": wall, "buckets_ms": out}


def _timed(runner, ids) -> tuple[float, int]:
    res, seconds = timed_call(runner, ids)  # the bench's own timed region
    return seconds, res["ids"].shape[1] - ids.shape[1]


def _profile_system(runner, ids, ctx, steps: int, vocab: int, repeats: int = 3) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for n in (1 + steps, 1):  # warm-up (compiles) at both lengths
        ctx.max_new_tokens = n
        _timed(runner, ids)
    per_token = []  # without the profiler: (decode run - prefill-only run) / extra tokens, median of pairs
    for _ in range(repeats):
        ctx.max_new_tokens = 1
        wa, na = _timed(runner, ids)
        ctx.max_new_tokens = 1 + steps
        wb, nb = _timed(runner, ids)
        if nb > na:
            per_token.append((wb - wa) / (nb - na) * 1e3)
    best = None  # the least disturbed of `repeats` profiled runs: on a shared machine others' load only adds
    for _ in range(repeats):
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            _, new = _timed(runner, ids)
        row = _attribute(prof, vocab)
        if best is None or row["ms_per_forward_profiled"] < best["ms_per_forward_profiled"]:
            best = row
    row = best | {"new_tokens": new, "profiled_runs": repeats}
    row["ms_per_token"] = statistics.median(per_token) if per_token else None
    return row


def _profile_all(names, systems, ctx, ids, steps, vocab, rows, skipped) -> None:
    for n in names:
        why = systems[n].available()
        if why:
            skipped[n] = why
            print(f"[profile] skipping {n}: {why}", file=sys.stderr)
            continue
        print(f"[profile] {n}: setting up and profiling {steps} decode steps", file=sys.stderr, flush=True)
        try:
            rows[n] = _profile_system(systems[n].setup(ctx), ids, ctx, steps, vocab)
        except RuntimeError as err:
            skipped[n] = f"not attributable: {err}"
            print(f"[profile] {n}: {skipped[n]}", file=sys.stderr)


def profile(*, model_name: str, systems: list[str] | None = None, steps: int = 16,
            out_dir: Path = Path("profile_results")) -> dict:
    """Profile the decode steps of ``systems`` (default :data:`DEFAULT_SYSTEMS`) on the first shipped
    prompt; write ``profile.json``, ``profile.md`` and ``profile.png`` (stacked bars) to ``out_dir``."""
    import torch._inductor.config as inductor_config

    from csd_compile import load_model
    from csd_compile.data import load_prompts
    from csd_compile.models.hf_generate import encode_prompt

    from .harness import SYSTEMS, BenchContext, write_report

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1")
    names = list(systems or DEFAULT_SYSTEMS)
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
    model, tokenizer = load_model(model_name, dtype="bf16", verbose=True)
    vocab = model.get_output_embeddings().weight.shape[0]
    ctx = BenchContext(model_name=model_name, max_new_tokens=1 + steps, tokenizer=tokenizer)
    (_, text), = load_prompts(1)
    ids = encode_prompt(tokenizer, text, chat=True)
    ctx.max_cache_len = max(ctx.max_cache_len, 256 * math.ceil((ids.shape[1] + steps + 17) / 256))
    rows, skipped = {}, {}
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):  # generated kernels appear by name
        _profile_all(names, SYSTEMS, ctx, ids, steps, vocab, rows, skipped)
    result = {"model": model_name, "steps": steps, "prompt_tokens": ids.shape[1], "threads": torch.get_num_threads(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "buckets": list(BUCKETS),
              "systems": rows, "skipped": skipped}
    write_report(out_dir, "profile", result, markdown_table(result), plot, tag="profile")
    return result


def markdown_table(result: dict) -> str:
    """The profile as a markdown table: ms per decode forward in each bucket, per system."""
    head = " | ".join(result["buckets"])
    lines = [
        f"{result['model']}: ms per decode forward (self CPU time), {result['steps']} steps after a "
        f"{result['prompt_tokens']}-token prompt, {result['threads']} threads, torch {result['torch']}; "
        "'other' = profiled wall time per forward minus the buckets (Python, wrapper, generate loop, profiler).",
        "",
        f"| system | ms/token (no profiler) | ms/forward (profiled) | {head} |",
        "|---|---|---|" + "---|" * len(result["buckets"]),
    ]
    for name, row in result["systems"].items():
        cells = " | ".join(f"{row['buckets_ms'][b]:.2f}" for b in result["buckets"])
        plain = f"{row['ms_per_token']:.2f}" if row["ms_per_token"] is not None else "n/a"
        lines.append(f"| {name} | {plain} | {row['ms_per_forward_profiled']:.2f} | {cells} |")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} |" + " |" * (len(result["buckets"]) + 1))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Stacked horizontal bars: ms per decode forward by bucket, one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["systems"])
    fig, ax = plt.subplots(figsize=(9, 0.6 * max(1, len(names)) + 1.8))
    left = [0.0] * len(names)
    colors = ["#2a7", "#7c5", "#c84", "#48c", "#bbb", "#666"]
    for bucket, color in zip(result["buckets"], colors):
        vals = [result["systems"][n]["buckets_ms"][bucket] for n in names]
        ax.barh(names, vals, left=left, color=color, label=bucket)
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode forward (self CPU time, profiled)")
    ax.set_title(f"{result['model']}: where a decode step goes")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
