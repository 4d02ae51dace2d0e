"""The greedy CSD acceptance rule for the speculative step: :func:`make_csd_accept`.

The rule accepts a draft ``x`` that differs from the target's top token ``t*`` when the pair
``(x, t*)`` was rejected more than ``lambda`` times (the Online Correction Memory,
``CorrectionMemory``) and ``p(x) / p(t*) >= tau``, through the fused ``torch.ops.csd.gate``
(``kernels/gate.py``).
"""

from __future__ import annotations

import torch

from ..kernels.gate import log_tau_of

__all__ = ["make_csd_accept"]


def _check_lambda(name: str, lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"{name}={lam!r} must be a number >= 0 (float('inf') disables rescue)")
    return float(lam)


def make_csd_accept(memory, tau: float = 0.01, *, lambda_: float | None = None, update: bool = True,
                    protected=None, kinds=None):
    """A greedy acceptance rule ``accept(draft_tokens, target_logits) -> (tokens, num_accepted)``
    backed by ``torch.ops.csd.gate`` and ``memory`` (a ``CorrectionMemory``), for the step builder.

    Works inside a ``fullgraph`` compiled step: the memory tensors become graph inputs updated in
    place. ``lambda_`` defaults to ``memory.lambda_``; ``float('inf')`` gives exact acceptance.

    ``protected``: token ids (e.g. ``protected_tokens(tokenizer)``) never rescued, whether the draft
    proposes one where the target wants another token or the target wants one where the draft
    proposes another (*our addition to the paper*). Such a mismatch is rejected as in exact
    acceptance and not counted in the memory; an exact match of a protected token is accepted.
    ``kinds``: a token-kind table (``token_kinds(tokenizer, V)``); a rescue across kinds is refused
    the same way.
    """
    log_tau = log_tau_of(tau)
    lam = _check_lambda("lambda_", memory.lambda_ if lambda_ is None else lambda_)
    guard = kind_of = None
    if protected is not None:
        guard = torch.as_tensor(protected, dtype=torch.int64, device=memory.keys.device).reshape(-1)
    if kinds is not None:
        kind_of = torch.as_tensor(kinds, device=memory.keys.device).reshape(-1).to(torch.int8)
        if kind_of.numel() == 0:
            raise ValueError("kinds must give a kind for every token id, got an empty table")

    def accept(draft_tokens, target_logits):
        if guard is not None or kind_of is not None:
            if kind_of is not None and kind_of.numel() != target_logits.shape[-1]:
                raise ValueError(f"kinds has {kind_of.numel()} entries, the target logits {target_logits.shape[-1]} "
                                 "tokens; pass token_kinds(tokenizer, vocab_size)")
            draft_tokens = _unrescuable(draft_tokens, target_logits, guard, kind_of)
        return torch.ops.csd.gate(draft_tokens, target_logits, memory.keys, memory.counts, lam, log_tau, update)

    return accept


def _unrescuable(draft_tokens: torch.Tensor, target_logits: torch.Tensor, guard: torch.Tensor | None,
                 kind_of: torch.Tensor | None = None) -> torch.Tensor:
    """``draft_tokens`` with ``-1`` ("no proposal": rejected, never counted) wherever the draft and
    the target's top token differ and either of them is in ``guard``, or their kinds differ."""
    t_star = target_logits[:, : draft_tokens.shape[1]].argmax(-1)
    hit = torch.zeros_like(draft_tokens, dtype=torch.bool)
    if guard is not None:
        hit = torch.isin(draft_tokens, guard) | torch.isin(t_star, guard)
    if kind_of is not None:
        hit = hit | (kind_of[draft_tokens.clamp(min=0)] != kind_of[t_star])
    return torch.where(hit & (draft_tokens != t_star), torch.full_like(draft_tokens, -1), draft_tokens)
