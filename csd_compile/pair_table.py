"""The Online Correction Memory's pair table: its format and its ONE update rule, written once.

Everything that reads or writes the table takes its constants and rule from here: the memory
(``speculative/memory.py``), the greedy gate (``kernels/gate.py``: the reference, the CPU walk and
the Triton kernel, which receives the constants as ``tl.constexpr`` arguments) and the sampling
rescue (``speculative/csd_sampling.py``). This module depends on torch only.

**Format** (a set-associative hash table, *our choice*): ``keys[S, W]`` int64 and ``counts[S, W]``
int32, ``S`` buckets of ``W`` ways; an empty way holds key :data:`EMPTY` (``-1``).

* key of the pair (draft ``d``, target ``t``): ``d * KEY_STRIDE + t`` (:func:`pair_key`);
* its bucket: ``((d * H1) ^ (t * H2)) % S`` (:func:`bucket_of`). Token ids are below ``2**31``,
  so no product overflows int64 and torch, numpy, Python ints and Triton agree bit for bit.

**Update rule** (one pair): if the pair is in its bucket its count goes up by one, saturating at
:data:`COUNT_MAX`; else it takes the first empty way with count 1; else it evicts the way with the
smallest count (the first one on ties) and starts at count 1. :func:`record_masked_` is the rule on
tensors (no host sync; applied only where ``on``), :func:`record_scalar_` the same rule on host
arrays for sequential walks; both return the pair's count after the step.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "COUNT_MAX", "EMPTY", "H1", "H2", "KEY_STRIDE", "LAMBDA_CAP", "bucket_of", "pair_key", "record_masked_",
    "record_scalar_", "table_lookup", "table_record_",
]

KEY_STRIDE = 2**31  # key = draft * KEY_STRIDE + target
H1, H2 = 73856093, 19349663  # bucket hash multipliers of draft and target
COUNT_MAX = 2**30  # counts saturate here
LAMBDA_CAP = float(2 * COUNT_MAX)  # any lambda at or above never rescues (a count never exceeds it)
EMPTY = -1  # the key of an unused way


def pair_key(draft: Any, target: Any) -> Any:
    """The table key of (draft, target): ``draft * KEY_STRIDE + target`` (tensors or ints)."""
    return draft * KEY_STRIDE + target


def bucket_of(draft: Any, target: Any, num_buckets: int) -> Any:
    """The bucket of (draft, target) in a table of ``num_buckets`` buckets (tensors or ints)."""
    return ((draft * H1) ^ (target * H2)) % num_buckets


def table_lookup(keys: torch.Tensor, counts: torch.Tensor, draft: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Counts of the pairs ``(draft, target)`` (same shape, int64); 0 for pairs not in the table."""
    d, t = draft.long(), target.long()
    s = bucket_of(d, t, keys.shape[0])
    hit = keys[s] == pair_key(d, t).unsqueeze(-1)  # [..., W]
    return (counts[s].long() * hit).sum(-1)


def record_masked_(keys: torch.Tensor, counts: torch.Tensor, draft: torch.Tensor, target: torch.Tensor,
                   on: torch.Tensor | bool = True) -> torch.Tensor:
    """The update rule for one pair (0-d int tensors), applied in place only where ``on`` (0-d bool
    tensor or bool). Returns the pair's count after the step (unchanged, 0 if absent, where not
    ``on``). Tensor ops only, no host sync: it traces into a compiled graph."""
    d, t = draft.long(), target.long()
    s = bucket_of(d, t, keys.shape[0])
    key = pair_key(d, t)
    row_k, row_c = keys[s], counts[s]  # [W]
    hit, empty = row_k == key, row_k == EMPTY
    slot = torch.where(hit.any(), hit.int().argmax(), torch.where(empty.any(), empty.int().argmax(), row_c.argmin()))
    old = torch.where(hit.any(), row_c[slot], torch.zeros_like(row_c[slot]))
    new = torch.where(hit.any(), (old + 1).clamp(max=COUNT_MAX), torch.ones_like(old))
    on = torch.as_tensor(on, device=keys.device)
    keys[s, slot] = torch.where(on, key, row_k[slot])
    counts[s, slot] = torch.where(on, new, row_c[slot])
    return torch.where(on, new, old)


def table_record_(keys: torch.Tensor, counts: torch.Tensor, draft: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The update rule for one pair (0-d int tensors), in place; returns its new count.

    The reference semantics every implementation follows (:func:`record_masked_`, always on)."""
    return record_masked_(keys, counts, draft, target, True)


def record_scalar_(keys, counts, draft: int, target: int, on: bool = True) -> int:
    """:func:`record_masked_` for Python ints on host arrays (numpy views of the tables, whose
    writes land in the tensors): the form for a sequential walk, one pair at a time."""
    s, key = bucket_of(draft, target, keys.shape[0]), pair_key(draft, target)
    row_k = keys[s].tolist()
    if key in row_k:
        slot = row_k.index(key)
        old = int(counts[s, slot])
        new = min(old + 1, COUNT_MAX)
    else:
        slot = row_k.index(EMPTY) if EMPTY in row_k else int(counts[s].argmin())
        old, new = 0, 1
    if not on:
        return old
    keys[s, slot], counts[s, slot] = key, new
    return new
