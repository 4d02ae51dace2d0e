"""``csd::decode_attention(query, key, value, attn_mask, scale)``: attention for the few queries of a
decode or verify step over a KV cache, reading only the cache slots the mask leaves open.

``softmax(query @ key^T * scale + mask) @ value`` with scores, softmax and sums in float32 and the
result in the query's dtype. Shapes: query [B, Hq, T, D]; key, value [B, Hkv, S, D] with Hq a
multiple of Hkv (query head ``h`` reads key/value head ``h // (Hq // Hkv)``: grouped-query attention
without repeating the cache); ``attn_mask`` None, bool (true: attend) or floating point (added to
the scores), broadcastable to [B, Hq, T, S]. A query row with no open slot gives NaN (softmax over
nothing), as ``scaled_dot_product_attention``'s math path does.

A static KV cache is allocated for the longest sequence a call may reach and the step masks the slots
not written yet; as tensor ops (what Inductor compiles) the step reads every slot, so its cost grows
with the cache's capacity. The kernels skip a slot the mask closes (false or -inf) for all of a head's
query rows: the same values, since its probability is exactly zero.

- CPU: ``csd::decode_attention_cpu_native`` (``csrc/attention_cpu.cpp``, built with the quantized
  kernel by ``native.load()``; AVX-512, AVX2+FMA and plain C++ loops chosen at run time, the same
  setting as the quantized kernel's ``native.use_isa``). Without a C++ compiler the op runs
  :func:`attention_ref`'s tensor ops.
- CUDA: a Triton kernel, one program per (batch row, query head, query): an online softmax over
  blocks of slots whose loads are masked by the attention mask, so closed slots are not read. (The
  ``decode_attention`` pass uses the op on CPU only; on CUDA SDPA's flash kernels serve decoding.)
- :func:`attention_ref`: the pure-torch reference both are tested against.
"""

from __future__ import annotations

import math

import torch
from torch.library import wrap_triton

from . import native
from ._triton import jit, op, require_triton, tl, triton

__all__ = ["attention_ref", "attention_triton", "check_attention_args", "decode_attention"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def check_attention_args(query, key, value, attn_mask, scale) -> None:
    """Raise ``TypeError``/``ValueError`` naming the bad argument (no data is read)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"decode_attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"decode_attention: {name} must be 4-d [B, H, T|S, D], got shape {tuple(t.shape)}")
    if query.dtype not in _FLOATS:
        raise TypeError(f"decode_attention: query must be float32, bfloat16 or float16, got {query.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"decode_attention: key and value must have query's dtype {query.dtype}, "
                        f"got {key.dtype} and {value.dtype}")
    b, hq, _, d = query.shape
    if key.shape != value.shape or key.shape[0] != b or key.shape[3] != d:
        raise ValueError(f"decode_attention: key and value must both be [B, Hkv, S, D] = [{b}, Hkv, S, {d}], "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    hkv, s = key.shape[1], key.shape[2]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"decode_attention: query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if s < 1:
        raise ValueError("decode_attention: the cache must have at least one slot, got S = 0")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"decode_attention: attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"decode_attention: attn_mask must be bool or floating point, got {attn_mask.dtype}")
        full = (b, hq, query.shape[2], s)
        ok = attn_mask.dim() <= 4 and all(m in (1, f) for m, f in zip(reversed(attn_mask.shape), reversed(full)))
        if not ok:
            raise ValueError(f"decode_attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"[B, Hq, T, S] = {list(full)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"decode_attention: scale must be a finite number, got {scale!r}")
    tensors = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"decode_attention: all tensors must share a device, got {sorted(map(str, devices))}")


def attention_ref(query, key, value, attn_mask=None, scale=None) -> torch.Tensor:
    """The specification in plain torch: float32 scores, softmax and products, cast to query's dtype.
    ``scale`` None means ``1 / sqrt(D)``; key/value heads repeat for grouped-query attention."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    hq, hkv = query.shape[-3], key.shape[-3]
    if hq != hkv:
        key = key.repeat_interleave(hq // hkv, dim=-3)
        value = value.repeat_interleave(hq // hkv, dim=-3)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask.float()
    return torch.matmul(torch.softmax(scores, dim=-1), value.float()).to(query.dtype)


@jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
    Hq, T, S, D, GROUP, scale,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, smb, smh, smt, sms,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.program_id(1)
    b = pid // Hq
    h = pid % Hq
    hk = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + t * sqt + offs_d, mask=in_d, other=0.0).to(tl.float32)
    m_i = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_s = offs_s < S
        if HAS_MASK:
            mv = tl.load(mask_ptr + b * smb + h * smh + t * smt + offs_s * sms, mask=in_s, other=0)
            if MASK_BOOL:
                bias = tl.where(mv != 0, 0.0, float("-inf"))
            else:
                bias = mv.to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_S], tl.float32)
        bias = tl.where(in_s, bias, float("-inf"))
        open_s = bias != float("-inf")
        both = open_s[:, None] & in_d[None, :]  # closed slots are not read
        k = tl.load(k_ptr + b * skb + hk * skh + offs_s[:, None] * sks + offs_d[None, :], mask=both, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale + bias
        scores = tl.where(open_s, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing open yet: keep exp finite
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe)
        v = tl.load(v_ptr + b * svb + hk * svh + offs_s[:, None] * svs + offs_d[None, :], mask=both, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    out = acc / l_i  # 0 / 0 = NaN for a row with no open slot
    tl.store(out_ptr + (pid * T + t) * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=in_d)


def _launch(wrap, query, key, value, attn_mask, scale, block_s):
    require_triton("csd.decode_attention")
    b, hq, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    q, k, v = (x if x.stride(3) == 1 else x.contiguous() for x in (query, key, value))
    out = torch.empty((b, hq, t, d), dtype=query.dtype, device=query.device)
    if attn_mask is None:
        mask, mstrides = q, (0, 0, 0, 0)  # never read
    else:
        mask = attn_mask.expand(b, hq, t, s)
        mstrides = mask.stride()
    wrap(_attention_kernel)[(b * hq, t)](
        q, k, v, mask, out,
        hq, t, s, d, hq // hkv, float(scale),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mstrides,
        HAS_MASK=attn_mask is not None, MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
        BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(d),
    )
    return out


def attention_triton(query, key, value, attn_mask=None, scale=None, *, block_s: int = 64) -> torch.Tensor:
    """Launch the Triton kernel directly: CUDA tensors, or CPU tensors in a process that set
    ``TRITON_INTERPRET=1`` before importing triton (slow; for tests). Same values as :func:`attention_ref`."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None and isinstance(query, torch.Tensor) else scale
    check_attention_args(query, key, value, attn_mask, scale)
    if not isinstance(block_s, int) or block_s < 1 or block_s & (block_s - 1):
        raise ValueError(f"block_s={block_s!r} must be a power of two")
    return _launch(lambda kernel: kernel, query, key, value, attn_mask, scale, block_s)


def _fake(query, key, value, attn_mask, scale):
    check_attention_args(query, key, value, attn_mask, scale)
    return query.new_empty(query.shape)


@op("csd::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """``softmax(query @ key^T * scale + attn_mask) @ value`` over the open slots (module docstring).
    Returns [B, Hq, T, D] in query's dtype."""
    check_attention_args(query, key, value, attn_mask, scale)
    if query.device.type == "cpu":
        if native.load():
            return torch.ops.csd.decode_attention_cpu_native(query, key, value, attn_mask, scale)
        return attention_ref(query, key, value, attn_mask, scale)
    return _launch(wrap_triton, query, key, value, attn_mask, scale, 64)


decode_attention.register_fake(_fake)


def register_native_fake() -> None:
    """Shape rule of the C++ op (called by ``native.load`` once the op exists)."""
    torch.library.register_fake("csd::decode_attention_cpu_native")(_fake)
