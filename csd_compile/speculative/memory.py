"""Online Correction Memory (OCM): a bounded, device-resident count table of rejected pairs.

CSD counts how often the target rejects draft token ``d`` in favour of its own top token ``t``.
A pair whose count exceeds ``lambda`` is a rescue candidate (the gate in ``kernels/gate.py``
then also asks the logits). A dense ``[V, V]`` table is out of the question (49k^2 int32 = 9.6 GB),
so the memory is a **set-associative hash table** *(our choice)*:

* ``keys[S, W]`` int64 and ``counts[S, W]`` int32: ``S`` buckets of ``W`` ways each; the key
  format, bucket hash and **update rule** (count up to ``COUNT_MAX``, else the first empty way,
  else **evict the way with the smallest count**) are defined once in ``csd_compile/pair_table.py``
  (re-exported here: ``pair_key``, ``bucket_of``, ``table_lookup``, ``table_record_``).

Why not a count-min sketch: a sketch never forgets and only over-estimates, so a hash collision
can turn an unseen pair into a "frequent" one and rescue a wrong token; here a pair is frequent only
if it was itself seen more than ``lambda`` times (evictions can only *lower* a count to 0), and
``W`` contiguous ways make the look-up one short vector load (linear probing bounded to a window).
Memory is ``S * W * 12`` bytes whatever the vocabulary (default 4096 x 8: 384 KiB). ``decay()``
halves all counts (an optional aging step for long sessions).

Offline seeding: :func:`seed_from_prompts` counts the draft's disagreements with the target along
the target's own greedy text (what the online step would count under exact acceptance).

Files: ``torch.save`` of ``{"header": json, "keys": ..., "counts": ...}``; the JSON header holds the
format name, ``FORMAT_VERSION``, the table geometry and the tokenizer fingerprint. Loading checks all
of them and raises :class:`MemoryFileError` (a ``ValueError``) rather than ever starting from zero.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from ..pair_table import COUNT_MAX, EMPTY, KEY_STRIDE, bucket_of, pair_key, table_lookup, table_record_

__all__ = [
    "COUNT_MAX",
    "CorrectionMemory",
    "FORMAT_VERSION",
    "MemoryFileError",
    "TOKEN_KINDS",
    "bucket_of",
    "pair_key",
    "protected_tokens",
    "seed_from_prompts",
    "table_lookup",
    "table_record_",
    "token_kinds",
    "tokenizer_fingerprint",
]

FORMAT_VERSION = 1
_FORMAT_NAME = "csd-ocm"


class MemoryFileError(ValueError):
    """A correction-memory file that is corrupt, of another version, or for another tokenizer."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A sha256 hex digest of the tokenizer's vocabulary (token -> id), stable across processes."""
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(f"tokenizer must have get_vocab() (a transformers tokenizer), got {type(tokenizer).__name__}")
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")


class CorrectionMemory:
    """The Online Correction Memory: (draft token, target token) -> count, bounded and on device.

    Args:
        num_buckets: ``S``, number of buckets.
        ways: ``W``, pairs per bucket (the probe window).
        lambda_: a pair is frequent once its count exceeds this (paper default 6); ``>= 0``.
        device: where the table lives (the verify step's device).
        fingerprint: the tokenizer fingerprint the counts belong to (see :func:`tokenizer_fingerprint`).

    ``keys`` and ``counts`` are plain tensors: pass them to ``torch.ops.csd.gate`` (which updates
    them in place) or register them as buffers of a compiled step.
    """

    def __init__(
        self,
        num_buckets: int = 4096,
        ways: int = 8,
        lambda_: float = 6,
        device: torch.device | str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        _check_positive_int("num_buckets", num_buckets)
        _check_positive_int("ways", ways)
        if ways & (ways - 1):
            raise ValueError(f"ways={ways!r} must be a power of two (1, 2, 4, 8, 16, ...)")
        if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) or not lambda_ >= 0:
            raise ValueError(f"lambda_={lambda_!r} must be a number >= 0 (float('inf') disables rescue)")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint must be a str or None, got {type(fingerprint).__name__}")
        self.lambda_ = lambda_
        self.fingerprint = fingerprint
        self.keys = torch.full((num_buckets, ways), EMPTY, dtype=torch.int64, device=device)
        self.counts = torch.zeros((num_buckets, ways), dtype=torch.int32, device=device)

    @property
    def num_buckets(self) -> int:
        return self.keys.shape[0]

    @property
    def ways(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        """The most pairs the table can hold."""
        return self.keys.numel()

    def to(self, device: torch.device | str) -> "CorrectionMemory":
        """Move the table to ``device`` (in place); returns self."""
        self.keys, self.counts = self.keys.to(device), self.counts.to(device)
        return self

    def count(self, draft: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Counts of the pairs (any matching shapes), int64."""
        return table_lookup(self.keys, self.counts, torch.as_tensor(draft), torch.as_tensor(target))

    def is_frequent(self, draft: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Whether each pair's count exceeds ``lambda_`` (bool, same shape)."""
        return self.count(draft, target) > self.lambda_

    def record(self, draft: torch.Tensor, target: torch.Tensor) -> None:
        """Count one occurrence of each pair, in order (flattened), with the update rule."""
        d = torch.as_tensor(draft, device=self.keys.device).reshape(-1)
        t = torch.as_tensor(target, device=self.keys.device).reshape(-1)
        if d.shape != t.shape:
            raise ValueError(f"draft and target must have the same number of tokens, got {d.numel()} and {t.numel()}")
        for i in range(d.numel()):
            table_record_(self.keys, self.counts, d[i], t[i])

    def decay(self) -> None:
        """Halve every count (floor); pairs that reach 0 free their way."""
        self.counts.div_(2, rounding_mode="floor")
        self.keys.masked_fill_(self.counts == 0, EMPTY)

    def num_pairs(self) -> torch.Tensor:
        """How many ways are in use (0-d tensor, no host sync)."""
        return (self.keys != EMPTY).sum()

    def top_pairs(self, n: int = 20) -> list[tuple[int, int, int]]:
        """The ``n`` most counted pairs as ``(draft, target, count)`` (host sync: for reports)."""
        keys, counts = self.keys.reshape(-1).cpu(), self.counts.reshape(-1).cpu()
        used = keys != EMPTY
        keys, counts = keys[used], counts[used]
        order = counts.argsort(descending=True, stable=True)[:n]
        return [(int(keys[i]) // KEY_STRIDE, int(keys[i]) % KEY_STRIDE, int(counts[i])) for i in order]

    def state_dict(self) -> dict[str, Any]:
        """The tensors and the JSON header of the file format."""
        header = {
            "format": _FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_buckets": self.num_buckets,
            "ways": self.ways,
            "lambda": self.lambda_,
            "tokenizer": self.fingerprint,
        }
        return {"header": json.dumps(header), "keys": self.keys.cpu(), "counts": self.counts.cpu()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the memory to ``path`` (``torch.save`` of tensors + a JSON header)."""
        if self.fingerprint is None:
            raise ValueError("CorrectionMemory.fingerprint is None: set it (tokenizer_fingerprint(tok)) before save")
        torch.save(self.state_dict(), os.fspath(path))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        tokenizer: Any = None,
        *,
        fingerprint: str | None = None,
        device: torch.device | str | None = None,
        check_tokenizer: bool = True,
    ) -> "CorrectionMemory":
        """Read a memory saved by :meth:`save`, checking it belongs to ``tokenizer``.

        Give ``tokenizer`` or its ``fingerprint``. Raises :class:`MemoryFileError` if the file is
        missing, corrupt, of another format version, or made with another tokenizer.
        ``check_tokenizer=False`` with neither given takes the file's own fingerprint unchecked
        (for callers that have no tokenizer; the counts then apply only if the vocabulary matches).
        """
        if tokenizer is not None:
            fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint is None and check_tokenizer:
            raise ValueError("CorrectionMemory.load needs the tokenizer (or its fingerprint) to check the file")
        path = os.fspath(path)
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            header = json.loads(blob["header"])
            keys, counts = blob["keys"], blob["counts"]
        except FileNotFoundError:
            raise MemoryFileError(f"correction-memory file {path!r} does not exist") from None
        except Exception as e:
            raise MemoryFileError(f"correction-memory file {path!r} is corrupt or not a memory file ({type(e).__name__}: {e})") from None
        if not isinstance(header, dict) or header.get("format") != _FORMAT_NAME:
            raise MemoryFileError(f"{path!r} is not a correction-memory file (format={header.get('format') if isinstance(header, dict) else header!r})")
        if header.get("version") != FORMAT_VERSION:
            raise MemoryFileError(f"{path!r} has format version {header.get('version')!r}; this build reads version {FORMAT_VERSION}")
        if fingerprint is None:
            fingerprint = header.get("tokenizer")
        if header.get("tokenizer") != fingerprint or not isinstance(fingerprint, str):
            raise MemoryFileError(
                f"{path!r} was made with another tokenizer (fingerprint {str(header.get('tokenizer'))[:12]}..., "
                f"expected {str(fingerprint)[:12]}...); its counts do not apply"
            )
        shape = (header.get("num_buckets"), header.get("ways"))
        if (
            not isinstance(keys, torch.Tensor) or not isinstance(counts, torch.Tensor)
            or keys.dtype != torch.int64 or counts.dtype != torch.int32
            or tuple(keys.shape) != shape or tuple(counts.shape) != shape
        ):
            raise MemoryFileError(f"{path!r} is corrupt: tables do not match the header shape {shape}")
        why = _table_damage(keys, counts)
        if why is not None:
            raise MemoryFileError(f"{path!r} is corrupt: {why}")
        try:
            mem = cls(shape[0], shape[1], lambda_=header.get("lambda", 6), device=device, fingerprint=fingerprint)
        except (TypeError, ValueError) as e:
            raise MemoryFileError(f"{path!r} is corrupt: {e}") from None
        mem.keys.copy_(keys)
        mem.counts.copy_(counts)
        return mem


def _table_damage(keys: torch.Tensor, counts: torch.Tensor) -> str | None:
    """Why ``keys``/``counts`` cannot be a table the update rule wrote (``None`` if they can): counts
    in [0, COUNT_MAX], a way empty exactly when its count is 0, keys of token ids in [0, 2**31)
    stored in their own bucket."""
    from ..pair_table import EMPTY, KEY_STRIDE, bucket_of

    empty = keys == EMPTY
    if bool(((counts < 0) | (counts > COUNT_MAX)).any()):
        return f"counts outside [0, {COUNT_MAX}]"
    if not torch.equal(empty, counts == 0):
        return "a way holds a pair with count 0, or a count without a pair"
    used = keys[~empty]
    if used.numel():
        d, t = used // KEY_STRIDE, used % KEY_STRIDE
        if bool(((used < 0) | (d >= KEY_STRIDE)).any()):
            return "keys outside the token-id range"
        rows = torch.arange(keys.shape[0]).view(-1, 1).expand_as(keys)[~empty]
        if not torch.equal(bucket_of(d, t, keys.shape[0]), rows):
            return "pairs stored outside their bucket"
    return None


@torch.no_grad()
def protected_tokens(tokenizer: Any) -> list[int]:
    """Token ids CSD should never rescue, as draft or as target (*our choice*, see ``make_csd_accept``):
    the tokenizer's special tokens (end of text, chat markers) and every token holding a run of two
    or more backticks (code fences). Swapping a fence for a newline, or ending a turn early, is a
    structural change, not a paraphrase: it was the most-rescued pair on HumanEval prompts."""
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ids.update(int(i) for piece, i in vocab.items() if "``" in piece)
    return sorted(ids)


TOKEN_KINDS = ("word", "number", "punctuation", "whitespace", "other")


def token_kinds(tokenizer: Any, vocab_size: int | None = None) -> torch.Tensor:
    """The kind of every token id, int8 ``[V]`` (an index into :data:`TOKEN_KINDS`), from its decoded
    text with surrounding whitespace stripped: letters only -> word, digits only -> number,
    punctuation only -> punctuation, nothing left -> whitespace, anything else -> other.

    For ``make_csd_accept(..., kinds=...)`` (*our choice*): a rescue may swap a word for a word,
    punctuation for punctuation, whitespace for whitespace (the lexical variants the paper's
    rescues are made of), never across kinds (``#`` for ``def``, ``\"\"\"`` for ``return``: a
    comment or a docstring in place of code). ``vocab_size`` pads the table with "other" up to the
    model's logits width (ids past the tokenizer's own)."""
    import string

    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    punct = set(string.punctuation)

    def kind(text: str) -> int:
        core = text.strip()
        if not core:
            return 3
        if core.isascii() and core.isdigit():
            return 1
        if core.isalpha():
            return 0
        if all(c in punct for c in core):
            return 2
        return 4

    kinds = [kind(t) for t in texts]
    if vocab_size is not None:
        if vocab_size < n:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {n} tokens")
        kinds += [4] * (vocab_size - n)
    return torch.tensor(kinds, dtype=torch.int8)


def seed_from_prompts(
    memory: CorrectionMemory,
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Any,
    *,
    draft: Any = "self",
    draft_bits: int = 4,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> int:
    """Seed ``memory`` offline: count the (draft, target) disagreements along the target's own text.

    For each prompt the target continues greedily for ``max_new_tokens``; then both models read
    that text once (teacher forcing) and every generated position where the draft's top token
    differs from the target's is recorded with the update rule. Along the target's greedy text
    these are the pairs the online step would count with exact acceptance (each such position is
    one the verify walk reaches). The ``"self"`` draft reads the target's keys and values of the
    earlier slots, as it does in ``generate`` (``shared_kv_logits``; there, slots drafted earlier in
    the same step carry the draft's own). Statistics only: no weights change.

    Args:
        memory: the table to add to; its ``fingerprint`` is set from ``tokenizer`` if unset and
            must match it otherwise.
        model: the target (a transformers causal LM).
        tokenizer: the target's tokenizer; encodes string prompts.
        prompts: strings, or token-id lists / 1-D tensors.
        draft: ``"self"`` (the target at ``draft_bits`` bits, ``make_self_draft``) or a causal LM
            sharing the vocabulary.
        draft_bits: bit-width of the ``"self"`` draft.
        max_new_tokens: generated tokens per prompt (> 0).
        progress: show a tqdm progress bar.

    Returns:
        The number of pairs recorded.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if isinstance(prompts, (str, torch.Tensor)):
        prompts = [prompts]
    prompts = list(prompts)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if memory.fingerprint not in (None, fingerprint):
        raise ValueError("memory belongs to another tokenizer (fingerprint mismatch); seed a fresh CorrectionMemory")
    from .drafts import make_self_draft, shared_kv_logits

    shared = isinstance(draft, str)
    if shared:
        if draft != "self":
            raise ValueError(f"draft={draft!r} is not supported; use 'self' or a model")
        draft = make_self_draft(model, bits=draft_bits)
    elif not callable(draft):
        raise TypeError(f"draft must be 'self' or a causal LM, got {type(draft).__name__}")
    from tqdm.auto import tqdm

    memory.fingerprint = fingerprint
    device = next(model.parameters()).device
    recorded = 0
    for prompt in tqdm(prompts, desc="seed OCM", unit="prompt", disable=not progress):
        if isinstance(prompt, str):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        else:
            ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
        ids = ids.to(device)
        n_prompt = ids.shape[1]
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", 0)
        text = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad,
        )  # [1, n_prompt + new]
        if shared:
            t_logits, d_logits = shared_kv_logits(model, draft, text[0])
        else:
            t_logits, d_logits = model(text).logits[0], draft(text).logits[0]
        t_star = t_logits.argmax(-1)[n_prompt - 1 : -1]  # target's top at each generated slot
        d_top = d_logits.argmax(-1)[n_prompt - 1 : -1]
        miss = d_top != t_star
        memory.record(d_top[miss].to(memory.keys.device), t_star[miss].to(memory.keys.device))
        recorded += int(miss.sum())
    return recorded
