"""GGUF tensor types on the nested format (``bits="auto"``): which types it holds exactly, read
from the file's raw blocks, and what happens to the others.

Every block type below stores 32 consecutive weights of a row on one uniform grid, and the nested
format (:mod:`csd_compile.quant.nested`, group 32) holds that grid as it is (``D`` = the file's step,
``lo`` = its origin, ``q`` = its code):

====================  ========================================  ===========================================
GGUF type             the file's weight                          nested copy (8-bit step ``s``, zero ``z``)
====================  ========================================  ===========================================
Q8_0 (8 bits)         ``d * q``, q in -127..127                  ``s = d``, ``z = -128 d``, ``q8 = q + 128``
Q4_0 (4 bits)         ``d * (q - 8)``, q in 0..15                ``s = d / 16``, ``z = -8 d - 7.5 s``, ``q8 = 16 q + 8``
Q4_1 (4 bits)         ``d * q + m``                              ``s = d / 16``, ``z = m - 7.5 s``, ``q8 = 16 q + 8``
Q4_K (4 bits)         ``(d sc_j) * q - dmin m_j`` per 32 of 256   ``s = d sc_j / 16``, ``z = -dmin m_j - 7.5 s``
====================  ========================================  ===========================================

The 8-bit rung decodes ``z + q8 s`` (Q8_0: ``d q`` exactly) and the 4-bit rung ``z + (16 c + 7.5) s``
with ``c = q8 >> 4 = q`` (Q4 types: ``lo + q D`` up to fp32 rounding of ``z``). A Q4 tensor run at
8 bits reads half an 8-bit step (``D / 32``) off the file's value: its rung is 4.

Other types: the float types (F32, F16, BF16, F64) stay dense (the file keeps them at full
precision on purpose, and they are small); every other quantized type (Q5_0, Q5_1, Q5_K, Q6_K,
Q2_K, Q3_K, the IQ and TQ types...) is quantized at 8 bits, group 32, from the dequantized weight
(the nearest rung that does not lose precision; group 32 with one 8-bit step per group cannot hold
their sub-blocks of 16 or their 5- and 6-bit codes exactly). :func:`choose` says which applies.

Which weight came from which GGUF tensor is recorded by the loader
(:func:`csd_compile.models.loader.load_model` on a GGUF) with :func:`register_source`, and for a
tensor-parallel shard by :func:`csd_compile.parallel.shard_model` with :func:`register_slice`. A copy
of such a weight (``copy.deepcopy`` of the model, ``load_state_dict`` into another one) is
recognised by its values (:func:`source_of`). The grid is read from the file when a weight is
quantized, and checked against the weight itself first (a weight changed since loading is quantized
like an approximated type, never silently replaced).
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from .nested import NestedWeight, nested_codes, pack_codes, quantize

__all__ = [
    "AutoBitsWarning", "AutoChoice", "DENSE_TYPES", "auto_bits", "EXACT_BITS", "FILE_GRID_SCALE_BYTES", "GGUFSource",
    "choose", "exact_bits", "file_grid", "grid_from_blocks", "packed_scale_bytes", "register_slice", "register_source",
    "report", "require_gguf", "source_of", "stored_exactly", "uses_file_grid", "warn_if_approximated",
]

GROUP = 32  # every GGUF block type holds 32 (or 256 = 8 x 32) weights of a row
EXACT_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4}
DENSE_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
APPROX_BITS = 8
_BLOCK_BYTES = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}


@dataclasses.dataclass(frozen=True)
class GGUFSource:
    """Where a weight came from: tensor ``name`` of type ``type`` in the GGUF file ``path``, its raw
    blocks at byte ``offset`` (``shape`` = ``N`` rows of ``K`` weights in the file's row order);
    ``rows``: the file's row of each of the weight's rows (``None``: all of them, in the same order;
    transformers permutes the rows of llama's q/k projections, a tensor-parallel shard holds some);
    ``cols``: the file's columns ``[c0, c1)`` the weight holds (``None``: all; a row-parallel shard
    holds a range)."""

    path: str
    name: str
    type: str
    shape: tuple[int, int]
    offset: int
    rows: tuple[int, ...] | None = None
    cols: tuple[int, int] | None = None

    @property
    def held_shape(self) -> tuple[int, int]:
        """The shape of the weight this source describes."""
        c0, c1 = self.cols or (0, self.shape[1])
        return (self.shape[0] if self.rows is None else len(self.rows), c1 - c0)

    @property
    def whole_blocks(self) -> bool:
        """Whether the held columns start and end on the file's groups of 32 (a slice that cuts a
        block cannot hold its grid)."""
        return self.cols is None or (self.cols[0] % GROUP == 0 and self.cols[1] % GROUP == 0)

    def raw_blocks(self) -> np.ndarray:
        """The tensor's bytes, uint8 ``[N, bytes per row]`` (read from the file, not kept)."""
        n, k = self.shape
        per, nbytes = _BLOCK_BYTES[self.type]
        return np.fromfile(self.path, dtype=np.uint8, count=n * (k // per) * nbytes,
                           offset=self.offset).reshape(n, k // per * nbytes)


_SOURCES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # Parameter -> GGUFSource
# _fingerprint(weight) -> GGUFSource of every registered weight: a copy of it has the same values but
# is a new Parameter (PyTorch's Parameter.__deepcopy__ keeps no attributes, and the registry above is
# keyed by identity). A few hundred small entries per model loaded, kept for the process.
_BY_VALUES: dict[tuple, GGUFSource] = {}
_SAMPLE = 256  # values hashed per fingerprint, spread over the whole tensor


def _fingerprint(weight: torch.Tensor) -> tuple | None:
    """``weight``'s shape, dtype and a hash of :data:`_SAMPLE` of its values spread over it; ``None``
    for a tensor without plain values to read (meta, sparse, a tracing subclass such as a fake tensor)."""
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or weight.is_meta or weight.layout != torch.strided:
        return None
    flat = weight.detach().reshape(-1)
    sample = flat[::max(1, flat.numel() // _SAMPLE)][:_SAMPLE].contiguous().cpu()
    digest = hashlib.blake2b(sample.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
    return tuple(weight.shape), weight.dtype, digest


def register_source(weight: torch.Tensor, source: GGUFSource) -> None:
    """Record that ``weight`` (a Parameter of a loaded model) holds GGUF tensor ``source``."""
    _SOURCES[weight] = source
    key = _fingerprint(weight)
    if key is not None:
        _BY_VALUES[key] = source


def source_of(weight: torch.Tensor) -> GGUFSource | None:
    """The GGUF tensor ``weight`` was loaded from, or ``None``: ``weight`` itself registered, or
    failing that a weight with its shape, dtype and sampled values (a copy of a loaded model's; the
    quantize paths check the whole weight against the file's grid before they use it,
    :func:`choose`)."""
    src = _SOURCES.get(weight)
    if src is None and _BY_VALUES:  # no GGUF loaded in this process: nothing to recognise, nothing to hash
        key = _fingerprint(weight)
        src = None if key is None else _BY_VALUES.get(key)
    return src


def register_slice(weight: torch.Tensor, parent: torch.Tensor, *, rows: slice | None = None,
                   cols: slice | None = None) -> None:
    """Record that ``weight`` is a copy of ``parent[rows, cols]`` (a tensor-parallel shard: contiguous
    ranges), so that it keeps what ``parent`` was loaded from: the file's grid where one applies
    (:func:`choose`, :func:`file_grid`). Nothing is recorded when ``parent`` has no source."""
    for what, value in (("rows", rows), ("cols", cols)):
        if not (value is None or (isinstance(value, slice) and value.step in (None, 1))):
            raise ValueError(f"register_slice: {what}={value!r} must be None or a contiguous slice (step 1)")
    src = source_of(parent)
    if src is None:
        return
    n, k = src.held_shape
    r = range(n)[rows if rows is not None else slice(None)]
    c = range(k)[cols if cols is not None else slice(None)]
    if src.rows is not None:
        file_rows = tuple(src.rows[i] for i in r)
    else:
        file_rows = None if len(r) == n else tuple(r)
    base = src.cols[0] if src.cols is not None else 0
    file_cols = src.cols if len(c) == k else (base + c.start, base + c.stop)
    register_source(weight, dataclasses.replace(src, rows=file_rows, cols=file_cols))


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def grid_from_blocks(raw: np.ndarray, gguf_type: str, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The file's own grid of ``N`` rows of ``k`` weights in the nested format's terms.

    ``raw``: uint8 ``[N, bytes per row]`` of a type in :data:`EXACT_BITS`. Returns ``(q8, scale,
    zero, bits)``: 8-bit codes uint8 ``[N, k]``, float32 ``[N, k / 32]`` step and zero (module
    doc), and the rung that reproduces the file (8 for Q8_0, 4 for the Q4 types).
    """
    if gguf_type not in _BLOCK_BYTES:
        raise ValueError(f"GGUF type {gguf_type!r} has no exact grid; exact types are {sorted(_BLOCK_BYTES)}")
    per, nbytes = _BLOCK_BYTES[gguf_type]
    n = raw.shape[0]
    if k % per or raw.shape != (n, k // per * nbytes):
        raise ValueError(f"{gguf_type} blocks of shape {raw.shape} do not hold rows of {k} weights")
    b = raw.reshape(n, k // per, nbytes)
    if gguf_type == "Q8_0":
        d = _f16(b[..., 0:2])  # [N, G]
        q8 = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q8.reshape(n, k), d, -128.0 * d, 8
    if gguf_type == "Q4_K":
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [N, B]
        sc, mn = _k4_scales(b[..., 4:16])  # [N, B, 8] each
        step = d[..., None] * sc  # [N, B, 8]
        lo = -(dmin[..., None] * mn)
        qs = b[..., 16:].reshape(n, k // per, 4, 32)  # 4 chunks of 64 weights: low nibbles, then high
        q = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, k)
        step, lo = step.reshape(n, -1), lo.reshape(n, -1)
    else:  # Q4_0, Q4_1: 16 bytes of codes, weights j (low nibble) and j + 16 (high nibble)
        d = _f16(b[..., 0:2])
        lo = -8.0 * d if gguf_type == "Q4_0" else _f16(b[..., 2:4])
        qs = b[..., nbytes - 16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(n, k)
        step = d
    s = (step / 16.0).astype(np.float32)
    z = (lo - 7.5 * s).astype(np.float32)
    return (q.astype(np.uint8) * 16 + 8).astype(np.uint8), s, z, 4


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's eight 6-bit scales and mins packed in 12 bytes [..., 12] -> two float32 [..., 8]."""
    s = s.astype(np.uint16)
    lo_sc, lo_mn, high = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo_sc & 63, (high & 15) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_mn & 63, (high >> 4) | ((lo_mn >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


class AutoChoice(NamedTuple):
    """What ``bits="auto"`` does with one weight.

    ``kind``: ``"exact"`` (the file's grid at ``bits``), ``"approx"`` (quantized at ``bits`` = 8 from
    the weight), ``"dense"`` (a float type in the file: left alone) or ``"unknown"`` (not loaded from
    a GGUF file: left alone). ``nested`` is the quantized copy for exact and approx, else ``None``.
    ``why`` names the GGUF type (or says why the file's grid was not used)."""

    kind: str
    bits: int | None
    nested: NestedWeight | None
    why: str


_CHOICES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # Parameter -> (_state(it) then, AutoChoice)


def _state(weight: torch.Tensor) -> tuple:
    """What changes when ``weight``'s values may have: its version counter (every in-place change
    bumps it; ``None`` for an inference tensor, which has none) and its storage (``weight.data =
    ...`` swaps it without a bump)."""
    try:
        version = weight._version
    except RuntimeError:
        version = None
    return version, weight.data_ptr(), weight.dtype


def choose(weight: torch.Tensor) -> AutoChoice:
    """The quantized copy that reproduces ``weight``'s GGUF tensor type; see the module doc.
    Made once per weight and kept while the weight is unchanged (changed in place, as by
    ``load_state_dict``, or given new data, it is made again), so every graph and ``quantize_``
    share it, as they share the registry's."""
    state = _state(weight)
    made = _CHOICES.get(weight)
    if made is None or made[0] != state:
        made = _CHOICES[weight] = (state, _choose(weight))
    return made[1]


def _choose(weight: torch.Tensor) -> AutoChoice:
    src = source_of(weight)
    if src is None:
        return AutoChoice("unknown", None, None, "not loaded from a GGUF file")
    if src.type in DENSE_TYPES:
        return AutoChoice("dense", None, None, src.type)
    n, k = weight.shape
    if src.type in EXACT_BITS and (n, k) == src.held_shape and n % 2 == 0 and src.whole_blocks:
        q8, s, z, bits = grid_from_blocks(src.raw_blocks(), src.type, src.shape[1])
        if src.rows is not None:
            idx = np.asarray(src.rows)
            q8, s, z = q8[idx], s[idx], z[idx]
        if src.cols is not None:
            c0, c1 = src.cols
            q8, s, z = q8[:, c0:c1], s[:, c0 // GROUP:c1 // GROUP], z[:, c0 // GROUP:c1 // GROUP]
        q8, s, z = (torch.from_numpy(np.ascontiguousarray(a)) for a in (q8, s, z))
        if _decodes_to(q8, s, z, bits, weight):
            return AutoChoice("exact", bits, _to(pack_codes(q8, s, z), weight.device), src.type)
        why = f"{src.type}, but the weight no longer equals the file's tensor {src.name}"
    elif src.type in EXACT_BITS and not src.whole_blocks:
        why = f"{src.type}, columns {src.cols[0]}..{src.cols[1]} of {src.name} cut its blocks of {GROUP}"
    else:
        why = src.type
    if n % 2 or k % GROUP:
        return AutoChoice("dense", None, None, f"{why}; shape {(n, k)} does not fit groups of {GROUP}")
    with torch.no_grad():
        return AutoChoice("approx", APPROX_BITS, quantize(weight, GROUP), why)


def _to(nw: NestedWeight, device: torch.device) -> NestedWeight:
    return NestedWeight(*(t.to(device) for t in nw))


def _decodes_to(q8: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, weight: torch.Tensor) -> bool:
    """Whether the rung decodes to ``weight`` up to fp32 rounding (and ``weight``'s own dtype)."""
    from .nested import _decode

    w = weight.detach().cpu().float()
    dec = _decode(q8 >> (8 - bits), s, z, bits)
    # fp32 rounding of z + c * S: a few ulps of the group's largest value; a bf16/fp16 weight was
    # rounded once more when it was loaded
    n, k = w.shape
    big = w.reshape(n, k // GROUP, GROUP).abs().amax(-1, keepdim=True)
    err = (dec - w).abs_().reshape(n, k // GROUP, GROUP)
    tol = 8 * torch.finfo(torch.float32).eps * big + torch.finfo(weight.dtype).eps * w.abs().reshape(err.shape)
    return bool((err <= tol).all())


class AutoBitsWarning(UserWarning):
    """``bits="auto"`` approximated some weights (or found some not loaded from a GGUF file)."""


def report(choices: list[tuple[str, AutoChoice]]) -> str:
    """One line saying what ``bits="auto"`` did with each weight (``(name, choice)`` pairs)."""
    parts = []
    exact = Counter((c.why, c.bits) for _, c in choices if c.kind == "exact")
    if exact:
        parts.append("the file's own grid: " + ", ".join(f"{t} {n} at {b} bits" for (t, b), n in exact.items()))
    for kind, title in (("approx", f"approximated at {APPROX_BITS} bits"), ("dense", "left dense"),
                        ("unknown", "left dense, not loaded from a GGUF file")):
        group = [(name, c) for name, c in choices if c.kind == kind]
        if group:
            counts = Counter(c.why for _, c in group)
            parts.append(f"{title}: " + ", ".join(f"{why} {n}" for why, n in counts.items())
                         + f" (e.g. {group[0][0]})")
    return "bits='auto': " + ("; ".join(parts) if parts else "no weight linears")


def warn_if_approximated(choices: list[tuple[str, AutoChoice]], stacklevel: int = 3) -> None:
    """The :func:`report` line as an :class:`AutoBitsWarning` when a weight was approximated or
    not loaded from a GGUF file; silent when every weight is on the file's own grid or dense."""
    if any(c.kind in ("approx", "unknown") for _, c in choices):
        warnings.warn(report(choices), AutoBitsWarning, stacklevel=stacklevel)


def require_gguf(choices: list[tuple[str, AutoChoice]]) -> None:
    """``bits="auto"`` with weight linears none of which came from a GGUF file: a clear error."""
    if choices and all(c.kind == "unknown" for _, c in choices):
        raise ValueError(f"bits='auto' quantizes weights at the precision of the GGUF file they were loaded from, "
                         f"but none of the {len(choices)} weight linears was loaded from one (e.g. {choices[0][0]}); "
                         "load the model with csd_compile.load_model('file.gguf') (or an embedded model), or "
                         "choose bits=4 or 8")


def stored_exactly(weight: torch.Tensor) -> AutoChoice | None:
    """``weight``'s :func:`choose` when it is the file's own grid bit for bit (a type in
    :data:`EXACT_BITS`, unchanged since loading), else ``None``; reads the file only for such types.
    What a static ``bits`` width does with an LM head by default (``quantize_lm_head=None``)."""
    src = source_of(weight)
    if src is None or src.type not in EXACT_BITS:
        return None
    choice = choose(weight)
    return choice if choice.kind == "exact" else None


def file_grid(weight: torch.Tensor, group_size: int) -> NestedWeight | None:
    """The file's own grid of ``weight`` where :func:`~csd_compile.quant.nested.quantize` at
    ``group_size`` would only estimate it: a 4-bit type (Q4_0, Q4_1, Q4_K) at group size 32, the
    file unchanged since loading. ``quantize`` recognises a Q4 block's grid in the decoded weight as
    the model holds it (in bf16 only up to its rounding: on the embedded model it finds the file's
    codes, with step and origin estimated from rounded values; on other weights it may miss the grid
    and fall back to RTN-4); this copy is the file's ``d`` and ``m`` themselves, i.e. the file's
    weights exactly (which the CPU kernel can also hold in float16). ``None`` otherwise (other
    types keep ``quantize``'s grid at static bits: a Q8_0 block's 4-bit rung is not RTN-4)."""
    if not uses_file_grid(weight, group_size):
        return None
    # choose() checks its copy when it makes it and makes it again after any change it can see (the
    # version counter, the storage); an inference tensor counts no in-place changes, so a copy made
    # before is checked again against such a weight as it is now
    unseen_changes = weight in _CHOICES and _state(weight)[0] is None
    choice = choose(weight)
    if choice.kind != "exact":
        return None
    nw = choice.nested
    if unseen_changes and not _decodes_to(nested_codes(nw.qdata.cpu(), 8), nw.scale.cpu(), nw.zero.cpu(), 4, weight):
        return None
    return nw


# Bytes per group of 32 that the CPU kernel reads beside the codes of a weight on its file's grid
# (nested.pack_scale_zero, "auto"): a Q4_0 / Q4_1 block's pair (d, m) is two fp16 numbers, a Q8_0
# block's grid is symmetric (its d alone); Q4_K's steps come from 6-bit sub-scales times an fp16 one,
# which fp16 does not hold (the float32 pair, 8 bytes, as for quantize's grids).
FILE_GRID_SCALE_BYTES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 2, "Q4_K": 8}


def packed_scale_bytes(weight: torch.Tensor, *, on_file_grid: bool) -> int:
    """Bytes per group the CPU kernel reads for ``weight``'s scales and zeros: its GGUF type's
    :data:`FILE_GRID_SCALE_BYTES` when its nested copy is the file's grid (``on_file_grid``: what
    ``bits="auto"``, :func:`file_grid` and a stored LM head give), else 8 (a float32 pair). From the
    type alone, no file read: for byte counts."""
    src = source_of(weight)
    if not on_file_grid or src is None:
        return 8
    return FILE_GRID_SCALE_BYTES.get(src.type, 8)


def uses_file_grid(weight: torch.Tensor, group_size: int) -> bool:
    """Whether a static-bits copy of ``weight`` at ``group_size`` is its file's grid (:func:`file_grid`'s
    condition, from the type alone: a Q4 type at group 32)."""
    return group_size == GROUP and exact_bits(weight) == 4


def exact_bits(weight: torch.Tensor) -> int | None:
    """The rung of ``weight``'s GGUF type when the nested format holds that type exactly (from the
    type alone, no file read: for byte counts), else ``None``."""
    src = source_of(weight)
    return None if src is None or not src.whole_blocks else EXACT_BITS.get(src.type)


def auto_bits(weight: torch.Tensor) -> int | None:
    """The rung ``bits="auto"`` runs ``weight`` at, from its GGUF type alone (no file read): 4 or 8,
    or ``None`` when it stays dense (a float type, or not loaded from a GGUF file). For byte
    counts (the bench's roofline); :func:`choose` makes the copy."""
    src = source_of(weight)
    if src is None or src.type in DENSE_TYPES:
        return None
    n, k = src.held_shape
    if n % 2:  # what choose() leaves dense
        return None
    exact = exact_bits(weight)
    if exact is not None:
        return exact
    return APPROX_BITS if k % GROUP == 0 else None
