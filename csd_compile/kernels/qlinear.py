"""``csd::qlinear(x, qdata, scale, zero, bits)``: a linear layer on a nested quantized weight.

``y = x @ W_b.T`` where ``W_b`` is the b-bit rung of the nested weight (see
``csd_compile.quant.nested``) and ``b`` is read from the int tensor ``bits`` (0-d, or one entry of a
per-layer plan) *inside* the op: changing it never recompiles and never syncs the host.

- CUDA: a Triton kernel (``triton_op`` + ``wrap_triton``) that loads ``bits`` through a pointer,
  dequantizes a [BLOCK_K, BLOCK_N] tile in registers and accumulates in fp32.
- CPU: ``csd::qlinear_cpu_native``, a C++ kernel (``csrc/qlinear_cpu.cpp``, built on first use by
  ``native.load()``) that reads the rung's codes straight from the nested planes: up to 16 rows
  decode each 64-row weight tile once per four rows, as float lanes, and multiply it by every row
  (decode and verify); more rows dequantize once and call a dense GEMM. Its inner loops exist for
  AVX-512, AVX2+FMA (e.g. AMD Zen 3) and plain C++; one portable build picks the best the CPU has
  at run time (``native.isa()`` names it, ``native.use_isa`` forces one: tests run every path the
  machine can). At one row and 4 bits it streams the weight at a large fraction of memory
  bandwidth, faster than a dense bf16 ``F.linear`` (``python -m benchmarks.qlinear_micro``).
  Without a C++ compiler, ``csd::qlinear_cpu`` (PyTorch ops)
  computes the same values more slowly: bf16 activations with up to 4 rows go through PyTorch's
  int4 CPU kernel on the rung's codes repacked by PyTorch itself (its packed layout depends on the
  instruction set), anything else dequantizes in fp32 and calls ``F.linear`` in fp32.
  ``native.set_activations("int8")`` switches its decode / verify passes to activations quantized
  to int8 per 32 features and integer byte-dot products (off by default; see ``native``).
- ``csd::qlinear_multi(x, [qdata...], [scale...], [zero...], [bits...])``: several weights on one
  input (a layer's q/k/v, gate/up; the ``group_qlinear`` pass writes it), one output each at its
  own bits; on CPU one C++ call (``csd::qlinear_cpu_multi_native``), elsewhere one ``qlinear`` per
  weight.
- ``qlinear_ref``: the pure-torch reference every path is tested against; ``qlinear_ref_int8`` that
  of the int8-activation mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import wrap_triton
from torch.utils.weak import WeakIdKeyDictionary

from ..config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from ..quant.nested import check_bits, dequantize, unpack_nibbles, unpack_scale_zero
from . import native
from ._triton import jit, op, require_triton, tl, triton

__all__ = ["qlinear", "qlinear_multi", "qlinear_ref", "qlinear_ref_int8", "qlinear_triton", "check_qlinear_args",
           "check_qlinear_multi_args"]

# bf16 decode/verify rows served by the int4 CPU kernel; past this, one dequantize + GEMM wins
# (the int4 kernel reuses no weights across rows).
_INT4_MAX_ROWS = 4


@jit
def _qlinear_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr, bits_ptr, out_ptr,
    M, N, K, N_FULL,
    stride_xm, stride_om, stride_sn, stride_sg,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.load(bits_ptr).to(tl.int32)
    half_k = K // 2
    # Byte offset and nibble shift of (n, k) in one plane of the nested layout (see nested.py).
    in_full = rn < N_FULL
    j = rn % 64
    row_full = (rn // 64) * 64 * half_k + j % 32
    nt = N - N_FULL
    row_tail = N_FULL * half_k + (rn - N_FULL) // 2
    row_off = tl.where(in_full, row_full, row_tail)
    k_stride = tl.where(in_full, 32, nt // 2)
    shift = tl.where(in_full, (j // 32) * 4, ((rn - N_FULL) % 2) * 4).to(tl.uint8)
    n_mask = rn < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.zeros is a jit helper: breaks late interpretation
    step_mul = tl.exp2((8 - b).to(tl.float32))
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & k_mask[None, :], other=0.0).to(tl.float32)  # [BM, BK]
        wmask = k_mask[:, None] & n_mask[None, :]
        off = row_off[None, :] + rk[:, None] * k_stride[None, :]  # [BK, BN]
        hi = (tl.load(q_ptr + off, mask=wmask, other=0) >> shift[None, :]) & 15
        lo = (tl.load(q_ptr + N * half_k + off, mask=wmask & ((rn[None, :] * 0 + b) == 8), other=0) >> shift[None, :]) & 15
        code = tl.where(b == 8, (hi.to(tl.int32) << 4) | lo.to(tl.int32), hi.to(tl.int32) >> (4 - tl.minimum(b, 4)))
        g_off = rn[None, :] * stride_sn + (rk[:, None] // GROUP) * stride_sg
        s = tl.load(scale_ptr + g_off, mask=wmask, other=0.0)
        z = tl.load(zero_ptr + g_off, mask=wmask, other=0.0)
        w = z + ((code.to(tl.float32) + 0.5) * step_mul - 0.5) * s  # [BK, BN], bin centre
        # fp32 operands: exact for fp32 inputs; tf32 for 16-bit inputs (which tf32 holds exactly).
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & n_mask[None, :])


def check_qlinear_args(x, qdata, scale, zero, bits) -> tuple[int, int, int]:
    """Validate the op's arguments (no data is read); return ``(N, K, group_size)``."""
    for name, t in (("x", x), ("qdata", qdata), ("scale", scale), ("zero", zero), ("bits", bits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"qlinear: {name} must be a tensor, got {type(t).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"qlinear: x must be floating point (bf16/fp16/fp32), got dtype {x.dtype}")
    if qdata.dtype != torch.uint8 or qdata.dim() != 3 or qdata.shape[0] != 2:
        raise ValueError(f"qlinear: qdata must be uint8 [2, N, K/2], got {qdata.dtype} {tuple(qdata.shape)}")
    n, k = qdata.shape[1], 2 * qdata.shape[2]
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"qlinear: x has {tuple(x.shape)}; its last dim must be in_features={k}")
    if scale.dim() == 4:  # packed (quant.nested.pack_scale_zero), passed as both scale and zero
        blocks = -(-n // 64)
        parts = (1, 2) if scale.dtype == torch.float16 else (2,)
        if (scale.shape[0] != blocks or scale.shape[2] not in parts or scale.shape[3] != 64
                or k % max(scale.shape[1], 1) or scale.shape != zero.shape
                or scale.dtype not in (torch.float32, torch.float16)):
            raise ValueError(f"qlinear: packed scale/zero must be float32 or float16 [ceil(N/64)={blocks}, K/group, 2, "
                             f"64] (the same tensor twice), got {scale.dtype} {tuple(scale.shape)} / "
                             f"{tuple(zero.shape)}")
    elif scale.dim() != 2 or scale.shape[0] != n or scale.shape != zero.shape or k % max(scale.shape[1], 1):
        raise ValueError(
            f"qlinear: scale {tuple(scale.shape)} / zero {tuple(zero.shape)} must both be [N={n}, K/group] "
            "(or both the packed [ceil(N/64), K/group, 2, 64] tensor)"
        )
    group = k // scale.shape[1]
    if group not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"qlinear: group size {group} is not one of {list(SUPPORTED_GROUP_SIZES)}")
    if bits.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"qlinear: bits must be an integer tensor, got dtype {bits.dtype}")
    if bits.dim() > 1 or bits.numel() != 1:
        raise ValueError(
            f"qlinear: bits must be a 0-d tensor (or one entry of a plan), got shape {tuple(bits.shape)}"
        )
    devs = {t.device for t in (x, qdata, scale, zero, bits)}
    if len(devs) != 1:
        raise ValueError(f"qlinear: x, qdata, scale, zero and bits must share a device, got {sorted(map(str, devs))}")
    return n, k, group


def _canonical(qdata, scale, zero) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` as [N, G] tensors, unpacked if they came packed (real tensors only)."""
    if scale.dim() != 4:
        return scale, zero
    if zero.data_ptr() != scale.data_ptr():
        raise ValueError("qlinear: with packed scales (quant.nested.pack_scale_zero) pass the packed tensor as zero "
                         "too")
    return unpack_scale_zero(scale, qdata.shape[1])


def qlinear_ref(x, qdata, scale, zero, bits) -> torch.Tensor:
    """Pure-torch reference: dequantize the b-bit rung in fp32, ``F.linear`` in fp32, cast back."""
    check_qlinear_args(x, qdata, scale, zero, bits)
    scale, zero = _canonical(qdata, scale, zero)
    w = dequantize(qdata, scale, zero, check_bits(int(bits.reshape(()))))
    return F.linear(x.float(), w).to(x.dtype)


def qlinear_ref_int8(x, qdata, scale, zero, bits) -> torch.Tensor:
    """Pure-torch reference of the C++ kernel's int8-activation mode (``native.set_activations("int8")``,
    up to 16 rows): every row quantized per 32 features, ``x ~ d * q`` with ``d = max|x| / 127`` and
    ``q = round(x / d)`` in [-127, 127]; the codes enter centred (``c - 2^(b-1)``), so the
    quantization error ``d * q - x`` is multiplied by ``S * (c - 2^(b-1))`` only, while the
    zero-point term uses the exact per-group sums of ``x``."""
    check_qlinear_args(x, qdata, scale, zero, bits)
    scale, zero = _canonical(qdata, scale, zero)
    b = check_bits(int(bits.reshape(())))
    n, k = qdata.shape[1], 2 * qdata.shape[2]
    groups = scale.shape[1]
    xf = x.reshape(-1, k).float()
    blocks = xf.reshape(-1, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # levels / amax as a true division (``127 / tensor`` would multiply by a rounded reciprocal)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xh = (torch.round(blocks * inv).clamp(-127, 127) * (amax / 127.0)).reshape_as(xf)
    w = dequantize(qdata, scale, zero, b).double()
    # kernel: S * sum(xh * (c - c0)) + (Z + c0 * S) * sum(x) = xh @ W.T + (Z + c0 * S) * (sum(x) - sum(xh))
    step = 2.0 ** (8 - b)
    zc = (zero + (0.5 * (step - 1) + step * 2 ** (b - 1)) * scale).double()
    dsum = (xf - xh).reshape(-1, groups, k // groups).sum(-1).double()
    y = xh.double() @ w.T + dsum @ zc.T
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def qlinear_triton(x, qdata, scale, zero, bits, *, block_m: int = 16, block_n: int = 32, block_k: int = 32):
    """Launch the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    require_triton("csd.qlinear")
    n, k, group = check_qlinear_args(x, qdata, scale, zero, bits)
    if scale.dim() == 4:
        raise ValueError("qlinear: packed scale/zero (quant.nested.pack_scale_zero) are the CPU kernel's layout; the "
                         "Triton kernel takes scale and zero as [N, K/group] tensors")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    if scale.stride() != zero.stride():  # the kernel reads both with one pair of strides
        scale, zero = scale.contiguous(), zero.contiguous()
    wrap_triton(_qlinear_kernel)[grid](
        x2, qdata, scale, zero, bits.reshape(()), out,
        m, n, k, n // 64 * 64,
        x2.stride(0), out.stride(0), scale.stride(0), scale.stride(1),
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    return out.reshape(*x.shape[:-1], n)


def _int4_scale_zeros(scale, zero, step, offset) -> torch.Tensor:
    # PyTorch's int4 kernel decodes (c - 8) * S + Z; we want zero + (c + offset) * S, S = scale * step.
    s = scale * step
    return torch.stack([s, zero + (offset + 8.0) * s], -1).transpose(0, 1).to(torch.bfloat16).contiguous()


# qdata tensor -> ((bits, versions), operands of that rung for PyTorch's int4 CPU kernel: weights
# packed by PyTorch itself, and bf16 scale/zero tensors). PyTorch's packed int4 layout depends on
# the instruction set its kernel was built for (AVX-512, AVX2, ...), so the nested planes are never
# handed to it directly: the rung's codes are unpacked and repacked with
# ``_convert_weight_to_int4pack_for_cpu``, whose layout matches its own kernel on every CPU.
# Building them costs about a dequantization; each layer keeps its current rung's (0.5 byte per
# weight, 1 at 8 bits): switching rungs rebuilds them, staying on one is free.
_INT4_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors track no version (and cannot be changed in place)
        return -1


def _int4_operands(qdata, scale, zero, b) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(packed codes, scale/zeros)]`` whose int4 products sum to ``x @ W_b.T`` (two at 8 bits)."""
    key = (b, _version(qdata), _version(scale), _version(zero), scale.data_ptr(), zero.data_ptr())
    hit = _INT4_CACHE.get(qdata)
    if hit is not None and hit[0] == key:
        return hit[1]
    pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    hi = unpack_nibbles(qdata[0]).to(torch.int32)
    if b == 8:  # q8 = 16 * hi + lo: lo + q8 * s
        lo = unpack_nibbles(qdata[1]).to(torch.int32)
        ops = [(pack(hi, 1), _int4_scale_zeros(scale, zero, 16.0, 0.0)),
               (pack(lo, 1), _int4_scale_zeros(scale, torch.zeros_like(zero), 1.0, 0.0))]
    else:
        # bin centre lo + ((c + 0.5) * m - 0.5) * s. 3/2-bit codes are shifted to the middle of the
        # int4 range (+4 / +6) so the bf16 zero term sits near the group centre instead of
        # cancelling a large product.
        off = {4: 0, 3: 4, 2: 6}[b]
        codes = (hi >> (4 - b)) + off
        ops = [(pack(codes, 1), _int4_scale_zeros(scale, zero - 0.5 * scale, float(2 ** (8 - b)), 0.5 - off))]
    _INT4_CACHE[qdata] = (key, ops)
    return ops


def _qlinear_cpu_impl(x, qdata, scale, zero, bits) -> torch.Tensor:
    n, k, group = check_qlinear_args(x, qdata, scale, zero, bits)
    scale, zero = _canonical(qdata, scale, zero)
    b = int(bits.reshape(()))  # a CPU tensor: reading it is not a device sync
    if b not in SUPPORTED_BITS:
        raise ValueError(f"qlinear: bits={b} is not supported; choose one of {list(SUPPORTED_BITS)}")
    x2 = x.reshape(-1, k)
    if x.dtype == torch.bfloat16 and n % 16 == 0 and x2.shape[0] <= _INT4_MAX_ROWS:
        x2 = x2.contiguous()
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        ops = _int4_operands(qdata, scale, zero, b)
        y = mm(x2, ops[0][0], group, ops[0][1])
        for packed, sz in ops[1:]:
            y = y + mm(x2, packed, group, sz)
    else:  # as the reference: a 16-bit weight would round every dequantized value once more
        y = F.linear(x2.float(), dequantize(qdata, scale, zero, b)).to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


@torch.library.custom_op("csd::qlinear_cpu", mutates_args=(), device_types="cpu")
def _qlinear_cpu(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bits: torch.Tensor) -> torch.Tensor:
    """CPU kernel of ``csd::qlinear`` (opaque to the compiler so that it can branch on ``bits``)."""
    return _qlinear_cpu_impl(x, qdata, scale, zero, bits)


def _fake(x, qdata, scale, zero, bits):
    n, _, _ = check_qlinear_args(x, qdata, scale, zero, bits)
    return x.new_empty((*x.shape[:-1], n))


_qlinear_cpu.register_fake(_fake)


@op("csd::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
            bits: torch.Tensor) -> torch.Tensor:
    """``x @ W_b.T`` for the nested weight ``(qdata, scale, zero)`` at ``b = bits`` (int tensor).

    Shapes: x [..., K], qdata uint8 [2, N, K/2], scale/zero float32 [N, K/group], bits int 0-d.
    Returns [..., N] in x's dtype. No bias (add it outside). Supported bits: 2, 3, 4, 8.
    """
    if x.device.type == "cpu":
        check_qlinear_args(x, qdata, scale, zero, bits)
        if native.load():
            return torch.ops.csd.qlinear_cpu_native(x, qdata, scale, zero, bits)
        return torch.ops.csd.qlinear_cpu(x, qdata, scale, zero, bits)
    return qlinear_triton(x, qdata, scale, zero, bits)


qlinear.register_fake(_fake)


def check_qlinear_multi_args(x, qdata, scale, zero, bits) -> list[int]:
    """Validate ``csd::qlinear_multi``'s arguments (every weight as :func:`check_qlinear_args`, one
    group size for all); return each weight's out_features."""
    lists = {"qdata": qdata, "scale": scale, "zero": zero, "bits": bits}
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"qlinear_multi: {name} must be a list of tensors, got {type(value).__name__}")
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) != 1 or not qdata:
        raise ValueError(f"qlinear_multi: qdata, scale, zero and bits must be lists of one length >= 1, got {lengths}")
    outs, groups = [], set()
    for parts in zip(qdata, scale, zero, bits):
        n, _, group = check_qlinear_args(x, *parts)
        outs.append(n)
        groups.add(group)
    if len(groups) != 1:
        raise ValueError(f"qlinear_multi: every weight must have one group size, got {sorted(groups)}")
    return outs


def _multi_fake(x, qdata, scale, zero, bits):
    return [x.new_empty((*x.shape[:-1], n)) for n in check_qlinear_multi_args(x, qdata, scale, zero, bits)]


@op("csd::qlinear_multi", mutates_args=())
def qlinear_multi(x: torch.Tensor, qdata: list[torch.Tensor], scale: list[torch.Tensor], zero: list[torch.Tensor],
                  bits: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[x @ W_i.T for each weight i]``: several nested weights that read the same input (a layer's
    q/k/v projections, or gate and up), each at its own ``bits[i]``, in one call.

    Same values as one :func:`qlinear` per weight. Every weight has the in_features of ``x`` and one
    group size. On CPU the C++ kernel runs them as one parallel loop (one call, one pass over ``x``,
    the threads balanced over all of them); elsewhere it is one :func:`qlinear` per weight.
    """
    if x.device.type == "cpu":
        check_qlinear_multi_args(x, qdata, scale, zero, bits)
        if native.load():
            return torch.ops.csd.qlinear_cpu_multi_native(x, qdata, scale, zero, bits)
        return [torch.ops.csd.qlinear_cpu(x, *parts) for parts in zip(qdata, scale, zero, bits)]
    return [qlinear_triton(x, *parts) for parts in zip(qdata, scale, zero, bits)]


qlinear_multi.register_fake(_multi_fake)


def register_native_fake() -> None:
    """Shape rules of the C++ ops (called by ``native.load`` once the ops exist)."""
    torch.library.register_fake("csd::qlinear_cpu_native")(_fake)
    torch.library.register_fake("csd::qlinear_cpu_multi_native")(_multi_fake)
