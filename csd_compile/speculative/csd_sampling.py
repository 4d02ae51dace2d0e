"""CSD rescue for sampling (temperature > 0): an opt-in, LOSSY extension of speculative sampling.

The paper defines CSD for greedy decoding only; this is *our* rule for sampling. Terms as in
``acceptance.py``: draft ``x = d_i ~ q_i``, target distribution ``p_i`` (after temperature / top-p,
the probabilities the step passes to the rule), ``t*_i = argmax p_i`` (first index on ties).

**Rule**, one row, positions ``i = 0..K-1`` in order:

1. *Lossless test* (exactly ``sample_accept``): accept ``x`` with probability ``min(1, p_i(x) / q_i(x))``
   (a float64 uniform ``u_i``; a ``-1`` draft is always rejected).
2. If the test rejects ``x``, ``x != t*_i`` and ``x >= 0``, the pair ``(x, t*_i)`` is a **rejection**.
   It is **rescued** (``x`` accepted anyway, the walk goes on) iff
   ``count(x, t*_i) + 1 > lambda`` (the count *including this occurrence*, as in ``csd::gate``; the
   count is read from the memory as it stood before this step) **and**
   ``p_i(x) >= tau * p_i(t*_i)`` (the semantic-consistency gate on the target's own distribution:
   at temperature ``T`` without top-p this is ``z(x) - z(t*) >= T * log(tau)`` on raw logits).
3. Otherwise the row stops: the token is drawn from the residual ``norm(max(p_i - q_i, 0))``, as in
   lossless sampling; if all ``K`` drafts are kept the bonus is drawn from ``p_K``.

**Counts**: after the decisions, every rejection at a position the walk *reached* (all earlier
positions kept; rescued ones included, the stopping one included) is recorded once with the update
rule of ``pair_table.py``, rows in order then positions in order. Positions after the stop are not
counted (their prefix was rejected). ``update=False`` reads the memory without changing it.

**Distribution produced**: with ``R_i`` = the drafts that would be rescued at position ``i``
(frequent pair with ``t*_i`` and passing the ratio gate), the token emitted at ``i`` given the
prefix has law ``p_i + m - |m| * r_i`` where ``m(y) = [y in R_i] * max(q_i(y) - p_i(y), 0)`` and
``r_i = norm(max(p_i - q_i, 0))``: the probability mass lossless sampling would send to the
residual after rejecting a rescuable ``x`` goes to ``x`` instead. So the total-variation distance to
the target is ``|m| <= q_i(R_i)``, zero when ``R_i`` is empty: with ``lambda = inf`` (or an empty
memory and ``lambda >= 1``) the rule *is* ``sample_accept`` (same random draws in the same order, so
bit-identical outputs under one seed). For a deterministic draft (one-hot ``q``) a rescuable ``x``
is always emitted, the sampling analogue of greedy CSD.

No host syncs: fixed shapes, plain torch; the memory is read with ``table_lookup`` and written with
the masked update ``record_masked_`` of ``pair_table.py`` (B * K tiny tensor ops).
"""

from __future__ import annotations

import math

import torch

from .acceptance import _emit, sample_from
from ..pair_table import record_masked_, table_lookup

__all__ = ["csd_sample_accept", "make_csd_sample_accept", "sampling_rescue_law"]


def _check_lambda_tau(lambda_, tau) -> None:
    if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) or not lambda_ >= 0:
        raise ValueError(f"lambda_={lambda_!r} must be a number >= 0 (float('inf') disables rescue)")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0.0 < tau <= 1.0):
        raise ValueError(f"tau={tau!r} must be a number in (0, 1]")


def csd_sample_accept(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    mem_keys: torch.Tensor,
    mem_counts: torch.Tensor,
    lambda_: float = 6.0,
    tau: float = 0.01,
    update: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSD speculative sampling (module docstring): lossless test, then the calibrated rescue.

    Args:
        draft_tokens: ``[B, K]`` int64 drafts (``-1`` = no proposal).
        draft_probs: ``[B, K, V]`` the draft distributions (one-hot for a deterministic draft).
        target_probs: ``[B, K+1, V]`` target distributions (after temperature / top-p).
        mem_keys, mem_counts: a ``CorrectionMemory``'s ``keys`` / ``counts`` (updated in place if ``update``).
        lambda_: a pair is frequent once its count exceeds this (``>= 0``; ``inf`` = lossless).
        tau: the ratio gate ``p(x) >= tau * p(t*)``, in (0, 1].
        update: record this step's rejections in the memory.

    Returns:
        ``(tokens [B, K+1] padded with -1, num_accepted [B])`` (rescued drafts count as accepted).
    """
    _check_lambda_tau(lambda_, tau)
    if draft_tokens.dim() != 2 or draft_tokens.dtype != torch.int64:
        raise TypeError(f"draft_tokens must be int64 [B, K], got {draft_tokens.dtype} {tuple(draft_tokens.shape)}")
    B, K = draft_tokens.shape
    if tuple(draft_probs.shape[:2]) != (B, K) or tuple(target_probs.shape[:2]) != (B, K + 1):
        raise ValueError(
            f"draft_probs must be [B, K, V] and target_probs [B, K+1, V] for B={B}, K={K}, got "
            f"{tuple(draft_probs.shape)} and {tuple(target_probs.shape)}"
        )
    p = target_probs[:, :K].double()
    q = draft_probs.double()
    safe = draft_tokens.clamp(min=0).unsqueeze(-1)  # [B, K, 1]
    p_d = p.gather(-1, safe).squeeze(-1)
    q_d = q.gather(-1, safe).squeeze(-1)
    u = torch.rand(B, K, dtype=torch.float64, device=p.device)  # same draws, same order as sample_accept
    valid = draft_tokens >= 0
    lossless = valid & (u * q_d < p_d)
    t_star = p.argmax(-1)  # [B, K]
    p_t = p.gather(-1, t_star.unsqueeze(-1)).squeeze(-1)
    rejection = valid & ~lossless & (draft_tokens != t_star)
    if math.isinf(lambda_):
        rescue = torch.zeros_like(rejection)
    else:
        count = table_lookup(mem_keys, mem_counts, safe.squeeze(-1), t_star)  # [B, K] before this step
        rescue = rejection & (count + 1 > lambda_) & (p_d >= tau * p_t)
    ok = lossless | rescue
    num_accepted = ok.to(torch.int64).cumprod(dim=1).sum(dim=1)
    residual = (p - q).clamp(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-300), p)
    last = sample_from(torch.cat([residual, target_probs[:, K:].double()], dim=1))
    if update:
        reached = torch.arange(K, device=p.device).unsqueeze(0) <= num_accepted.unsqueeze(1)  # [B, K]
        counted = rejection & reached
        for b in range(B):
            for i in range(K):
                record_masked_(mem_keys, mem_counts, safe[b, i, 0], t_star[b, i], counted[b, i])
    return _emit(draft_tokens, last, num_accepted), num_accepted


def make_csd_sample_accept(memory, tau: float = 0.01, *, lambda_: float | None = None, update: bool = True):
    """A sampling acceptance rule ``accept(draft_tokens, draft_probs, target_probs)`` backed by
    ``memory`` (a ``CorrectionMemory``): the signature ``build_step`` uses for temperature > 0.

    ``lambda_`` defaults to ``memory.lambda_``; ``float('inf')`` gives lossless ``sample_accept``.
    """
    lam = memory.lambda_ if lambda_ is None else lambda_
    _check_lambda_tau(lam, tau)
    lam, tau = float(lam), float(tau)

    def accept(draft_tokens, draft_probs, target_probs):
        return csd_sample_accept(draft_tokens, draft_probs, target_probs, memory.keys, memory.counts, lam, tau, update)

    return accept


def sampling_rescue_law(p: torch.Tensor, q: torch.Tensor, rescuable: torch.Tensor) -> torch.Tensor:
    """The law of the token emitted at one position (module docstring): ``p + m - |m| * r``.

    Args:
        p: ``[V]`` target distribution; q: ``[V]`` draft distribution;
        rescuable: ``[V]`` bool, the drafts that would be rescued (frequent pair, ratio gate passed).
    """
    p, q = p.double(), q.double()
    m = torch.where(rescuable, (q - p).clamp(min=0.0), torch.zeros_like(p))
    r = (p - q).clamp(min=0.0)
    r = r / r.sum() if r.sum() > 0 else p
    return p + m - m.sum() * r
