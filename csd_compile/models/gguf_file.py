"""What a GGUF file holds, read from its header alone: the architecture and each tensor's name,
shape, type and data offset. Bad files become a ``ValueError`` naming the file (and the tensor or
architecture) before transformers' reader sees them; :func:`record_sources` ties a loaded model's
weights to their GGUF tensors for ``bits="auto"``.

Layout (GGUF versions 2 and 3, little-endian): magic ``GGUF``, u32 version, u64 tensor count, u64
key/value count; the key/value pairs (string key, u32 value type, value); per tensor its name,
u32 dimension count, u64 dimensions (innermost first), u32 type, u64 offset; then the data, from
the header's end rounded up to ``general.alignment`` (default 32).
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from collections import Counter
from pathlib import Path

import numpy as np

__all__ = ["GGUFHeader", "TensorInfo", "check_readable", "read_header", "record_sources"]

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # innermost first, as in the file
    type: str  # the GGML type's name, e.g. "Q4_1"
    offset: int  # absolute, in bytes


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    architecture: str | None
    tensors: list[TensorInfo]

    def type_counts(self) -> dict[str, int]:
        """How many tensors of each type, most common first."""
        return dict(Counter(t.type for t in self.tensors).most_common())


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise ValueError(f"{self.path}: the GGUF header ends early (at byte {self.pos} of {len(self.buf)})")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: a string of {n} bytes runs past the end of the file")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _SCALARS:  # skipped, not read: tokenizer arrays hold 10^5 entries
                size = struct.calcsize("<" + _SCALARS[etype]) * count
                if self.pos + size > len(self.buf):
                    raise ValueError(f"{self.path}: an array of {count} values runs past the end of the file")
                self.pos += size
            else:
                for _ in range(count):
                    self.value(etype)
            return None
        raise ValueError(f"{self.path}: unknown GGUF value type {vtype} in the header")


def read_header(path: str | Path) -> GGUFHeader:
    """Read the header of the GGUF file ``path``; see the module doc. Raises ``ValueError`` naming
    the file for a damaged header, and naming the tensor for a tensor type no reader knows."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as f:
        if path.stat().st_size < 24:
            raise ValueError(f"{path} is not a GGUF file ({path.stat().st_size} bytes)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        cur = _Cursor(buf, path)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r})")
        cur.pos = 4
        version = cur.take("I")
        if version not in (2, 3):
            raise ValueError(f"{path} is GGUF version {version}; versions 2 and 3 are supported")
        n_tensors, n_kv = cur.take("Q"), cur.take("Q")
        if n_tensors > len(buf) // 24 or n_kv > len(buf) // 12:
            raise ValueError(f"{path}: the header claims {n_tensors} tensors and {n_kv} keys, more than the file holds")
        arch, align = None, 32
        for _ in range(n_kv):
            key, vtype = cur.string(), cur.take("I")
            value = cur.value(vtype)
            if key == "general.architecture" and isinstance(value, str):
                arch = value
            elif key == "general.alignment" and isinstance(value, int) and value > 0:
                align = value
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("I")
            if n_dims > 8:
                raise ValueError(f"{path}: tensor {name!r} claims {n_dims} dimensions")
            dims = tuple(cur.take("Q") for _ in range(n_dims))
            raw.append((name, dims, cur.take("I"), cur.take("Q")))
        start = -(-cur.pos // align) * align
        known = {t.value: t for t in GGMLQuantizationType}
        tensors = []
        for name, dims, type_id, offset in raw:
            if type_id not in known:
                raise ValueError(f"{path}: tensor {name!r} has GGUF tensor type {type_id}, which is unknown; known types "
                                 f"are {', '.join(f'{t.name} ({t.value})' for t in GGMLQuantizationType)}")
            qtype = known[type_id]
            per, nbytes = GGML_QUANT_SIZES[qtype]
            numel = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if dims and dims[0] % per:
                raise ValueError(f"{path}: tensor {name!r} of type {qtype.name} has rows of {dims[0]} weights, not "
                                 f"a multiple of its block of {per}")
            if start + offset + numel // per * nbytes > len(buf):
                raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (truncated download?)")
            tensors.append(TensorInfo(name, dims, qtype.name, start + offset))
    finally:
        buf.close()
    return GGUFHeader(str(path), version, arch, tensors)


def check_readable(header: GGUFHeader) -> None:
    """A clear error for an architecture transformers cannot build or a tensor type gguf cannot
    dequantize, before the (slow, and less clear) conversion starts."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path, arch = header.path, header.architecture
    if arch is None:
        raise ValueError(f"{path} has no general.architecture key: not a GGUF model file")
    # transformers reads some architectures under another name (its load_gguf_checkpoint)
    aliases = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
               "t5encoder": "t5"}
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and aliases.get(arch) not in GGUF_SUPPORTED_ARCHITECTURES:
        supported = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise ValueError(f"{path} holds a {arch!r} model, an architecture transformers cannot load from GGUF; "
                         f"it can load {supported}")
    for t in header.tensors:
        qtype = gguf.GGMLQuantizationType[t.type]
        per, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.dequantize(np.zeros(nbytes, dtype=np.uint8), qtype)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name!r} has GGUF type {t.type}, which the gguf package cannot "
                             "dequantize") from None


def record_sources(model, header: GGUFHeader) -> dict[str, int]:
    """Tie each weight of ``model`` (loaded from the GGUF ``header.path``) to its GGUF tensor
    (:func:`csd_compile.quant.gguf.register_source`), with gguf's name map and transformers' tensor
    processor for the architecture: a tensor the processor changes other than by permuting rows
    (e.g. transposed or reshaped) is not tied (``bits="auto"`` then treats its weight as not from
    the file). Returns the number of tensors tied, per GGUF type."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    from ..quant.gguf import GGUFSource, register_source

    arch = next((a for a, name in MODEL_ARCH_NAMES.items() if name == header.architecture), None)
    layers = getattr(model.config, "num_hidden_layers", None)
    if arch is None or not isinstance(layers, int):
        return {}
    name_map = get_tensor_name_map(arch, layers)
    processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=model.config.to_dict())
    params = {}
    for hf_name, weight in model.named_parameters(remove_duplicate=False):
        base, dot, suffix = processor.preprocess_name(hf_name).rpartition(".")
        gguf_name = name_map.get_name(base) if dot else None
        if gguf_name is not None:
            params.setdefault(f"{gguf_name}.{suffix}", weight)
    tied: Counter = Counter()
    for t in header.tensors:
        weight = params.get(t.name)
        if weight is None or len(t.dims) != 2 or tuple(weight.shape) != (t.dims[1], t.dims[0]):
            continue
        n, k = weight.shape
        rows = _row_order(processor, t.name, n)
        if rows is False:
            continue
        register_source(weight, GGUFSource(header.path, t.name, t.type, (n, k), t.offset, rows))
        tied[t.type] += 1
    return dict(tied)


def _row_order(processor, name: str, n: int):
    """The processor's effect on a tensor's rows: ``None`` (unchanged), a tuple (row i of the
    model's weight is the file's row ``rows[i]``) or ``False`` (not a row permutation)."""
    probe = np.repeat(np.arange(n, dtype=np.float64)[:, None], 2, axis=1)
    try:
        out = np.asarray(processor.process(weights=probe.copy(), name=name, tensor_key_mapping={},
                                           parsed_parameters={"tensors": {}}).weights)
    except Exception:  # noqa: BLE001 - a processor that needs the real tensor: not a row permutation
        return False
    if out.shape != probe.shape or not np.array_equal(out[:, 0], out[:, 1]):
        return False
    if not np.array_equal(np.sort(out[:, 0]), probe[:, 0]):
        return False
    rows = out[:, 0].astype(np.int64)
    return None if np.array_equal(rows, probe[:, 0]) else tuple(int(r) for r in rows)
