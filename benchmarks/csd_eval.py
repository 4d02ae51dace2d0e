"""CSD evaluation: exact vs csd acceptance with the same draft ("self": the target at low bits) on
HumanEval prompts.

For each problem both modes generate, timed with the bench's one timing definition
(``csd_compile.bench.timing.measure``: both compiled on a held-out prompt first, then the modes'
order alternating per problem, wall clock around ``generate`` alone, median tok/s); scoring below
happens between the timed calls, never inside them (its code is in ``benchmarks/csd_scoring.py``).
The csd memory is seeded offline from held-out prompts (``calibration_prompts`` other than the
evaluated problems, through ``seed_from_prompts``) and then keeps learning online.
Reported per mode: mean accepted length, tokens per step and ms per step after the prefill,
median tok/s, HumanEval pass@1 (each completion run against its tests in ``benchmarks/sandbox.py``),
the full-precision target's mean log-likelihood per generated token (teacher-forced on the mode's own
output), the rescue cost (per generated token, the log-likelihood given up where the emitted token is
not that target's argmax; unlike the mean log-likelihood it does not compare two texts that part at
the first rescue), and the emitted tokens that differ from the fp32 target's argmax (for csd: the rescued
pairs; for exact: the bf16-vs-fp32 near-tie noise floor), decoded and put in coarse categories.

    python -m benchmarks.csd_eval --problems 12 --max-new-tokens 160 --out results/csd_eval

Writes ``DIR/csd_eval.json`` and ``DIR/csd_eval.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from .csd_scoring import (
    build_program, divergent_pairs, likelihood_vs_exact, mean_loglik, rescue_cost, teacher_forced, token_category,
)
from .sandbox import SandboxUnavailable, isolation_unavailable, run_sandboxed

__all__ = ["decode_and_score", "decoder", "main"]

def _strip_tail(new: torch.Tensor, eos: set[int]) -> torch.Tensor:
    out = new.tolist()
    for j, t in enumerate(out):
        if t in eos:
            return new[: j + 1]
    return new


def _left_pad(ids: torch.Tensor, width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [1, width], attention_mask [1, width])`` with ``ids`` (1-D) left-padded by ``pad_id``."""
    n = width - ids.numel()
    padded = torch.cat([ids.new_full((n,), pad_id), ids]).unsqueeze(0)
    mask = torch.cat([torch.zeros(n, dtype=torch.int64), torch.ones(ids.numel(), dtype=torch.int64)]).unsqueeze(0)
    return padded, mask


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def decoder(model, tok, width: int, max_new_tokens: int, accept, kw: dict):
    """A bench runner (:mod:`csd_compile.bench.timing`) that decodes a prompt (1-D ids, left-padded to
    ``width``: one cache bucket, one compile) with ``csd_compile.generate``; it returns ``ids`` (prompt
    + new tokens) and generate's ``stats``."""
    from csd_compile.speculative import generate

    def run(prompt: torch.Tensor) -> dict:
        padded, mask = _left_pad(prompt, width, _pad_id(tok))
        out, stats = generate(model, padded, attention_mask=mask, max_new_tokens=max_new_tokens, acceptance=accept,
                              return_stats=True, **kw)
        return {"ids": torch.cat([prompt, out[0, width:].cpu()]).unsqueeze(0), "stats": stats}

    return run


def score(ref, tok, prompt: torch.Tensor, ids: torch.Tensor):
    """The new tokens of ``ids`` (a decoder's output for ``prompt``) cut after the first EOS, and their
    teacher-forced scores under ``ref``: ``(new, log-probs, ref's argmax there, rescue cost)``."""
    new = _strip_tail(ids[0, prompt.numel():], {tok.eos_token_id} if tok.eos_token_id is not None else set())
    logp, amax, top_logp = teacher_forced(ref, torch.cat([prompt, new]).unsqueeze(0), prompt.numel())
    return new, logp, amax, rescue_cost(top_logp, logp)


def decode_and_score(model, ref, tok, prompt: torch.Tensor, width: int, max_new_tokens: int, accept, kw: dict):
    """One untimed :func:`decoder` call and :func:`score`: ``(new ids, generate's stats, log-probs of
    the new tokens, ref's argmax there, rescue cost)``."""
    out = decoder(model, tok, width, max_new_tokens, accept, kw)(prompt)
    new, logp, amax, cost = score(ref, tok, prompt, out["ids"])
    return new, out["stats"], logp, amax, cost


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.csd_eval", description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=12, help="HumanEval problems (spread over the set)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--seed-prompts", type=int, default=8, help="held-out prompts to seed the memory")
    ap.add_argument("--seed-tokens", type=int, default=48, help="tokens per seeding prompt")
    ap.add_argument("--lambda", dest="lambda_", type=float, default=6.0)
    ap.add_argument("--tau", type=float, default=0.01)
    ap.add_argument("--num-draft-tokens", type=int, default=6)
    ap.add_argument("--draft-bits", type=int, default=4, choices=(2, 3, 4, 8), help="bit-width of the self draft")
    ap.add_argument("--separate-draft", action="store_true",
                    help="pass the low-bit copy as a separate draft model: it keeps its own keys and values "
                         "instead of reading the target's (a weaker draft, like a separate small model)")
    ap.add_argument("--no-protect", action="store_true",
                    help="let csd rescue special tokens and code fences too (the paper's rule as written)")
    ap.add_argument("--same-kind", action="store_true",
                    help="rescue only within a token kind (word, number, punctuation, whitespace; token_kinds)")
    ap.add_argument("--backend", default="csd", help="step compile backend; 'none' runs eagerly")
    ap.add_argument("--timeout", type=float, default=10.0, help="pass@1 sandbox timeout (s)")
    ap.add_argument("--unsafe-exec", action="store_true",
                    help="run the completions with your own rights where namespaces are unavailable (see benchmarks/sandbox.py)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    for name in ("problems", "max_new_tokens", "seed_prompts", "seed_tokens", "num_draft_tokens"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(a, name)} must be >= 1")
    if not a.lambda_ >= 0:
        ap.error(f"--lambda={a.lambda_} must be >= 0")
    if not 0 < a.tau <= 1:
        ap.error(f"--tau={a.tau} must be in (0, 1]")
    return a


def _logger(name: str):
    return lambda msg: print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def held_out_prompts(problems: list[dict], n_seed: int, n_more: int) -> list[str]:
    """``n_seed + n_more`` calibration prompts none of which is one of ``problems`` (HumanEval dicts).

    ``calibration_prompts`` avoids the bench's prompts, not necessarily these problems. Asking for more
    than the pool holds exits with the largest ``n_seed`` that fits, before any work starts."""
    from csd_compile.data import _code_prompt, calibration_prompts

    asked = {_code_prompt(p) for p in problems}
    held = [p for p in calibration_prompts(n_seed + n_more + len(problems)) if p not in asked]
    if len(held) < n_seed + n_more:
        raise SystemExit(f"--seed-prompts={n_seed} with --problems={len(problems)}: only {len(held)} held-out "
                         f"prompts ({n_more} needed besides the seeds); use at most --seed-prompts={len(held) - n_more}")
    return held[: n_seed + n_more]


def seeded_setup(a, seed_texts: list[str], log):
    """The bf16 target, its tokenizer, the fp32 reference, the chat encoder, the correction memory
    seeded on ``seed_texts`` (``a.lambda_``, ``a.seed_tokens``), the draft both modes use, the number
    of pairs recorded and of frequent ones."""
    from csd_compile import load_model
    from csd_compile.models.hf_generate import encode_prompt
    from csd_compile.speculative.drafts import make_self_draft
    from csd_compile.speculative.memory import CorrectionMemory, seed_from_prompts, tokenizer_fingerprint

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m-instruct", dtype="bf16")
    ref, _ = load_model("smollm2-135m-instruct", dtype="fp32")
    model.eval(), ref.eval()
    enc = lambda text: encode_prompt(tok, text, chat=True)  # noqa: E731
    memory = CorrectionMemory(lambda_=a.lambda_, fingerprint=tokenizer_fingerprint(tok))
    t0 = time.perf_counter()
    # one draft for seeding and both modes: "self" reads the target's keys and values; the separate
    # copy is an ordinary draft model with its own
    draft = make_self_draft(model, bits=a.draft_bits) if a.separate_draft else "self"
    recorded = seed_from_prompts(memory, model, tok, [enc(p)[0] for p in seed_texts], draft=draft,
                                 draft_bits=a.draft_bits, max_new_tokens=a.seed_tokens, progress=False)
    seeded_frequent = sum(1 for _, _, c in memory.top_pairs(memory.capacity) if c > a.lambda_)
    log(f"seeded memory: {recorded} pairs recorded, {seeded_frequent} frequent, {time.perf_counter() - t0:.0f}s")
    return model, tok, ref, enc, memory, draft, recorded, seeded_frequent


def main(argv=None) -> dict:
    """Run the evaluation (CLI in the module docstring); returns the JSON result."""
    a = _parse(argv)
    why = isolation_unavailable()
    if why is not None and not a.unsafe_exec:  # before any model work
        raise SystemExit(f"csd_eval: {SandboxUnavailable.__name__}: cannot isolate the completions ({why}); "
                         "pass --unsafe-exec to run them with your own rights")
    from csd_compile.bench.timing import measure
    from csd_compile.data import _code_prompt, _spread, humaneval_problems
    from csd_compile.speculative.csd_accept import make_csd_accept
    from csd_compile.speculative.drafts import vocab_size
    from csd_compile.speculative.memory import protected_tokens, token_kinds

    log = _logger("csd_eval")
    problems = _spread(humaneval_problems(), a.problems)
    held = held_out_prompts(problems, a.seed_prompts, 1)  # the seeds and one warm-up prompt
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok, ref, enc, memory, draft, recorded, seeded_frequent = seeded_setup(a, held[: a.seed_prompts], log)

    backend = None if a.backend == "none" else a.backend
    protected = None if a.no_protect else protected_tokens(tok)
    kinds = token_kinds(tok, vocab_size(model)) if a.same_kind else None
    accept = {"exact": None, "csd": make_csd_accept(memory, tau=a.tau, protected=protected, kinds=kinds)}
    kw = dict(draft=draft, draft_bits=a.draft_bits, num_draft_tokens=a.num_draft_tokens, compile_backend=backend)
    prompts = [enc(_code_prompt(p))[0] for p in problems]
    width = max(len(p) for p in prompts)  # left-pad every prompt to one length: one cache bucket, one compile
    warm = enc(held[a.seed_prompts])[0][-width:]
    runners = {mode: decoder(model, tok, width, a.max_new_tokens, accept[mode], kw) for mode in ("exact", "csd")}
    rows = {m: [] for m in runners}

    def scored(mode: str, rec: dict) -> None:  # after each timed call, outside the timed region
        i, st = rec["prompt"], rec["output"]["stats"]
        new, logp, amax, cost = score(ref, tok, prompts[i], rec["output"]["ids"])
        reply = tok.decode(new, skip_special_tokens=True)
        res = run_sandboxed(build_program(problems[i], reply), timeout=a.timeout, unsafe_exec=a.unsafe_exec)
        rows[mode].append({
            "task_id": problems[i]["task_id"], "passed": res["passed"], "timeout": res["timeout"],
            "mean_accepted": st["mean_accepted"], "tok_s": rec["tok_s"], "new_tokens": int(new.numel()),
            "steps": st["steps"], "seconds": rec["seconds"], "generate_seconds": st["seconds"],
            "prefill_seconds": st["prefill_seconds"],
            "logp": logp, "cost": cost, "pairs": divergent_pairs(new, amax),
            "reply": reply, "stderr": res["stderr"][-200:],
        })
        if all(len(r) == i + 1 for r in rows.values()):
            log(f"{i + 1}/{len(problems)} {problems[i]['task_id']}: exact pass={rows['exact'][-1]['passed']} "
                f"acc={rows['exact'][-1]['mean_accepted']:.2f} | csd pass={rows['csd'][-1]['passed']} "
                f"acc={rows['csd'][-1]['mean_accepted']:.2f}")

    # the bench's timing: both steps compiled on a held-out prompt first (the warm-up also feeds the csd
    # memory), then the problems with the modes' order alternating, wall clock around generate alone
    t0 = time.perf_counter()
    timings = measure(runners, prompts, warmup_input=warm, progress=None, on_record=scored)
    log(f"warm-up/compile {timings.warmup_s}; all {time.perf_counter() - t0:.0f}s")

    result = _summarise(a, rows, tok, memory, recorded, seeded_frequent)
    (out_dir / "csd_eval.json").write_text(json.dumps(result, indent=2))
    (out_dir / "csd_eval.md").write_text(_markdown(result))
    log(f"wrote {out_dir / 'csd_eval.json'} and {out_dir / 'csd_eval.md'}")
    return result


def _summarise(a, rows, tok, memory, recorded, seeded_frequent) -> dict:
    res = {"settings": {k: v for k, v in vars(a).items()}, "machine": "CPU, shared with other jobs (timings noisy)",
           "memory": {"seeded_pairs_recorded": recorded, "seeded_frequent_pairs": seeded_frequent,
                      "pairs_in_table_after": int(memory.num_pairs())}, "modes": {}}
    for mode, rs in rows.items():
        pairs = Counter()
        for r in rs:
            pairs.update(r["pairs"])
        top = []
        for (x, t), c in pairs.most_common(15):
            xs, ts = tok.decode([x]), tok.decode([t])
            top.append({"emitted": xs, "target": ts, "count": c, "category": token_category(xs, ts)})
        cats = Counter()
        for (x, t), c in pairs.items():
            cats[token_category(tok.decode([x]), tok.decode([t]))] += c
        n_tok = sum(r["new_tokens"] for r in rs)
        decode_s = sum(r["generate_seconds"] - r["prefill_seconds"] for r in rs)  # generate's own split
        res["modes"][mode] = {
            "mean_accepted": statistics.mean(r["mean_accepted"] for r in rs),
            "tok_s_median": statistics.median(r["tok_s"] for r in rs),
            "tok_s_all": n_tok / sum(r["seconds"] for r in rs),  # every call's tokens over every call's wall seconds
            "pass_at_1": sum(r["passed"] for r in rs) / len(rs),
            "passed": sum(r["passed"] for r in rs), "problems": len(rs),
            "mean_loglik_per_token": mean_loglik([r["logp"] for r in rs]),
            "rescue_cost_per_token": sum(r["cost"] for r in rs) / n_tok,
            "new_tokens": n_tok,
            # decoding after the prefill: tokens per draft-verify step x steps per second (the prefill
            # emits each problem's first token)
            "tokens_per_step": sum(r["new_tokens"] - 1 for r in rs) / max(sum(r["steps"] for r in rs), 1),
            "ms_per_step": 1000 * decode_s / max(sum(r["steps"] for r in rs), 1),
            "decode_tok_s": sum(r["new_tokens"] - 1 for r in rs) / decode_s,
            "diverged_from_fp32_argmax": sum(pairs.values()),
            "diverged_categories": dict(cats), "top_pairs": top,
            "per_problem": [{k: r[k] for k in ("task_id", "passed", "timeout", "mean_accepted", "tok_s", "new_tokens",
                                                   "steps", "seconds", "generate_seconds", "prefill_seconds", "reply",
                                                   "stderr")}
                            for r in rs],
        }
    e, c = res["modes"]["exact"], res["modes"]["csd"]
    ratios = [rc["tok_s"] / re_["tok_s"] for re_, rc in zip(rows["exact"], rows["csd"])]
    res["csd_vs_exact"] = {
        "mean_accepted_ratio": c["mean_accepted"] / e["mean_accepted"] if e["mean_accepted"] else None,
        "speedup_median_of_per_problem_ratios": statistics.median(ratios),
        "speedup_ratio_of_medians": c["tok_s_median"] / e["tok_s_median"],
        "speedup_all_calls": c["tok_s_all"] / e["tok_s_all"],
        "decode_speedup": c["decode_tok_s"] / e["decode_tok_s"],
        "tokens_per_step_ratio": c["tokens_per_step"] / e["tokens_per_step"],
        "ms_per_step_ratio": c["ms_per_step"] / e["ms_per_step"],
        **likelihood_vs_exact(c, e),
        "pass_at_1_delta": c["pass_at_1"] - e["pass_at_1"],
    }
    return res


def _markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        f"# CSD evaluation: exact vs csd acceptance, {'separate' if s.get('separate_draft') else 'self'} draft "
        f"({s['draft_bits']} bits), K={s['num_draft_tokens']}",
        "",
        f"{s['problems']} HumanEval problems x {s['max_new_tokens']} new tokens; memory seeded on "
        f"{s['seed_prompts']} held-out prompts x {s['seed_tokens']} tokens, lambda={s['lambda_']}, tau={s['tau']}, "
        f"rescues within a token kind only: {s.get('same_kind', False)}; "
        f"{res['machine']}.",
        "",
        "| mode | mean accepted | tokens/step | ms/step | tok/s (median) | pass@1 | mean log-lik/token (fp32 target) "
        "| rescue cost/token | tokens != fp32 argmax |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in res["modes"].items():
        lines.append(
            f"| {mode} | {m['mean_accepted']:.3f} | {m['tokens_per_step']:.2f} | {m['ms_per_step']:.0f} "
            f"| {m['tok_s_median']:.1f} | {m['passed']}/{m['problems']} "
            f"| {m['mean_loglik_per_token']:.4f} | {m['rescue_cost_per_token']:.4f} "
            f"| {m['diverged_from_fp32_argmax']}/{m['new_tokens']} |"
        )
    r = res["csd_vs_exact"]
    lines += ["", f"csd/exact: mean accepted x{r['mean_accepted_ratio']:.3f}, tok/s x{r['speedup_median_of_per_problem_ratios']:.3f} "
              f"(median of per-problem ratios; x{r['speedup_ratio_of_medians']:.3f} ratio of medians; "
              f"x{r['speedup_all_calls']:.3f} all tokens over all seconds; after the prefill "
              f"x{r['decode_speedup']:.3f} = tokens/step x{r['tokens_per_step_ratio']:.3f} / ms/step "
              f"x{r['ms_per_step_ratio']:.3f}), "
              f"log-lik change {100 * r['loglik_rel_change']:+.2f}% (rescue cost {100 * r['rescue_cost_rel']:+.2f}%), "
              f"pass@1 delta {r['pass_at_1_delta']:+.3f}.", "",
              f"Memory: {res['memory']}", ""]
    for mode, m in res["modes"].items():
        lines += [f"## {mode}: emitted tokens that differ from the fp32 target's argmax", "",
                  f"categories: {m['diverged_categories']}", "", "| emitted | target | count | category |", "|---|---|---|---|"]
        lines += [f"| {json.dumps(p['emitted'])} | {json.dumps(p['target'])} | {p['count']} | {p['category']} |" for p in m["top_pairs"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
