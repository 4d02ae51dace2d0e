"""Lossless acceptance rules of speculative decoding, in plain torch (no host sync, fixed shapes).

Terms, for one row with ``K`` draft tokens ``d_0..d_{K-1}`` and target distributions ``p_0..p_K``
(``p_i`` is the target's prediction for the position of ``d_i``; ``p_K`` follows the last draft):

- **accepted**: the leading drafts the rule keeps; their count is ``num_accepted`` (0..K).
- **recovered**: the token emitted at the first rejected position: the target's argmax (greedy) or a
  sample from the residual ``norm(max(p_i - q_i, 0))`` (sampling).
- **bonus**: the token emitted after all ``K`` drafts were accepted: argmax of / sample from ``p_K``.

Every rule returns ``tokens [B, K+1]`` (accepted drafts, then the recovered or bonus token, then
``-1`` padding) and ``num_accepted [B]``; a row emits ``num_accepted + 1`` tokens. A draft token of
``-1`` means "no proposal here": it is always rejected, so a row can be given fewer than K drafts.
"""

from __future__ import annotations

import torch

__all__ = ["greedy_accept", "sample_accept", "sample_from", "logits_to_probs"]


def _emit(proposed: torch.Tensor, last: torch.Tensor, num_accepted: torch.Tensor) -> torch.Tensor:
    # proposed [B, K], last [B, K+1] (the token to emit if position i is the first rejected one)
    B, K = proposed.shape
    idx = torch.arange(K + 1, device=proposed.device).expand(B, K + 1)
    padded = torch.cat([proposed, proposed.new_full((B, 1), -1)], dim=1)
    n = num_accepted.unsqueeze(1)
    out = torch.where(idx < n, padded, last)
    return torch.where(idx <= n, out, torch.full_like(out, -1))


def greedy_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: keep the drafts that equal the target's argmax, then one target token.

    Args:
        draft_tokens: ``[B, K]`` int64 draft proposals (``-1`` = no proposal).
        target_logits: ``[B, K+1, V]`` target logits at the positions of the drafts plus one.

    Returns:
        ``(tokens [B, K+1] padded with -1, num_accepted [B])``. The emitted tokens are exactly what
        greedy decoding of the target alone would produce.
    """
    target = target_logits.argmax(dim=-1)  # [B, K+1]
    match = draft_tokens == target[:, :-1]  # [B, K]
    num_accepted = match.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [B]
    return _emit(draft_tokens, target, num_accepted), num_accepted


def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Softmax of ``logits / temperature`` in float32, restricted to the top-p nucleus and renormalised.

    ``temperature`` and ``top_p`` are Python floats (fixed per compiled graph); ``top_p == 1`` keeps all.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep a token if the mass strictly before it is below top_p (the top token is always kept)
        keep_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor) -> torch.Tensor:
    """One sample per row of ``probs [..., V]`` without a host sync: argmax of ``p / Exp(1)`` noise."""
    noise = torch.empty_like(probs, dtype=torch.float64).exponential_(1.0)
    return (probs.double() / noise).argmax(dim=-1)


def sample_accept(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the output is distributed
    exactly as sampling from the target alone.

    Draft ``d_i ~ q_i`` is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))`` (uniforms in
    float64); at the first rejection a token is drawn from ``norm(max(p_i - q_i, 0))``; if all are
    accepted the bonus is drawn from ``p_K``.

    Args:
        draft_tokens: ``[B, K]`` int64 drafts (``-1`` = no proposal, always rejected).
        draft_probs: ``[B, K, V]`` the distributions the drafts were drawn from (a one-hot row for a
            deterministic draft such as n-gram lookup; zeros for a ``-1`` slot).
        target_probs: ``[B, K+1, V]`` target distributions (after temperature / top-p).

    Returns:
        ``(tokens [B, K+1] padded with -1, num_accepted [B])``.
    """
    B, K = draft_tokens.shape
    p = target_probs[:, :K].double()
    q = draft_probs.double()
    safe = draft_tokens.clamp(min=0).unsqueeze(-1)  # [B, K, 1]
    p_d = p.gather(-1, safe).squeeze(-1)
    q_d = q.gather(-1, safe).squeeze(-1)
    u = torch.rand(B, K, dtype=torch.float64, device=p.device)
    ok = (draft_tokens >= 0) & (u * q_d < p_d)  # u < p/q, without dividing by a zero q
    num_accepted = ok.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [B]
    residual = (p - q).clamp(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    # p == q exactly leaves no residual mass; then any sample from p is right (it is never reached
    # in exact arithmetic, this only guards the division)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-300), p)
    last_dist = torch.cat([residual, target_probs[:, K:].double()], dim=1)  # [B, K+1, V]
    last = sample_from(last_dist)  # [B, K+1]
    return _emit(draft_tokens, last, num_accepted), num_accepted
