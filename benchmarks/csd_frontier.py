"""CSD's speed-for-likelihood trade-off over the gate threshold tau and the memory's lambda, on
held-out prompts.

The memory is seeded as in ``benchmarks.csd_eval`` (same held-out seeds, same draft; seeding only
counts pairs, so one seeding serves every lambda); then exact acceptance and csd at each
(``--lambda``, ``--taus``) pair decode the next ``--prompts`` held-out prompts, which are neither
seeds nor HumanEval problems the evaluation scores. Every csd run starts from a copy of the seeded
memory (and keeps learning online, as in the evaluation). ``--lambda 0`` is the gate alone (the
step counts a pair before asking, so every pair is frequent); a tiny tau, e.g. ``1e-9``, is the
memory alone: the paper's two ablations. The step runs eagerly: tau and lambda are constants of the
compiled step, so compiling each would cost minutes per value, and what is measured here does not
depend on it:

- mean accepted length and tokens per draft-verify step (the step's cost is the same in both modes:
  ``csd_eval`` measures it), against exact acceptance;
- the fp32 target's mean log-likelihood per generated token on each mode's own text (the issue's
  measure), and its relative change against exact;
- the rescue cost: per generated token, the mean of ``log p(argmax) - log p(emitted)`` under the
  fp32 target, i.e. the likelihood given up at the positions where the text leaves the target's
  choice, without the noise of the texts then going separate ways.

``--budget`` names the allowed loss; the report picks the setting with the longest accepted length whose
rescue cost (over exact's, relative to exact's mean log-likelihood) stays within it, so the evaluation
can run at a tau chosen without its problems. The change of mean log-likelihood is reported but does
not pick: it compares texts that part at the first rescue and is too noisy at this size.

    python -m benchmarks.csd_frontier --prompts 18 --max-new-tokens 192 --seed-prompts 160 \\
        --seed-tokens 64 --lambda 2 --separate-draft --out results/csd_frontier

    python -m benchmarks.csd_frontier --prompts 18 --max-new-tokens 192 --seed-prompts 160 \\
        --seed-tokens 64 --lambda 0,2,6 --taus 1e-9,0.01,0.3,0.6 --separate-draft --out DIR

Writes ``DIR/csd_frontier.json`` and ``DIR/csd_frontier.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from benchmarks.csd_eval import _logger, decode_and_score, held_out_prompts, seeded_setup
from benchmarks.csd_scoring import likelihood_vs_exact, mean_loglik

__all__ = ["main", "pick_tau"]


def pick_tau(rows: dict[str, dict], budget: float) -> str | None:
    """The csd row (key) with the largest ``accepted_ratio`` whose rescue cost over exact's,
    ``rescue_cost_rel``, stays within ``budget``; ``None`` when none does. ``rows`` maps a label to a
    row of the report. The rescue cost, not the change of mean log-likelihood, decides: that change
    compares two texts that part at the first rescue, and swings both ways by more than the budget."""
    if not budget >= 0:
        raise ValueError(f"budget={budget!r} must be >= 0 (a relative log-likelihood loss, e.g. 0.02)")
    ok = [(r["accepted_ratio"], k) for k, r in rows.items() if r["rescue_cost_rel"] <= budget]
    return max(ok)[1] if ok else None


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.csd_frontier", description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=32,
                    help="the evaluation's HumanEval problems, kept out of both prompt sets")
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts decoded per tau")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed-prompts", type=int, default=160)
    ap.add_argument("--seed-tokens", type=int, default=64)
    ap.add_argument("--lambda", dest="lambdas", default="2",
                    help="comma-separated memory thresholds, each >= 0 (a pair is frequent once its count exceeds it)")
    ap.add_argument("--taus", default="0.01,0.03,0.1,0.3,0.6,0.9",
                    help="comma-separated gate thresholds, each in (0, 1]")
    ap.add_argument("--budget", type=float, default=0.02, help="allowed rescue cost over exact's, as a share of exact's mean log-likelihood per token")
    ap.add_argument("--num-draft-tokens", type=int, default=6)
    ap.add_argument("--draft-bits", type=int, default=4, choices=(2, 3, 4, 8))
    ap.add_argument("--separate-draft", action="store_true", help="as in benchmarks.csd_eval")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    for name in ("problems", "prompts", "max_new_tokens", "seed_prompts", "seed_tokens", "num_draft_tokens"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(a, name)} must be >= 1")
    if not a.budget >= 0:
        ap.error(f"--budget={a.budget} must be >= 0")
    a.taus = _number_list(ap, "taus", a.taus, lambda t: 0 < t <= 1, "distinct values in (0, 1]")
    a.lambdas = _number_list(ap, "lambda", a.lambdas, lambda v: 0 <= v < float("inf"), "distinct finite values >= 0")
    a.lambda_ = a.lambdas[0]  # the memory's own lambda (seeding does not use it)
    return a


def _number_list(ap, flag: str, text: str, ok, allowed: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        ap.error(f"--{flag}={text!r} must be comma-separated numbers")
    if not all(ok(v) for v in values) or len(set(values)) != len(values):
        ap.error(f"--{flag}={text} must be {allowed}")
    return values


def main(argv=None) -> dict:
    """Run the sweep (CLI in the module docstring); returns the JSON result."""
    a = _parse(argv)
    from csd_compile.data import _spread, humaneval_problems
    from csd_compile.speculative.csd_accept import make_csd_accept
    from csd_compile.speculative.memory import protected_tokens

    log = _logger("csd_frontier")
    held = held_out_prompts(_spread(humaneval_problems(), a.problems), a.seed_prompts, a.prompts)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok, ref, enc, memory, draft, recorded, _ = seeded_setup(a, held[: a.seed_prompts], log)
    protected = protected_tokens(tok)
    prompts = [enc(p)[0] for p in held[a.seed_prompts:]]
    width = max(len(p) for p in prompts)
    kw = dict(draft=draft, draft_bits=a.draft_bits, num_draft_tokens=a.num_draft_tokens, compile_backend=None)

    grid = len(a.lambdas) > 1
    modes = {"exact": (None, None)} | {
        (f"lambda={lam:g} tau={t:g}" if grid else f"tau={t:g}"): (lam, t) for lam in a.lambdas for t in a.taus
    }
    stats = {}
    for label, (lam, tau) in modes.items():
        t0 = time.perf_counter()
        accept = None if tau is None else make_csd_accept(copy.deepcopy(memory), tau=tau, lambda_=lam, protected=protected)
        acc, steps, n_new, logps, cost, rescued = [], 0, 0, [], 0.0, 0
        for p in prompts:
            new, st, logp, amax, p_cost = decode_and_score(model, ref, tok, p, width, a.max_new_tokens, accept, kw)
            acc.append(st["mean_accepted"])
            steps += st["steps"]
            n_new += new.numel()
            logps.append(logp)
            cost += p_cost
            rescued += int((new != amax).sum())
        stats[label] = {
            "lambda": lam, "tau": tau, "mean_accepted": sum(acc) / len(acc), "tokens_per_step": (n_new - len(prompts)) / max(steps, 1),
            "mean_loglik_per_token": mean_loglik(logps), "rescue_cost_per_token": cost / n_new,
            "tokens_off_fp32_argmax": rescued, "new_tokens": n_new,
        }
        log(f"{label}: accepted {stats[label]['mean_accepted']:.3f}, log-lik {stats[label]['mean_loglik_per_token']:.4f}, "
            f"{time.perf_counter() - t0:.0f}s")

    e = stats["exact"]
    for label, s in stats.items():
        s["accepted_ratio"] = s["mean_accepted"] / e["mean_accepted"]
        s["tokens_per_step_ratio"] = s["tokens_per_step"] / e["tokens_per_step"]
        s |= likelihood_vs_exact(s, e)
    csd_rows = {k: v for k, v in stats.items() if k != "exact"}
    seeded_counts = [c for _, _, c in memory.top_pairs(memory.capacity)]  # the table read once
    result = {
        "settings": {k: v for k, v in vars(a).items()},
        "memory": {"seeded_pairs_recorded": recorded,
                   "seeded_frequent_pairs": {f"{lam:g}": sum(c > lam for c in seeded_counts) for lam in a.lambdas}},
        "modes": stats, "pick_within_budget": pick_tau(csd_rows, a.budget),
    }
    (out_dir / "csd_frontier.json").write_text(json.dumps(result, indent=2))
    (out_dir / "csd_frontier.md").write_text(_markdown(result))
    log(f"wrote {out_dir / 'csd_frontier.json'} and {out_dir / 'csd_frontier.md'}")
    return result


def _markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        f"# CSD trade-off over lambda and tau, {'separate' if s['separate_draft'] else 'self'} draft ({s['draft_bits']} bits), "
        f"K={s['num_draft_tokens']}",
        "",
        f"{s['prompts']} held-out prompts x {s['max_new_tokens']} new tokens (no HumanEval problem the evaluation "
        f"scores, no seed); memory seeded on {s['seed_prompts']} prompts x {s['seed_tokens']} tokens "
        f"({res['memory']['seeded_pairs_recorded']} pairs; above lambda: "
        + ", ".join(f"{lam}: {n}" for lam, n in res["memory"]["seeded_frequent_pairs"].items())
        + "); special tokens and fences protected; eager step. Each csd row starts from the seeded memory "
        "and counts online.",
        "",
        "| mode | mean accepted | x exact | tokens/step | x exact | log-lik/token | change | rescue cost/token "
        "| cost vs exact | tokens != fp32 argmax |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in res["modes"].items():
        lines.append(
            f"| {label} | {m['mean_accepted']:.3f} | x{m['accepted_ratio']:.3f} | {m['tokens_per_step']:.2f} "
            f"| x{m['tokens_per_step_ratio']:.3f} | {m['mean_loglik_per_token']:.4f} | {100 * m['loglik_rel_change']:+.1f}% "
            f"| {m['rescue_cost_per_token']:.4f} | {100 * m['rescue_cost_rel']:+.1f}% "
            f"| {m['tokens_off_fp32_argmax']}/{m['new_tokens']} |"
        )
    pick = res["pick_within_budget"]
    lines += ["", f"Rescue cost vs exact: the extra log-likelihood given up where the text leaves the fp32 target's "
              f"argmax, as a share of exact's mean log-likelihood per token. Within a {100 * s['budget']:g}% rescue-cost "
              "budget: " + (f"**{pick}** (accepted x{res['modes'][pick]['accepted_ratio']:.3f})." if pick else "none."),
              "", "lambda 0 admits every pair the gate passes (the gate alone); a tau near 0 admits every frequent "
              "pair (the memory alone).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
