"""Draft sources for the draft-verify step: a small model, the target at low bits, n-gram lookup.

Every draft has ``propose(tokens, length, pad, k, sampling) -> (drafts [B, K], probs [B, K, V] | None)``
with fixed shapes: ``tokens [B, L]`` is the token buffer (row ``b`` holds ``length[b]`` tokens,
the first ``pad[b]`` of them padding), ``k`` a 0-d tensor; slots ``>= k`` are returned as ``-1``
("no proposal"). ``probs`` are the distributions the drafts were drawn from (needed by sampling).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .acceptance import logits_to_probs, sample_from
from .cache import RowCache, row_mask

__all__ = ["ModelDraft", "NgramDraft", "NoDraft", "check_same_vocab", "make_self_draft", "model_forward", "vocab_size"]


def vocab_size(model: nn.Module) -> int:
    """Rows of the model's output projection (falls back to ``config.vocab_size``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_same_vocab(target: nn.Module, draft: nn.Module) -> None:
    """Raise ``ValueError`` unless ``draft`` predicts over the same vocabulary as ``target``."""
    vt, vd = vocab_size(target), vocab_size(draft)
    if vt != vd:
        raise ValueError(
            f"draft model vocabulary ({vd} tokens) differs from the target's ({vt} tokens); "
            "a draft model must share the target's tokenizer and vocabulary"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        a, b = getattr(target.config, name, None), getattr(draft.config, name, None)
        if a is not None and b is not None and a != b:
            raise ValueError(
                f"draft model {name}={b!r} differs from the target's {name}={a!r}; "
                "a draft model must share the target's tokenizer"
            )


def model_forward(model, cache: RowCache, ids: torch.Tensor, start: torch.Tensor, pad: torch.Tensor, keep: int):
    """Run ``model`` on ``ids [B, T]`` placed at slots ``start[b] + t`` of ``cache``; logits of the last
    ``keep`` positions ``[B, keep, V]``."""
    B, T = ids.shape
    cache.start.copy_(start)
    pos = (start.view(B, 1) + torch.arange(T, device=ids.device).view(1, T) - pad.view(B, 1)).clamp(min=0)
    sdpa = getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"
    mask = row_mask(start, pad, T, cache.max_len, boolean=sdpa, dtype=cache.keys[0].dtype)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=keep)
    return out.logits


def _mask_k(drafts: torch.Tensor, probs, k: torch.Tensor):
    K = drafts.shape[1]
    live = torch.arange(K, device=drafts.device).view(1, K) < k
    drafts = torch.where(live, drafts, torch.full_like(drafts, -1))
    if probs is not None:
        probs = probs * live.unsqueeze(-1).to(probs.dtype)
    return drafts, probs


class ModelDraft:
    """A draft language model with its own :class:`RowCache` (a separate small model, or the target at
    low bits from :func:`make_self_draft`).

    Invariant between steps: the cache holds every token of a row but the last two; each step first
    re-feeds those two (rewriting one slot with the same values), then drafts one token per forward.
    """

    def __init__(self, model: nn.Module, num_draft_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0):
        self.model = model
        self.K = num_draft_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.cache: RowCache | None = None

    def allocate(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> None:
        self.cache = RowCache(self.model.config, batch_size, max_len, dtype=dtype, device=device)

    def prefill(self, tokens: torch.Tensor, pad: torch.Tensor) -> None:
        """Fill the cache with all prompt slots but the last (eager, once per generation)."""
        B, S = tokens.shape
        if S > 1:
            model_forward(self.model, self.cache, tokens[:, :-1], torch.zeros_like(pad), pad, 1)

    def _pick(self, logits: torch.Tensor):
        if self.temperature == 0.0:
            return logits.argmax(dim=-1), None
        probs = logits_to_probs(logits, self.temperature, self.top_p)
        return sample_from(probs), probs

    def propose(self, tokens, length, pad, k, sampling: bool):
        B = tokens.shape[0]
        start = length - 2
        ids = tokens.gather(1, torch.stack([start, start + 1], dim=1).clamp(min=0))  # [B, 2]
        drafts, probs = [], []
        for i in range(self.K):
            logits = model_forward(self.model, self.cache, ids, start, pad, 1)[:, -1]  # [B, V]
            tok, pr = self._pick(logits)
            drafts.append(tok)
            probs.append(pr)
            start = start + ids.shape[1]
            ids = tok.view(B, 1)
        d = torch.stack(drafts, dim=1)  # [B, K]
        p = torch.stack(probs, dim=1) if sampling else None  # [B, K, V]
        return _mask_k(d, p, k)


class NgramDraft:
    """Prompt lookup: the longest n-gram (``max_ngram`` down to ``min_ngram`` tokens) that ends the
    row and occurred earlier in it; propose up to ``K`` tokens that followed its most recent
    occurrence. No match, no proposal.

    The lookup runs on the host, between steps, on the token lists the generate loop keeps anyway
    (:meth:`lookup`); the loop writes the proposals into :attr:`buffer` ``[B, K]`` (``-1`` padded)
    and the compiled step reads them there (:meth:`propose`). Knowing the proposals before the step
    lets the loop run a one-token decode step when no row has any (``host = True``): a verify pass
    over ``K + 1`` positions costs more than one decode step, and is paid only when it can pay off.
    """

    host = True

    def __init__(self, num_draft_tokens: int, vocab: int, *, max_ngram: int = 3, min_ngram: int = 2):
        self.K = num_draft_tokens
        self.vocab = vocab
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.cache = None
        self.buffer: torch.Tensor | None = None

    def allocate(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> None:
        self.buffer = torch.full((batch_size, self.K), -1, dtype=torch.int64, device=device)

    def prefill(self, tokens: torch.Tensor, pad: torch.Tensor) -> None:
        pass

    def lookup(self, seq: Sequence[int]) -> list[int]:
        """The proposal (at most ``K`` tokens, possibly none) for a row whose tokens are ``seq``."""
        L = len(seq)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            tail = list(seq[L - n:])
            for j in range(L - n - 1, -1, -1):  # most recent earlier occurrence first
                if seq[j] == tail[0] and list(seq[j:j + n]) == tail:
                    return list(seq[j + n:j + n + self.K])
        return []

    def propose(self, tokens, length, pad, k, sampling: bool):
        drafts = self.buffer
        probs = None
        if sampling:  # a deterministic draft: one-hot rows, zeros for "no proposal"
            probs = torch.nn.functional.one_hot(drafts.clamp(min=0), self.vocab).to(torch.float32)
            probs = probs * (drafts >= 0).unsqueeze(-1).to(probs.dtype)
        return _mask_k(drafts, probs, k)


class NoDraft:
    """No proposals (``K = 0``): the step it builds is plain one-token decoding."""

    K = 0

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.cache = None

    def allocate(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> None:
        pass

    def prefill(self, tokens: torch.Tensor, pad: torch.Tensor) -> None:
        pass

    def propose(self, tokens, length, pad, k, sampling: bool):
        B = tokens.shape[0]
        probs = torch.zeros(B, 0, self.vocab, device=tokens.device) if sampling else None
        return tokens.new_empty((B, 0)), probs


def make_self_draft(target: nn.Module, *, bits: int = 4, group_size: int = 64, quantize_lm_head: bool = False):
    """The target at ``bits`` bits: a shallow copy of its module tree whose ``nn.Linear`` layers are
    ``csd_compile.quant.QLinear`` (other weights shared with the target, not copied)."""
    from ..quant import QLinear  # the FlexQuant linear (csd::qlinear op)

    head = target.get_output_embeddings() if hasattr(target, "get_output_embeddings") else None

    def swap(mod: nn.Module) -> nn.Module:
        if isinstance(mod, nn.Linear) and (quantize_lm_head or mod is not head):
            return QLinear.from_linear(mod, bits=bits, group_size=group_size)
        new = copy.copy(mod)
        new._modules = {name: swap(child) if child is not None else None for name, child in mod._modules.items()}
        return new

    return swap(target)
