"""Validation of ``generate``'s arguments: every bad value raises before any work is done."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .csd_accept import AcceptanceSpec, parse_acceptance
from .drafts import check_same_vocab, vocab_size

__all__ = ["GenerateArgs", "MAX_DRAFT_TOKENS", "check_draft", "eos_set", "parse_args"]

MAX_DRAFT_TOKENS = 64
# model kwargs HF's generate hands a custom_generate callable; not used by the speculative loop
_HF_MODEL_KWARGS = {"use_cache", "logits_to_keep", "position_ids", "cache", "past_key_values", "synced_gpus"}


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """The checked arguments of one ``generate`` call."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    draft: Any
    num_draft_tokens: int
    max_new_tokens: int
    temperature: float
    top_p: float
    eos: frozenset
    pad_token_id: int
    draft_bits: int
    cache_len: int
    backend: Any
    options: Any
    acceptance: AcceptanceSpec


def _as_ids(input_ids, attention_mask) -> torch.Tensor:
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
    elif isinstance(input_ids, Sequence) and input_ids and all(isinstance(r, Sequence) for r in input_ids):
        lengths = {len(r) for r in input_ids}
        if len(lengths) > 1 and attention_mask is None:
            raise ValueError(
                f"input_ids rows have unequal lengths {sorted(lengths)} and no attention_mask was given; "
                "left-pad the rows and pass attention_mask (1 = token, 0 = padding)"
            )
        if len(lengths) > 1:
            raise ValueError("input_ids rows have unequal lengths; left-pad them into a [B, S] tensor")
        bad = next((t for r in input_ids for t in r if isinstance(t, bool) or not isinstance(t, int)), None)
        if bad is not None:
            raise TypeError(f"input_ids must hold token ids (ints), got {bad!r} ({type(bad).__name__})")
        big = next((t for r in input_ids for t in r if not -2**63 <= t < 2**63), None)
        if big is not None:
            raise ValueError(f"input_ids hold token id {big}, outside the int64 range")
        ids = torch.tensor([list(r) for r in input_ids], dtype=torch.int64)
    else:
        raise TypeError(f"input_ids must be a [B, S] int64 tensor or a list of id lists, got {type(input_ids).__name__}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a [B, S] integer tensor with S >= 1, got shape {tuple(ids.shape)} {ids.dtype}")
    return ids.to(torch.int64)


def _check_mask(mask, ids: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(ids)
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must be a tensor of the shape of input_ids {tuple(ids.shape)}, got {shape}")
    m = mask.cpu()
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    m = m.to(torch.int64)
    if bool((m[:, 1:] < m[:, :-1]).any()) or bool((m[:, -1] == 0).any()):
        raise ValueError("attention_mask must be left padding (zeros, then ones, the last column all ones); "
                         "tokenize with padding_side='left'")
    return m


def eos_set(eos_token_id, target: nn.Module, generation_config, vocab: int) -> frozenset:
    """The stop ids: ``eos_token_id`` (an int, a list of ints or a tensor), else ``generation_config``'s,
    else the model's; ``TypeError`` for other types, ``ValueError`` when given ids lie outside ``vocab``."""
    given = eos_token_id is not None
    if eos_token_id is None and generation_config is not None:
        eos_token_id = generation_config.eos_token_id
    if eos_token_id is None:
        gc = getattr(target, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None) or getattr(target.config, "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.reshape(-1).tolist()
    items = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        raise TypeError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    outside = [t for t in items if not 0 <= t < vocab]
    if given and outside:
        raise ValueError(f"eos_token_id={eos_token_id!r} holds {outside[0]}, outside the model's vocabulary "
                         f"[0, {vocab - 1}]")
    return frozenset(items)


def _check_backend(backend, options) -> None:
    """A bad ``compile_backend`` or ``compile_options`` raises here, not at the first compiled step."""
    if backend is None or callable(backend):
        if options is not None and backend is None:
            raise ValueError("compile_options needs a compile_backend; compile_backend=None runs the step eagerly")
        return
    if not isinstance(backend, str):
        raise TypeError(f"compile_backend must be a backend name, a callable or None, got {type(backend).__name__}")
    from torch._dynamo.exc import InvalidBackend

    try:
        torch._dynamo.lookup_backend(backend)
    except InvalidBackend:
        raise ValueError(f"compile_backend={backend!r} is not a torch.compile backend; choose one of "
                         f"{torch._dynamo.list_backends()} or None (eager)") from None
    if backend == "csd":
        from ..config import CSDConfig

        cfg = CSDConfig.from_options(options)  # OptionError (a ValueError) naming the bad option
        if cfg.bits == "dynamic":  # a corrupt table: TableError (a ValueError) naming the file
            from ..quant.compiled_policy import load_table

            load_table(cfg.calibration, cfg.avg_bits, cfg.group_size)


def check_draft(target: nn.Module, draft: nn.Module, cache_len: int) -> None:
    """Raise ``ValueError`` unless ``draft`` can run beside ``target``: sharded (tensor parallel) over
    the same ranks or not at all, the same vocabulary and special ids, the same parameter dtype and
    device, and a context that covers the cache."""
    from ..parallel import check_same_sharding

    draft = getattr(draft, "_orig_mod", draft)
    check_same_sharding(target, draft)
    check_same_vocab(target, draft)
    def first_float(model):  # quantized layers may hold integer codes; activations run in the float dtype
        return next((p for p in model.parameters() if p.is_floating_point()), None)

    pt, pd = first_float(target), first_float(draft)
    if pd is None or pt is None:
        raise ValueError("the draft model has no floating-point parameters" if pd is None
                         else "the target model has no floating-point parameters")
    if pd.dtype != pt.dtype:
        raise ValueError(f"the draft model's dtype {pd.dtype} differs from the target's {pt.dtype}; convert a copy "
                         f"of the draft first, e.g. draft = copy.deepcopy(draft).to({pt.dtype})")
    if pd.device != pt.device:
        raise ValueError(f"the draft model is on {pd.device}, the target on {pt.device}; move the draft there first")
    context = getattr(draft.config, "max_position_embeddings", None)
    if isinstance(context, int) and context < cache_len:
        raise ValueError(f"the draft model's context ({context} positions) is shorter than the cache this call needs "
                         f"({cache_len} slots); shorten the prompt or max_new_tokens, or pass a smaller max_cache_len")


def _device_memory(device: torch.device) -> int | None:
    try:
        if device.type == "cpu":
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
    except (ValueError, OSError, RuntimeError):
        pass
    return None


def _cache_bytes(model: nn.Module, batch: int, length: int, itemsize: int) -> int:
    c = model.config
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * batch * n_kv * length * head_dim * itemsize


def _check_cache_fits(target: nn.Module, draft, batch: int, cache_len: int) -> None:
    """Refuse a static cache larger than the device's whole memory before allocating it."""
    p = next(target.parameters())
    total = _device_memory(p.device)
    if total is None:
        return
    need = _cache_bytes(target, batch, cache_len, p.element_size()) + batch * cache_len * 8  # + the token buffer
    if isinstance(draft, nn.Module):
        need += _cache_bytes(draft, batch, cache_len, p.element_size())
    if need > total:
        raise ValueError(f"the static cache for {batch} row(s) x {cache_len} slots needs {need / 2**30:.1f} GiB, "
                         f"more than the {total / 2**30:.1f} GiB of {p.device}; lower max_cache_len or the batch")


def parse_args(target: nn.Module, input_ids, *, draft, num_draft_tokens, temperature, top_p, eos_token_id,
               streamer, draft_bits, max_cache_len, backend, options, acceptance, generation_config,
               kwargs: dict, memory=None, tau=0.3, lam=6.0, tokenizer=None) -> GenerateArgs:
    """Check everything ``generate`` was given; raise ``ValueError``/``TypeError`` naming the bad value."""
    kwargs = dict(kwargs)
    attention_mask = kwargs.pop("attention_mask", None)
    max_new_tokens = kwargs.pop("max_new_tokens", None)
    unknown = set(kwargs) - (_HF_MODEL_KWARGS if generation_config is not None else set())
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}")
    if not (isinstance(draft, nn.Module) or (isinstance(draft, str) and draft in ("self", "ngram"))):
        raise TypeError(f"draft must be 'self', 'ngram' or a model sharing the target's vocabulary, got {draft!r}")
    if num_draft_tokens is None:
        num_draft_tokens = 3 if draft == "ngram" else 4  # 3: best measured for n-grams (README)
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or not (
        1 <= num_draft_tokens <= MAX_DRAFT_TOKENS
    ):
        raise ValueError(f"num_draft_tokens={num_draft_tokens!r} must be an int in [1, {MAX_DRAFT_TOKENS}]")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0.0 <= temperature < math.inf:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
    if isinstance(draft_bits, bool) or draft_bits not in (2, 3, 4, 8):
        raise ValueError(f"draft_bits={draft_bits!r} is not supported; use one of [2, 3, 4, 8]")
    _check_backend(backend, options)
    if streamer is not None and not (hasattr(streamer, "put") and hasattr(streamer, "end")):
        raise TypeError(f"streamer must have put() and end(), got {type(streamer).__name__}")
    spec = parse_acceptance(target, acceptance, memory=memory, tau=tau, lam=lam, tokenizer=tokenizer,
                            temperature=temperature)

    ids = _as_ids(input_ids, attention_mask)
    if ids.shape[0] == 0:
        raise ValueError(f"input_ids has no rows (shape {tuple(ids.shape)}); give at least one prompt")
    vocab = vocab_size(target)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids hold token id {lo if lo < 0 else hi}, outside the model's vocabulary "
                         f"[0, {vocab - 1}]")
    mask = _check_mask(attention_mask, ids)
    if streamer is not None and ids.shape[0] != 1:
        raise ValueError(f"a streamer needs batch size 1, got {ids.shape[0]} rows")
    B, S = ids.shape
    if max_new_tokens is None and generation_config is not None:
        max_new_tokens = generation_config.max_new_tokens
        if max_new_tokens is None and generation_config.max_length is not None:
            max_new_tokens = generation_config.max_length - S
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")

    limit = max_cache_len if max_cache_len is not None else getattr(target.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit < 2:
        raise ValueError(f"max_cache_len={limit!r} must be an int >= 2")
    if S + 1 > limit:
        raise ValueError(f"the prompt ({S} tokens) is longer than the static cache ({limit} slots, one reserved)")
    need = S + 1 + max_new_tokens + num_draft_tokens + 1  # + one reserved slot, + one step's overshoot
    if need > limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} does not fit the static cache: the prompt ({S}) + "
            f"max_new_tokens + num_draft_tokens ({num_draft_tokens}) + 2 = {need} > max_cache_len={limit}"
        )
    # an explicit max_cache_len is the cache length (one compiled step for every prompt that fits, as
    # with HF's static cache); otherwise buckets of 256, so other lengths mostly reuse the graph
    cache_len = limit if max_cache_len is not None else min(limit, -(-need // 256) * 256)
    if isinstance(draft, nn.Module):
        check_draft(target, draft, cache_len)
    _check_cache_fits(target, draft, B, cache_len)

    eos = eos_set(eos_token_id, target, generation_config, vocab)
    pad_id = getattr(target.config, "pad_token_id", None)
    if pad_id is None:
        pad_id = min(eos) if eos else 0
    if draft != "self":
        draft_bits = 0
    return GenerateArgs(ids, mask, draft, num_draft_tokens, max_new_tokens, float(temperature), float(top_p), eos,
                        int(pad_id), draft_bits, cache_len, backend, options, spec)
