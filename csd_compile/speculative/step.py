"""The draft-verify step (compiled once, fixed shapes) and the eager prefill.

State between steps, all on the model's device: ``tokens [B, L]`` (row ``b`` holds ``length[b]``
tokens, the first ``pad[b]`` slots padding), ``length [B]``, ``pad [B]``, ``active [B]`` (bool) and
``k`` (0-d, drafts in use this step, ``<= K``). The target cache holds every token of a row but the
last (the eager prefill leaves it so: it runs the whole prompt and appends the first new token);
the step feeds that last token and the ``K`` drafts (``K + 1`` positions), accepts, writes the
emitted tokens into ``tokens`` and advances ``length``. Rejected slots stay in the caches and are
overwritten by the next step (rollback by position index). No ``.item()``, no host sync.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .acceptance import greedy_accept, logits_to_probs, sample_accept, sample_from
from .cache import RowCache
from .drafts import model_forward

__all__ = ["build_step", "prefill"]


def prefill(target, cache: RowCache, draft, tokens: torch.Tensor, pad: torch.Tensor, *, temperature: float = 0.0,
            top_p: float = 1.0) -> torch.Tensor:
    """Fill the target cache with every prompt slot from the batch's first real token on (and a
    model draft's with all but the last); eager. Returns the first new token ``[B]``: greedy, or
    sampled from the target's distribution.

    The first token comes from the prompt's own forward, as in plain decoding, so the prompt's last
    slot goes through the same kernels as there (a many-row GEMM can round differently from the
    few-row kernels of the verify pass)."""
    # slots left of every row's first real token are padding no query sees: skip them (a prompt
    # left-padded to a shared width costs its own length, not the width)
    s0 = int(pad.min())
    start = torch.full_like(pad, s0)
    logits = model_forward(target, cache, tokens[:, s0:], start, pad, 1)[:, -1]  # [B, V]
    draft.prefill(tokens, pad, s0)  # after the target's: a self draft copies its keys and values
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    return sample_from(logits_to_probs(logits, temperature, top_p))


def build_step(
    target,
    cache: RowCache,
    draft,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    acceptance: Callable | None = None,
) -> Callable:
    """The step function ``step(tokens, length, pad, active, k) -> (emitted [B, K+1], num_accepted [B])``.

    Args:
        target: the target model (an HF causal LM, not a compiled wrapper).
        cache: the target's :class:`RowCache`.
        draft: a draft source (``ModelDraft`` / ``NgramDraft``); its ``K`` fixes the graph's shape.
        temperature, top_p: ``temperature == 0`` is greedy; otherwise speculative sampling.
        acceptance: the acceptance rule; greedy rules take ``(drafts [B,K], target_logits [B,K+1,V])``,
            sampling rules ``(drafts, draft_probs [B,K,V], target_probs [B,K+1,V])``; both return
            ``(tokens [B,K+1] padded -1, num_accepted [B])``. Defaults to the lossless rules.

    Wrap the result in ``torch.compile(step, backend="csd", fullgraph=True)``.
    """
    sampling = temperature > 0.0
    accept = acceptance or (sample_accept if sampling else greedy_accept)
    K = draft.K

    def step(tokens, length, pad, active, k):
        B, L = tokens.shape
        drafts, q = draft.propose(tokens, length, pad, k, sampling)  # [B, K], [B, K, V] | None
        start = length - 1
        ids = torch.cat([tokens.gather(1, start.view(B, 1)), drafts.clamp(min=0)], dim=1)  # [B, K+1]
        logits = model_forward(target, cache, ids, start, pad, K + 1)  # [B, K+1, V]
        if sampling:
            out, n = accept(drafts, q, logits_to_probs(logits, temperature, top_p))
        else:
            out, n = accept(drafts, logits)
        slots = (length.view(B, 1) + torch.arange(K + 1, device=tokens.device).view(1, K + 1)).clamp(max=L - 1)
        keep = tokens.gather(1, slots)
        tokens.scatter_(1, slots, torch.where(active.view(B, 1) & (out >= 0), out, keep))
        length.add_(torch.where(active, n + 1, torch.zeros_like(n)))
        return out, n

    return step
