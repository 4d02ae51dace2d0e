"""Nested ("any-precision") group-wise weight format: one stored copy serves bits 2, 3, 4 and 8.

Quantization (per output row, per group of ``group_size`` input features) is asymmetric and built
so that the 4-bit rung *is* direct 4-bit round-to-nearest: with the group's RTN-4 grid (step
``S = (max - min) / 15`` and origin ``lo = -round(-min / S) * S``, an integer zero point as in
torchao / gpt-fast), the 8-bit step is ``s = S / 16`` and the 8-bit origin ``z = lo - 7.5 * s``.
The 8-bit code is ``q8 = round((w - z) / s)`` (codes 8..248 for in-range weights), decoded as
``z + q8 * s``. The b-bit code is the top b bits of ``q8`` (``c = q8 >> (8 - b)``); with
``m = 2**(8-b)`` it selects the bin of m consecutive 8-bit codes and decodes to that bin's centre
``z + (c*m + (m-1)/2) * s``, i.e. per-rung scale ``m * s`` and zero ``z + (m-1)/2 * s``, both
derived from the two stored numbers. Because ``floor(round(16u + 7.5) / 16) = round(u)``, the
4-bit codes equal the RTN-4 codes and the 4-bit rung decodes to ``lo + c * S``: the RTN-4 weight
(up to float rounding at exact ties). The 8-bit rung has 241 of 256 codes in use (step 1/240 of
the range instead of 1/255); the 3- and 2-bit rungs are uniform quantizers with bins 2 and 4 RTN-4
steps wide. Every rung's error is at most half its bin. No rung needs extra storage: memory is
that of plain 8-bit group quantization (1 byte per weight plus two float32 numbers per group).

A group whose weights already lie on a 16-level min-max grid (every weight within 0.2 of a step of
``min + q * S``) keeps that grid instead: origin ``lo = min``, a float zero point. So a checkpoint
stored as GGUF Q4_1 (blocks of 32, ``w = d * q + m``), read at ``group_size=32``, decodes at 4 bits
to its own weights, up to float rounding. Other groups (weights not already 4-bit; Q4_1 blocks
joined by a larger group, which seldom share one grid) keep the integer zero point: on the embedded
model at group size 64 a float zero point everywhere had the smaller squared error but perplexity
30.1 against 26.7 on Britannica. Every kernel takes the zero as a float.

Codes, steps and zeros need not come from :func:`quantize`: :func:`pack_codes` stores any grid of
the form ``z + q8 * s``. ``bits="auto"`` (:mod:`csd_compile.quant.gguf`) stores a GGUF file's own
grids that way: Q8_0 (``d * q``, q in -127..127, all 255 codes) exactly at 8 bits, the Q4 types at 4.

Storage (``NestedWeight``):
    qdata  uint8 [2, N, K/2]: plane 0 holds the high nibbles (the 4-bit codes), plane 1 the low
           nibbles, each packed two per byte (:func:`pack_nibbles`): rows in blocks of 64; inside a
           block, for every input feature k, 32 bytes where byte j holds row j (low nibble) and row
           j + 32 (high nibble); rows past the last full block: for every k, (N % 64) / 2 bytes,
           byte i holding rows 2i (low) and 2i + 1 (high). This layout is ours and the same on
           every CPU (it is not PyTorch's packed int4 layout, which depends on the instruction set).
    scale  float32 [N, K/group_size]: ``s`` above (the 8-bit step).
    zero   float32 [N, K/group_size]: ``z`` above (the value of 8-bit code 0).
    Both column-major (strides ``(1, N)``, as ``t.T.contiguous().T``): a group's values of 64
    consecutive rows, which the CPU kernel applies at once, are one vector load instead of a gather
    (gathers cost up to 1.5x the whole product on AMD Zen 4). Any strides are accepted everywhere;
    row-major scales only run slower on CPU.

The CPU kernel reads scales and zeros fastest packed (:func:`pack_scale_zero`): one tensor
[ceil(N/64), K/group_size, 2, 64] holding, per 64-row block and group, the block's 64 scales then its
64 zeros (rows past N zero), passed as both ``scale`` and ``zero``; in float16 (the 4-bit rung's step
and zero, half the bytes) wherever float16 holds them, as it does a GGUF Q4_0 / Q4_1 file's, the step
alone for a symmetric grid (a GGUF Q8_0 file's ``d``), else in float32. A unit of the kernel's work (one
block, a range of groups) then reads them as one sequential stream beside its codes, where
column-major puts each group's values N floats from the last. ``QLinear`` keeps such a copy of its
CPU weights (``scale_zero``, not saved) beside the canonical pair above.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

__all__ = [
    "NestedWeight",
    "check_bits",
    "column_major",
    "dequantize",
    "fake_quantize",
    "group_minima",
    "nested_codes",
    "pack_codes",
    "pack_nibbles",
    "pack_scale_zero",
    "quantize",
    "rtn_fake_quantize",
    "unpack_nibbles",
    "unpack_scale_zero",
]

_BLOCK_N = 64  # row block of the plane layout: byte (k, j) holds rows j (low) and j + 32 (high)


class NestedWeight(NamedTuple):
    """One stored copy of a quantized linear weight; see the module docstring for the layout."""

    qdata: torch.Tensor  # uint8 [2, N, K/2]
    scale: torch.Tensor  # float32 [N, K/g]
    zero: torch.Tensor  # float32 [N, K/g]

    @property
    def group_size(self) -> int:
        return 2 * self.qdata.shape[-1] // self.scale.shape[-1]


def check_bits(bits: int, *, allow_full: bool = False) -> int:
    """Return ``bits`` if it is a supported rung (plus 16 = unquantized when ``allow_full``)."""
    valid = list(SUPPORTED_BITS) + ([16] if allow_full else [])
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in valid:
        raise ValueError(f"bits={bits!r} is not supported; choose one of {valid}")
    return bits


def _check_weight(weight: torch.Tensor, group_size: int) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got {_desc(weight)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got dtype {weight.dtype}")
    if isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not supported; choose one of {list(SUPPORTED_GROUP_SIZES)}")
    if weight.shape[1] % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={weight.shape[1]}; "
            f"use a group size in {list(SUPPORTED_GROUP_SIZES)} that divides it"
        )


def _desc(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _codes8(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo = w.amin(-1)
    step4 = (w.amax(-1) - lo) / 15.0  # the RTN-4 step [N, K/g]
    live = step4 > 0
    safe4 = torch.where(live, step4, torch.ones_like(step4))
    u = (w - lo[..., None]) / safe4[..., None]
    on_grid = ((u - u.round()).abs() <= 0.2).all(-1)  # already 4-bit (e.g. GGUF Q4_1): keep that grid
    integer = -torch.round(-lo / safe4) * step4  # RTN-4 grid with integer zero point
    origin = torch.where(live & ~on_grid, integer, lo)
    scale = step4 / 16.0
    zero = origin - 7.5 * scale
    q = torch.round((w - zero[..., None]) / (safe4[..., None] / 16.0)).clamp_(0, 255)
    return q.to(torch.uint8).reshape(n, k), scale, zero


def group_minima(weight: torch.Tensor, group_size: int, rows: int = 8) -> torch.Tensor:
    """The group minima of the first ``rows`` output rows of ``weight`` [N, K], bf16-rounded, on
    the CPU: a cheap value sample that is the same for a checkpoint in bf16 and in fp32."""
    w = weight[:rows].detach().float()
    return w.reshape(w.shape[0], -1, group_size).amin(-1).to(torch.bfloat16).float().cpu()


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int = 64) -> torch.Tensor:
    """Quantize and dequantize ``weight`` [N, K] at ``bits`` with the nested scheme (same dtype).

    ``bits=16`` means the unquantized rung and returns ``weight`` itself. Works for any N.
    """
    check_bits(bits, allow_full=True)
    _check_weight(weight, group_size)
    if bits == 16:
        return weight
    q8, scale, lo = _codes8(weight, group_size)
    return _decode(q8 >> (8 - bits), scale, lo, bits).to(weight.dtype)


def _decode(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int) -> torch.Tensor:
    n, k = codes.shape
    g = k // scale.shape[-1]
    m = float(2 ** (8 - bits))
    # bin centre: lo + (c*m + (m-1)/2) * s = lo + ((c + 0.5) * m - 0.5) * s
    w = lo[..., None] + ((codes.reshape(n, k // g, g).float() + 0.5) * m - 0.5) * scale[..., None]
    return w.reshape(n, k)


def rtn_fake_quantize(weight: torch.Tensor, bits: int, group_size: int = 64) -> torch.Tensor:
    """Direct b-bit round-to-nearest asymmetric group quantization (integer zero point), the usual
    baseline (torchao / gpt-fast style), for measuring what nesting costs."""
    check_bits(bits)
    _check_weight(weight, group_size)
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-12)
    zp = torch.round(-lo / scale)
    q = torch.clamp(torch.round(w / scale) + zp, 0, qmax)
    return ((q - zp) * scale).reshape(n, k).to(weight.dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes uint8 [N, K] (N even, K even) into the plane layout [N, K/2] (module doc)."""
    n, k = codes.shape
    if n % 2 or k % 2:
        raise ValueError(f"pack_nibbles needs even N and K, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    full = n // _BLOCK_N * _BLOCK_N
    parts = []
    if full:
        b = c[:full].reshape(full // _BLOCK_N, 2, _BLOCK_N // 2, k).permute(0, 3, 1, 2)  # [nb, K, 2, 32]
        parts.append((b[:, :, 0] | (b[:, :, 1] << 4)).reshape(-1))
    if n > full:
        t = c[full:].T  # [K, nt]
        parts.append((t[:, 0::2] | (t[:, 1::2] << 4)).reshape(-1))
    return torch.cat(parts).reshape(n, k // 2)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 [N, K/2] -> 4-bit codes uint8 [N, K]."""
    n, k = packed.shape[0], packed.shape[1] * 2
    flat = packed.reshape(-1)
    full = n // _BLOCK_N * _BLOCK_N
    rows = []
    if full:
        b = flat[: full * k // 2].reshape(full // _BLOCK_N, k, _BLOCK_N // 2)  # [nb, K, 32]
        both = torch.stack([b & 15, b >> 4], 2)  # [nb, K, 2, 32]
        rows.append(both.permute(0, 2, 3, 1).reshape(full, k))
    if n > full:
        t = flat[full * k // 2 :].reshape(k, (n - full) // 2)  # [K, nt/2]
        both = torch.stack([t & 15, t >> 4], 2)  # [K, nt/2, 2]
        rows.append(both.reshape(k, n - full).T)
    return torch.cat(rows)


def quantize(weight: torch.Tensor, group_size: int = 64) -> NestedWeight:
    """Quantize a linear weight [N, K] (N even) into the nested format."""
    _check_weight(weight, group_size)
    if weight.shape[0] % 2:
        raise ValueError(f"quantize needs an even out_features, got weight shape {tuple(weight.shape)}")
    return pack_codes(*_codes8(weight, group_size))


def pack_codes(q8: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> NestedWeight:
    """A nested weight from its 8-bit codes uint8 [N, K] (N, K even), step and zero float32 [N, K/g]
    (decoded as ``zero + q8 * scale``), e.g. a grid read from a GGUF file (``quant.gguf``)."""
    if q8.dtype != torch.uint8 or q8.dim() != 2:
        raise ValueError(f"q8 must be uint8 [N, K], got {q8.dtype} {_desc(q8)}")
    if scale.shape != zero.shape or scale.dim() != 2 or scale.shape[0] != q8.shape[0] or q8.shape[1] % scale.shape[1]:
        raise ValueError(f"scale {_desc(scale)} and zero {_desc(zero)} must be [N, K/g] for q8 {_desc(q8)}")
    qdata = torch.stack([pack_nibbles(q8 >> 4), pack_nibbles(q8 & 15)])
    return NestedWeight(qdata, column_major(scale.float()), column_major(zero.float()))


def column_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` [N, G] stored column-major (strides ``(1, N)``), the layout of a nested weight's scales."""
    return t.T.contiguous().T


def pack_scale_zero(scale: torch.Tensor, zero: torch.Tensor, *, fp16: bool | str = "auto") -> torch.Tensor:
    """``scale`` and ``zero`` float32 [N, G] (any strides) in the CPU kernel's packed layout:
    [ceil(N/64), G, 2, 64], per 64-row block ``b`` and group ``g`` the block's 64 values of the pair's
    first member (``[b, g, 0, j]`` for row ``64 b + j``), then its 64 values of the second; rows past
    N hold 0 (see the module docstring). A new tensor on ``scale``'s device; the inputs are not
    modified.

    ``fp16``: whether the pair is stored as float16 (half the bytes: a decode step streams these
    beside the codes) or float32. In float32 the pair is ``(scale, zero)``; in float16 it is the
    4-bit rung's step and zero, ``(16 * scale, zero + 7.5 * scale)``, which for a weight read from a
    GGUF Q4_0 / Q4_1 block are the file's own float16 ``d`` and ``m``; a symmetric grid (every
    ``zero == -128 * scale``: a GGUF Q8_0 block, ``d * q``) keeps its step alone, float16
    [ceil(N/64), G, 1, 64] (a quarter of the bytes). ``"auto"`` (the default) chooses float16
    exactly when it holds every group's numbers up to float32 rounding (so the kernel decodes the
    same weight), float32 otherwise (e.g. :func:`quantize`'s grids); ``True`` rounds to float16
    whatever is lost (the step alone only for a grid that is symmetric exactly); ``False`` keeps
    float32.
    """
    if (not isinstance(scale, torch.Tensor) or not isinstance(zero, torch.Tensor) or scale.dim() != 2
            or scale.shape != zero.shape or scale.dtype != torch.float32 or zero.dtype != torch.float32
            or scale.device != zero.device):
        raise ValueError(f"pack_scale_zero: scale ({_desc(scale)}) and zero ({_desc(zero)}) must both be float32 "
                         "[N, G] tensors on one device")
    if fp16 not in (True, False, "auto"):
        raise ValueError(f"pack_scale_zero: fp16={fp16!r} is not one of True, False, 'auto'")
    n, g = scale.shape
    members = [scale, zero]
    if fp16 is not False:
        step4, zero4 = scale * 16.0, zero + 7.5 * scale
        if bool((zero == -128.0 * scale).all()) and (fp16 is True or _exact_fp16(scale)):
            members = [scale.half()]  # symmetric: the step alone
        elif fp16 is True or _holds_in_fp16(step4, zero4, scale, zero):
            members = [step4.half(), zero4.half()]
    blocks, parts = -(-n // _BLOCK_N), len(members)
    packed = members[0].new_zeros(blocks * _BLOCK_N, parts, g)
    for i, t in enumerate(members):
        packed[:n, i] = t
    # [blocks * 64, parts, G] -> [blocks, 64, parts, G] -> [blocks, G, parts, 64]
    return packed.reshape(blocks, _BLOCK_N, parts, g).permute(0, 3, 2, 1).contiguous()


def _exact_fp16(t: torch.Tensor) -> bool:
    return bool((t.half().float() == t).all())


def _holds_in_fp16(step4: torch.Tensor, zero4: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> bool:
    """Whether float16 holds the 4-bit pair: the step exactly (it is 16 times an exact float32 value)
    and the zero up to the float32 rounding that formed it from a float16 value (``zero`` was stored
    as ``m - 7.5 s`` in float32, and ``zero + 7.5 s`` rounds again). A value float16 cannot hold
    misses by far more: its nearest float16 neighbours are 2^13 float32 steps apart."""
    if not _exact_fp16(step4):
        return False
    tol = 2.0 ** -21 * (zero.abs() + 8.0 * scale.abs() + zero4.abs())
    return bool(((zero4.half().float() - zero4).abs() <= tol).all())


def unpack_scale_zero(packed: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_scale_zero` for a weight of ``n`` output rows: ``(scale, zero)`` float32
    [n, G], column-major (new tensors); from the float16 pair, ``scale = step / 16`` and ``zero =
    zero4 - 7.5 scale`` in float32; from a float16 step alone, ``zero = -128 scale``."""
    parts = packed.shape[2] if isinstance(packed, torch.Tensor) and packed.dim() == 4 else 0
    if (not isinstance(packed, torch.Tensor) or packed.dim() != 4 or packed.shape[0] != -(-n // _BLOCK_N)
            or packed.shape[3] != _BLOCK_N or packed.dtype not in (torch.float32, torch.float16)
            or parts not in ((1, 2) if packed.dtype == torch.float16 else (2,))):
        raise ValueError(f"unpack_scale_zero: expected a packed float32 or float16 [ceil({n}/64), G, 2, 64] tensor "
                         f"(float16 [..., 1, 64] for a symmetric grid), got {_desc(packed)}")
    rows = packed.permute(0, 3, 2, 1).reshape(-1, parts, packed.shape[1])[:n].float()  # [n, parts, G]
    if parts == 1:
        first = rows[:, 0]
        second = -128.0 * first
    else:
        first, second = rows[:, 0], rows[:, 1]
    if packed.dtype == torch.float16 and parts == 2:
        first = first / 16.0
        second = second - 7.5 * first
    out = []
    for part in (first, second):
        t = torch.empty_strided(part.shape, (1, n), dtype=torch.float32, device=part.device)  # column-major
        out.append(t.copy_(part))
    return out[0], out[1]


def nested_codes(qdata: torch.Tensor, bits: int) -> torch.Tensor:
    """The b-bit codes uint8 [N, K] held in ``qdata`` [2, N, K/2]."""
    check_bits(bits)
    hi = unpack_nibbles(qdata[0])
    if bits == 8:
        return (hi << 4) | unpack_nibbles(qdata[1])
    return hi >> (4 - bits)


def dequantize(
    qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight [N, K] that the b-bit rung of a nested weight stands for, in ``dtype``."""
    return _decode(nested_codes(qdata, bits), scale, zero, bits).to(dtype)
