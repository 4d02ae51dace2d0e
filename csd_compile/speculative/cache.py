"""A static KV cache whose rows write at their own positions, and the attention mask that goes with it.

Rows of a batch advance independently during speculative decoding (each accepts its own number of
drafts), so one shared write offset (HF ``StaticCache``) does not fit. :class:`RowCache` keeps
``[B, H, L, D]`` buffers per layer and writes the new keys/values of row ``b`` at slots
``start[b] .. start[b] + T - 1``. Rollback is free: a row's next write starts at its new length and
overwrites the stale slots; :func:`row_mask` hides every slot at or past the query's own slot.
"""

from __future__ import annotations

import torch

__all__ = ["RowCache", "attention_masks", "encode_mask", "row_mask", "sliding_window"]


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
        rows = torch.arange(B, device=key_states.device).view(B, 1)
        slots = self.start.view(B, 1) + torch.arange(T, device=key_states.device).view(1, T)  # [B, T]
        k, v = self.keys[layer_idx], self.values[layer_idx]
        # index_put_ on the [B, L, H, D] view writes just the B*T new slots in place; a scatter_
        # here is functionalized into a copy of the whole cache per layer and step.
        k.transpose(1, 2).index_put_((rows, slots), key_states.transpose(1, 2).to(k.dtype))
        v.transpose(1, 2).index_put_((rows, slots), value_states.transpose(1, 2).to(v.dtype))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.max_len


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
