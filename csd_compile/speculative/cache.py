"""A static KV cache whose rows write at their own positions, and the attention mask that goes with it.

Rows of a batch advance independently during speculative decoding (each accepts its own number of
drafts), so one shared write offset (HF ``StaticCache``) does not fit. :class:`RowCache` keeps
``[B, H, L, D]`` buffers per layer and writes the new keys/values of row ``b`` at slots
``start[b] .. start[b] + T - 1``. Rollback is free: a row's next write starts at its new length and
overwrites the stale slots; :func:`row_mask` hides every slot at or past the query's own slot.
"""

from __future__ import annotations

import torch

__all__ = ["RowCache", "attention_masks", "encode_mask", "row_mask", "sliding_window", "slot_index"]


class RowCache:
    """Per-layer static key/value buffers with per-row write offsets (duck-types HF's ``Cache.update``).

    Set :attr:`start` (``[B]`` int64, the slot of each row's first new token) before every forward.
    """

    is_compileable = True

    def __init__(self, config, batch_size: int, max_len: int, *, dtype: torch.dtype, device=None):
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch_size, n_kv, max_len, head_dim)
        self.num_layers = config.num_hidden_layers
        self.max_len = max_len
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.start = torch.zeros(batch_size, dtype=torch.int64, device=device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write ``key_states``/``value_states`` ``[B, H, T, D]`` at each row's slots; return the buffers."""
        B, H, T, D = key_states.shape
        index = slot_index(self.start.view(B, 1) + torch.arange(T, device=key_states.device).view(1, T), H)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_put_(index, key_states.to(k.dtype))
        v.index_put_(index, value_states.to(v.dtype))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.max_len


def slot_index(slots: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``index_put_`` indices into a ``[B, H, L, D]`` cache buffer for every head of the slots
    ``slots [B, T]`` of each row: ``cache[index]`` is ``[B, H, T, D]``.

    They index the buffer itself, not a transposed view of it. Inductor writes an ``index_put_`` of
    the B * H * T slots in place, but when one graph writes a buffer more than once through a view
    (a draft's cache takes a copy of the verified slots and then one write per drafted token), it
    clones the whole buffer first and copies it back at the end: for the embedded model's self
    draft, 60 buffers read and written twice per step."""
    B, T = slots.shape
    rows = torch.arange(B, device=slots.device).view(B, 1, 1)
    heads = torch.arange(num_heads, device=slots.device).view(1, num_heads, 1)
    return rows, heads, slots.view(B, 1, T)


def row_mask(start: torch.Tensor, pad: torch.Tensor, num_queries: int, max_len: int, *, boolean: bool, dtype,
             window: int | None = None):
    """Attention mask ``[B, 1, T, L]`` for queries at slots ``start[b] + t``: a query sees the slots
    from its row's first real token (``pad[b]``) up to its own slot, and with ``window`` only the
    last ``window`` of them (sliding-window attention: slot ``j`` is seen from ``q`` iff ``j > q - window``).

    ``boolean=True`` gives True = attend (SDPA); otherwise an additive float mask in ``dtype``.
    """
    B = start.shape[0]
    q = start.view(B, 1, 1) + torch.arange(num_queries, device=start.device).view(1, num_queries, 1)
    j = torch.arange(max_len, device=start.device).view(1, 1, max_len)
    visible = (j <= q) & (j >= pad.view(B, 1, 1))  # [B, T, L]
    if window is not None:
        visible = visible & (j > q - window)
    return encode_mask(visible.unsqueeze(1), boolean=boolean, dtype=dtype)


def sliding_window(config) -> int | None:
    """The sliding window some or all of the model's layers attend with, ``None`` if none does."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def attention_masks(config, visible_of):
    """The ``attention_mask`` argument for a model: ``visible_of(window)`` encoded for every kind of
    layer it has: one mask (every layer full, or every layer sliding as in Mistral), or a dict
    ``{"full_attention": ..., "sliding_attention": ...}`` for models that mix them (Gemma 3, Qwen2
    with ``use_sliding_window``), which transformers' models take as is."""
    window = sliding_window(config)
    if window is None:
        return visible_of(None)
    if getattr(config, "layer_types", None) is None:
        return visible_of(window)
    return {"full_attention": visible_of(None), "sliding_attention": visible_of(window)}


def encode_mask(visible: torch.Tensor, *, boolean: bool, dtype) -> torch.Tensor:
    """``visible`` (True = attend) as the model's attention takes it: itself for SDPA
    (``boolean=True``), else an additive float mask in ``dtype`` (0 or the dtype's minimum)."""
    if boolean:
        return visible
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=visible.device))
