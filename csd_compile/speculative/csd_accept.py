"""CSD acceptance as a word: ``generate(..., acceptance="csd", memory=None, tau=0.3, lam=6)``.

Terms: the greedy CSD rule (``torch.ops.csd.gate``, see ``kernels/gate.py``) accepts a draft ``x``
that differs from the target's top token ``t*`` when the pair ``(x, t*)`` was rejected more than
``lam`` times (the Online Correction Memory, ``CorrectionMemory``) and ``p(x) / p(t*) >= tau``.

:func:`parse_acceptance` checks ``generate``'s acceptance arguments before any work and returns an
:class:`AcceptanceSpec`: the *settings*, hashable, so two calls with the same settings share one
engine (one compiled step, one KV cache); :meth:`AcceptanceSpec.build` makes the rule once per engine.

Defaults (README, CSD section): ``tau=0.3, lam=6``, the held-out frontier's pick within a 2% rescue
cost budget; the paper's setting is ``tau=0.01, lam=6``. Where the memory comes from:

* ``memory=None``: each engine (one per model, draft, K, batch size, cache length and these
  settings) keeps its own memory, empty at first, that learns across calls;
* a path: a file from ``csd-compile calibrate --ocm`` / ``CorrectionMemory.save``, checked against
  ``tokenizer`` when one is given, loaded once per engine (the engine's copy learns; the file is
  never written); a newer file (other size or modification time) makes a new engine;
* a ``CorrectionMemory``: used and updated in place (keep it, ``save`` it); it must be on the model's
  device and, when ``tokenizer`` is given, belong to it (fingerprint).

Protected tokens (never rescued nor counted, see :func:`make_csd_accept`): with ``tokenizer``,
``protected_tokens(tokenizer)`` (special tokens, code fences); without one, the eos/bos/pad ids of
the model's config and generation config. ``acceptance="csd"`` is the paper's greedy rule: with
``temperature > 0`` it is an error (the lossy sampling extension,
``csd_sampling.make_csd_sample_accept``, stays available as a callable ``acceptance``).
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from typing import Any

import torch

from ..kernels.gate import log_tau_of
from .memory import CorrectionMemory, protected_tokens, tokenizer_fingerprint

__all__ = ["ACCEPTANCE_MODES", "AcceptanceSpec", "DEFAULT_LAMBDA", "DEFAULT_TAU", "make_csd_accept", "parse_acceptance"]

ACCEPTANCE_MODES = ("exact", "csd")
DEFAULT_TAU = 0.3
DEFAULT_LAMBDA = 6.0


def _check_lambda(name: str, lam: Any) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"{name}={lam!r} must be a number >= 0 (float('inf') disables rescue)")
    return float(lam)


def make_csd_accept(memory, tau: float = 0.01, *, lambda_: float | None = None, update: bool = True,
                    protected=None, kinds=None):
    """A greedy acceptance rule ``accept(draft_tokens, target_logits) -> (tokens, num_accepted)``
    backed by ``torch.ops.csd.gate`` and ``memory`` (a ``CorrectionMemory``), for the step builder
    (the expert form of ``generate(acceptance="csd")``; reuse one rule object across calls, since
    each new rule is a new engine).

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


@dataclasses.dataclass(frozen=True)
class AcceptanceSpec:
    """The checked acceptance settings of one ``generate`` call; equal settings, equal engine key.

    ``mode``: ``"exact"``, ``"csd"`` or ``"custom"`` (a callable rule); ``source``: where the memory
    comes from (``("own",)``, ``("path", path, size, mtime_ns)``, ``("object", id)``) or the
    callable's ``("callable", id)``. ``payload`` (the loaded memory, the object, the callable) is
    not part of the key; the stored key keeps it alive, so an id is never reused while it is a key.
    """

    mode: str
    tau: float | None = None
    lam: float | None = None
    protected: tuple[int, ...] = ()
    fingerprint: str | None = None
    source: tuple = ()
    payload: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def build(self, device: torch.device) -> tuple[Any, CorrectionMemory | None]:
        """``(rule, memory)`` for a new engine: ``(None, None)`` for exact acceptance (the lossless
        default rules), the callable itself for ``"custom"``, else a CSD rule over the memory."""
        if self.mode == "exact":
            return None, None
        if self.mode == "custom":
            return self.payload, None
        if self.source[0] == "own":
            memory = CorrectionMemory(lambda_=self.lam, device=device, fingerprint=self.fingerprint)
        else:
            memory = self.payload
        rule = make_csd_accept(memory, tau=self.tau, lambda_=self.lam, protected=list(self.protected) or None)
        return rule, memory


_TOKENIZER_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_facts(tokenizer) -> tuple[str, list[int]]:
    """``(fingerprint, protected ids)`` of ``tokenizer``, cached per tokenizer object and vocabulary
    size (about 70 ms for a 49k vocabulary: not paid again on every call; a tokenizer that gains
    tokens is read again)."""
    size = len(tokenizer) if hasattr(type(tokenizer), "__len__") else len(tokenizer.get_vocab())
    try:
        cached = _TOKENIZER_FACTS.get(tokenizer)
    except TypeError:  # not weak-referenceable or not hashable: no cache
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1], cached[2]
    facts = (size, tokenizer_fingerprint(tokenizer), protected_tokens(tokenizer))
    try:
        _TOKENIZER_FACTS[tokenizer] = facts
    except TypeError:
        pass
    return facts[1], facts[2]


def _config_special_ids(target) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(target, "config", None), getattr(target, "generation_config", None)):
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(src, name, None)
            if isinstance(value, torch.Tensor):
                value = value.reshape(-1).tolist()
            for i in [value] if isinstance(value, int) else (value or []):
                if isinstance(i, int) and not isinstance(i, bool) and i >= 0:
                    ids.add(i)
    return ids


def parse_acceptance(target, acceptance: Any, *, memory: Any, tau: Any, lam: Any, tokenizer: Any,
                     temperature: float) -> AcceptanceSpec:
    """Check ``generate``'s acceptance arguments (raise before any work) and return the settings."""
    if acceptance is None:
        acceptance = "exact"
    if isinstance(acceptance, str):
        if acceptance not in ACCEPTANCE_MODES:
            raise ValueError(f"acceptance={acceptance!r} is not one of {list(ACCEPTANCE_MODES)} (or a callable rule)")
    elif not callable(acceptance):
        raise ValueError(f"acceptance={acceptance!r} must be one of {list(ACCEPTANCE_MODES)} or a callable rule")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0.0 < tau <= 1.0):
        raise ValueError(f"tau={tau!r} must be a number in (0, 1]")
    lam = _check_lambda("lam", lam)
    if memory is not None and not isinstance(memory, (str, os.PathLike, CorrectionMemory)):
        raise TypeError(f"memory must be None, a file path or a CorrectionMemory, got {type(memory).__name__}")
    if callable(acceptance):
        if memory is not None:
            raise ValueError("memory= is used only with acceptance='csd'; a callable acceptance brings its own")
        return AcceptanceSpec("custom", source=("callable", id(acceptance)), payload=acceptance)
    if acceptance == "exact":
        if memory is not None:
            raise ValueError("memory= is used only with acceptance='csd', got acceptance='exact'")
        return AcceptanceSpec("exact")
    if temperature > 0.0:
        raise ValueError(
            f"acceptance='csd' is the paper's greedy rule; temperature={temperature!r} > 0 is not supported. "
            "Use temperature=0, or the opt-in lossy sampling rule as a callable: acceptance="
            "csd_compile.speculative.csd_sampling.make_csd_sample_accept(memory, tau=..., lambda_=...)"
        )
    fingerprint, protected = None, _config_special_ids(target)
    if tokenizer is not None:
        fingerprint, tokenizer_ids = _tokenizer_facts(tokenizer)
        protected.update(tokenizer_ids)
    device = next(target.parameters()).device
    if memory is None:
        source, payload = ("own",), None
    elif isinstance(memory, CorrectionMemory):
        if fingerprint is not None and memory.fingerprint not in (None, fingerprint):
            raise ValueError(
                f"memory belongs to another tokenizer (fingerprint {memory.fingerprint[:12]}..., the tokenizer's "
                f"{fingerprint[:12]}...); its counts do not apply"
            )
        if memory.keys.device != device:
            raise ValueError(f"memory is on {memory.keys.device}, the model on {device}; call memory.to({str(device)!r})")
        source, payload = ("object", id(memory)), memory
    else:
        path = os.path.realpath(os.fspath(memory))
        payload = CorrectionMemory.load(path, fingerprint=fingerprint, device=device, check_tokenizer=False)
        st = os.stat(path)
        source = ("path", path, st.st_size, st.st_mtime_ns)
        fingerprint = fingerprint or payload.fingerprint
    return AcceptanceSpec("csd", float(tau), lam, tuple(sorted(protected)), fingerprint, source, payload)
