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
from .cache import RowCache, attention_masks, encode_mask, row_mask, slot_index

__all__ = [
    "ModelDraft", "NgramDraft", "NoDraft", "check_same_vocab", "make_self_draft", "model_forward", "shared_kv_logits",
    "vocab_size",
]


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


def _boolean_mask(model) -> bool:
    """Whether ``model``'s attention takes a boolean mask (SDPA) rather than an additive one."""
    return getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"


def model_forward(model, cache: RowCache, ids: torch.Tensor, start: torch.Tensor, pad: torch.Tensor, keep: int):
    """Run ``model`` on ``ids [B, T]`` placed at slots ``start[b] + t`` of ``cache``; logits of the last
    ``keep`` positions ``[B, keep, V]``."""
    B, T = ids.shape
    cache.start.copy_(start)
    pos = (start.view(B, 1) + torch.arange(T, device=ids.device).view(1, T) - pad.view(B, 1)).clamp(min=0)
    boolean, dtype = _boolean_mask(model), cache.keys[0].dtype
    mask = attention_masks(model.config, lambda window: row_mask(start, pad, T, cache.max_len, boolean=boolean,
                                                                 dtype=dtype, window=window))
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=keep)
    return out.logits


@torch.no_grad()
def shared_kv_logits(target, draft, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits ``[T, V]`` of the target and of a ``share_target_kv`` draft along ``ids [T]``.

    The draft predicts after slot ``i`` from its own forward of token ``i`` over the target's keys
    and values of slots ``< i``, as the live draft's first proposal of a step does. One pass each:
    the target writes slots ``0 .. T-1`` of a ``2T`` cache, the draft writes ``T .. 2T-1``, and the
    draft's query ``i`` sees target slots ``< i`` and its own slot ``T + i``."""
    T = ids.shape[-1]
    ids = ids.reshape(1, T)
    p = next(target.parameters())
    cache = RowCache(target.config, 1, 2 * T, dtype=p.dtype, device=ids.device)
    zero = torch.zeros(1, dtype=torch.int64, device=ids.device)
    t_logits = model_forward(target, cache, ids, zero, zero, T)[0]
    i = torch.arange(T, device=ids.device).view(T, 1)
    j = torch.arange(2 * T, device=ids.device).view(1, 2 * T)

    def visible_of(window):
        seen = j < i if window is None else (j < i) & (j > i - window)
        return encode_mask((seen | (j == T + i)).view(1, 1, T, 2 * T), boolean=_boolean_mask(draft), dtype=p.dtype)

    mask = attention_masks(draft.config, visible_of)  # [T, 2T] per layer kind
    cache.start.fill_(T)
    out = draft(input_ids=ids, attention_mask=mask, position_ids=i.view(1, T), cache=cache, use_cache=True,
                logits_to_keep=T)
    return t_logits, out.logits[0]


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

    ``share_target_kv`` (the ``"self"`` draft: the same architecture, hence the same cache layout)
    replaces the draft's keys and values with the target's wherever the target has them: the prefill
    copies the prompt's slots instead of running the draft over the prompt, and each step first copies
    the slots the last verify pass kept (the cache then holds every token but the last), then feeds
    only the row's last token. Only the drafted tokens go through the draft's own (low-bit) layers.
    On SmolLM2-135M with the 4-bit self draft (K=6, 32 HumanEval prompts) this raised exact
    acceptance from 3.61 to 4.55 tokens per step (``benchmarks/results/csd``).
    """

    def __init__(self, model: nn.Module, num_draft_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 share_target_kv: bool = False):
        self.model = model
        self.share_target_kv = share_target_kv
        self.K = num_draft_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.cache: RowCache | None = None
        self.target_cache: RowCache | None = None

    def allocate(self, batch_size: int, max_len: int, dtype: torch.dtype, device, target_cache: RowCache) -> None:
        """Allocate the draft's cache; keep the target's (``target_cache``) for ``share_target_kv``."""
        self.cache = RowCache(self.model.config, batch_size, max_len, dtype=dtype, device=device)
        self.target_cache = target_cache

    def _pairs(self):
        return zip(self.cache.keys + self.cache.values, self.target_cache.keys + self.target_cache.values)

    def prefill(self, tokens: torch.Tensor, pad: torch.Tensor, first: int) -> None:
        """Fill the cache with the prompt slots ``first .. S - 2`` (all but the last; eager, once per
        generation), after the target's prefill: with ``share_target_kv`` they are copied from the
        target's cache instead of running the draft over the prompt."""
        S = tokens.shape[1]
        if S - 1 <= first:
            return
        if self.share_target_kv:
            for mine, theirs in self._pairs():
                mine[:, :, first : S - 1].copy_(theirs[:, :, first : S - 1])
            return
        model_forward(self.model, self.cache, tokens[:, first:-1], torch.full_like(pad, first), pad, 1)

    def _pick(self, logits: torch.Tensor):
        if self.temperature == 0.0:
            return logits.argmax(dim=-1), None
        probs = logits_to_probs(logits, self.temperature, self.top_p)
        return sample_from(probs), probs

    def _copy_verified(self, length: torch.Tensor) -> None:
        """Copy the target's keys/values of the ``K + 1`` slots ending at ``length - 2`` (every slot
        the last verify pass wrote and kept) into the draft cache."""
        B, W = length.shape[0], self.K + 1
        slots = ((length - 1 - W).view(B, 1) + torch.arange(W, device=length.device).view(1, W)).clamp(min=0)
        index = slot_index(slots, self.cache.keys[0].shape[1])
        for mine, theirs in self._pairs():
            mine.index_put_(index, theirs[index])

    def propose(self, tokens, length, pad, k, sampling: bool):
        B = tokens.shape[0]
        if self.share_target_kv:  # the cache holds every slot but the last: feed that one
            self._copy_verified(length)
            start = length - 1
            ids = tokens.gather(1, start.view(B, 1))  # [B, 1]
        else:
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

    def allocate(self, batch_size: int, max_len: int, dtype: torch.dtype, device, target_cache: RowCache) -> None:
        self.buffer = torch.full((batch_size, self.K), -1, dtype=torch.int64, device=device)

    def prefill(self, tokens: torch.Tensor, pad: torch.Tensor, first: int) -> None:
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

    def allocate(self, batch_size: int, max_len: int, dtype: torch.dtype, device, target_cache: RowCache) -> None:
        pass

    def prefill(self, tokens: torch.Tensor, pad: torch.Tensor, first: int) -> None:
        pass

    def propose(self, tokens, length, pad, k, sampling: bool):
        B = tokens.shape[0]
        probs = torch.zeros(B, 0, self.vocab, device=tokens.device) if sampling else None
        return tokens.new_empty((B, 0)), probs


def make_self_draft(target: nn.Module, *, bits: int = 4, group_size: int = 64, quantize_lm_head: bool = False):
    """The target at ``bits`` bits: a shallow copy of its module tree whose linear layers are
    ``QLinear`` views (:meth:`~csd_compile.quant.QLinear.view`) of the target's own quantized copy
    of each weight (``quant.registry``; made on first use, shared with the compiled target when it
    runs at the same group size) at the draft's bit-width. Other weights are shared, not copied;
    a target already quantized with ``quantize_`` lends its ``QLinear`` s' weights the same way.

    The LM head module is kept as it is (dense) unless ``quantize_lm_head``: a 4-bit draft head
    reads far fewer bytes, but on the embedded model (8-bit fp32 target) it lowered acceptance from
    2.82 to 2.28 tokens per step and the whole from 0.72x to 0.66x plain decoding
    (``benchmarks/self_draft_head.py``)."""
    from ..parallel import AllReduced, RowParallelLinear
    from ..quant import QLinear  # the FlexQuant linear (csd::qlinear op)
    from ..quant.registry import quantized_copy

    head = target.get_output_embeddings() if hasattr(target, "get_output_embeddings") else None

    def swap(mod: nn.Module) -> nn.Module:
        if isinstance(mod, QLinear):
            return mod if mod is head and not quantize_lm_head else mod.view(bits, mod.bias)
        if isinstance(mod, nn.Linear) and (quantize_lm_head or mod is not head):
            n, k = mod.weight.shape
            if n % 2 or k % group_size:  # a shape the format cannot hold stays as it is
                return mod
            base, _ = quantized_copy(mod.weight, group_size, bits, static=False, in_graph=False)
            view = base.view(bits, mod.bias)
            # a tensor-parallel row shard keeps its all-reduce around the quantized view
            return AllReduced(view, mod.group) if isinstance(mod, RowParallelLinear) else view
        new = copy.copy(mod)
        new._modules = {name: swap(child) if child is not None else None for name, child in mod._modules.items()}
        return new

    return swap(target)
