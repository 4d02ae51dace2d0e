"""Scoring of generated text for the CSD evaluations (``benchmarks.csd_eval``, ``benchmarks.csd_frontier``):
HumanEval program building (run in ``benchmarks.sandbox``), the fp32 target's teacher-forced
log-likelihood of a mode's own output, the rescue cost, and the categories of tokens that differ from
the target's argmax. No timing and no decoding here.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import torch

__all__ = [
    "build_program", "divergent_pairs", "extract_code", "likelihood_vs_exact", "mean_loglik", "rescue_cost",
    "teacher_forced", "token_category",
]


def extract_code(reply: str) -> str:
    """The code of a chat reply: the first fenced block (```python or ```), else the whole reply.

    An unterminated fence (the reply was cut by ``max_new_tokens``) yields everything after it.
    """
    if not isinstance(reply, str):
        raise TypeError(f"reply must be a str, got {type(reply).__name__}")
    m = re.search(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", reply, flags=re.S)
    return m.group(1) if m else reply


def build_program(problem: dict, reply: str) -> str:
    """The test program for ``problem`` (a HumanEval record) and a model ``reply``.

    If the extracted code defines the entry point it follows the problem's prompt (so the prompt's
    imports are there and the model's definition wins); otherwise it is taken as the body that
    continues the prompt. Then the problem's ``test`` and ``check(entry_point)``.
    """
    missing = {"prompt", "test", "entry_point"} - set(problem)
    if missing:
        raise ValueError(f"problem is missing HumanEval fields {sorted(missing)}")
    code = extract_code(reply)
    entry = problem["entry_point"]
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, flags=re.M):
        body = problem["prompt"] + "\n    pass\n\n" + code
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


def token_category(draft_text: str, target_text: str) -> str:
    """A coarse category of a (emitted, target-argmax) pair of decoded tokens.

    ``whitespace``: they differ only in whitespace; ``formatting``: either holds a newline, backtick,
    ``#`` or ``*``, or one is pure whitespace; ``punctuation``: both are punctuation (after
    stripping); ``synonym``: both are (stripped) alphabetic words; ``other`` otherwise (numbers,
    identifiers, mixed).
    """
    a, b = draft_text, target_text
    sa, sb = a.strip(), b.strip()
    if sa == sb:
        return "whitespace"
    if any(c in s for s in (a, b) for c in "\n`#*") or not sa or not sb:
        return "formatting"
    punct = set(string.punctuation)
    if all(c in punct for c in sa + sb):
        return "punctuation"
    if sa.isalpha() and sb.isalpha():
        return "synonym"
    return "other"


@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, n_prompt: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of the generated tokens, the model's argmax at those positions and its log-prob
    (1-D each)."""
    logits = model(ids).logits[0, n_prompt - 1 : -1].float()
    gen = ids[0, n_prompt:]
    logp_all = torch.log_softmax(logits, -1)
    top_logp, amax = logp_all.max(-1)
    return logp_all.gather(-1, gen.unsqueeze(-1)).squeeze(-1), amax, top_logp


def mean_loglik(logps: list[torch.Tensor]) -> float:
    """Mean log-likelihood per token over several sequences' per-token log-probs."""
    total = sum(float(x.sum()) for x in logps)
    count = sum(x.numel() for x in logps)
    if count == 0:
        raise ValueError("no generated tokens to score")
    return total / count


def rescue_cost(top_logp: torch.Tensor, emitted_logp: torch.Tensor) -> float:
    """Sum over positions of ``log p(argmax) - log p(emitted)`` (``>= 0``; 0 where they agree)."""
    if top_logp.shape != emitted_logp.shape:
        raise ValueError(f"shapes differ: {tuple(top_logp.shape)} vs {tuple(emitted_logp.shape)}")
    return float((top_logp - emitted_logp).clamp(min=0).sum())


def likelihood_vs_exact(mode: dict, exact: dict) -> dict:
    """A mode's mean log-likelihood change and extra rescue cost against exact acceptance's, each as a
    share of exact's mean log-likelihood per token (from the ``mean_loglik_per_token`` and
    ``rescue_cost_per_token`` of both)."""
    scale = abs(exact["mean_loglik_per_token"])
    return {
        "loglik_rel_change": (mode["mean_loglik_per_token"] - exact["mean_loglik_per_token"]) / scale,
        "rescue_cost_rel": (mode["rescue_cost_per_token"] - exact["rescue_cost_per_token"]) / scale,
    }


def divergent_pairs(emitted: torch.Tensor, argmax: torch.Tensor) -> Counter:
    """``Counter`` of (emitted, argmax) id pairs where they differ."""
    miss = emitted != argmax
    return Counter(zip(emitted[miss].tolist(), argmax[miss].tolist()))
