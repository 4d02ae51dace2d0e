"""The memory roofline of greedy decoding: bytes read per decode step, and the machine's bandwidth.

A decode step of a small model on CPU is bound by memory traffic: every weight is read once per
step, and the attention reads the KV cache. :func:`step_bytes` counts those bytes from the model's
module shapes (no model-specific constants); :func:`measure_bandwidth` times a streaming read far
larger than the last-level cache. ``bandwidth / bytes per token`` is the fastest decode the
machine allows for that weight format: the roofline. What is counted, per step:

* ``linears``: every ``nn.Linear`` but the LM head, in its weight format: the nested format
  (:mod:`csd_compile.quant.nested`) reads plane 0 only at 2/3/4 bits (0.5 byte per weight) and
  both planes at 8 bits (1 byte), plus 8 bytes (fp32 scale + zero) per group of ``group_size``,
  fewer for a weight on its GGUF file's grid, as the CPU kernel packs it
  (:func:`csd_compile.quant.gguf.packed_scale_bytes`: 4 for a Q4_0 / Q4_1 tensor's fp16 pair, at
  group 32, 2 for a Q8_0 tensor's fp16 step); a linear the quantize pass leaves alone (odd
  out_features, in_features not a multiple of the group) is counted at ``dtype``, as are biases.
* ``lm_head``: the output projection at ``dtype``, like a linear when ``quantize_lm_head``; by
  default (``None``) with static ``bits``, on the model's GGUF grid when the file stores it in a
  type the nested format holds exactly (:func:`csd_compile.quant.gguf.exact_bits`: what the
  quantize pass does with it; needs the loaded model, not its config).
* ``bits="auto"`` (a model loaded from a GGUF file; the model itself, not its config): each linear,
  the LM head included, in the nested format at group 32 at the rung ``bits="auto"`` gives it
  (:func:`csd_compile.quant.gguf.auto_bits`: a Q4 type at 4 bits, 0.5 byte + 4 per 32 for Q4_0 /
  Q4_1, + 8 for Q4_K; Q8_0 at 8 bits, 1 byte + 2 per 32; an approximated type at 8 bits, 1 byte + 8
  per 32), a float type or a weight not from the file at ``dtype``. SmolLM2's Q8_0 head is thus
  1.0625 byte per weight (Q8_0's own size), not bf16's 2.
* ``kv_cache``: ``layers x 2 x kv_heads x head_dim x context_len x kv dtype bytes``. Assumption:
  attention reads only the filled positions; ``context_len`` is the caller's (the harness uses
  prompt + mean generated position). A static cache that attends over its whole buffer reads more.
* ``embedding_row``: one row of the input embedding at ``dtype``.
* ``norms``: every other parameter (norm weights) at ``dtype``.

Activations, logits and the rotary tables are not counted (kilobytes against megabytes).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch

__all__ = [
    "GGUF_Q4_1", "GGUF_Q8_0", "DTYPE_BYTES", "Precision", "WeightFormat", "dense_format",
    "default_bandwidth_bytes", "last_level_cache_bytes", "measure_bandwidth", "nested_format", "step_bytes",
]

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How a ``[N, K]`` weight is stored: bytes per weight plus bytes per group of ``group_size``
    consecutive input features of one row (``group_size=0``: one group per row, e.g. per-channel)."""

    name: str
    bytes_per_weight: float
    group_size: int = 0
    bytes_per_group: float = 0.0

    def nbytes(self, n_out: int, k_in: int) -> float:
        """Bytes read for one ``[n_out, k_in]`` weight."""
        groups = n_out * (math.ceil(k_in / self.group_size) if self.group_size else 1)
        return n_out * k_in * self.bytes_per_weight + groups * self.bytes_per_group


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not known; choose one of {list(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def dense_format(dtype: str) -> WeightFormat:
    """An unquantized weight at ``dtype`` (``"bf16"``, ``"fp16"``, ``"fp32"``)."""
    return WeightFormat(dtype, _dtype_bytes(dtype))


def nested_format(bits: int, group_size: int, *, scale_bytes: int = 8) -> WeightFormat:
    """The nested format read at ``bits``: 0.5 byte/weight at 2/3/4 bits, 1 at 8, + the scale and
    zero of each group: ``scale_bytes`` 8 (fp32 pair), 4 (fp16 pair, named ``...-fp16``) or 2 (a
    symmetric grid's fp16 step, ``...-sym-fp16``)."""
    from csd_compile.config import SUPPORTED_GROUP_SIZES
    from csd_compile.quant.nested import check_bits

    check_bits(bits)
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not supported; choose one of {list(SUPPORTED_GROUP_SIZES)}")
    suffix = {8: "", 4: "-fp16", 2: "-sym-fp16"}
    if scale_bytes not in suffix:
        raise ValueError(f"scale_bytes={scale_bytes!r}; choose one of {sorted(suffix)}")
    return WeightFormat(f"nested-int{bits}-g{group_size}{suffix[scale_bytes]}", 1.0 if bits == 8 else 0.5,
                        group_size, float(scale_bytes))


def _nested_of(weight: torch.Tensor, bits: int, group_size: int, *, on_file_grid: bool) -> WeightFormat:
    """The nested format ``weight`` is read in at ``bits``, its scales as the CPU kernel packs them
    (:func:`csd_compile.quant.gguf.packed_scale_bytes`, from the GGUF type alone)."""
    from csd_compile.quant.gguf import packed_scale_bytes

    return nested_format(bits, group_size, scale_bytes=packed_scale_bytes(weight, on_file_grid=on_file_grid))


GGUF_Q4_1 = WeightFormat("gguf-q4_1", 0.5, 32, 4.0)  # fp16 d and m per block of 32
GGUF_Q8_0 = WeightFormat("gguf-q8_0", 1.0, 32, 2.0)  # fp16 d per block of 32


def _as_model(model_or_config) -> torch.nn.Module:
    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost worth naming
        return AutoModelForCausalLM.from_config(model_or_config)


def auto_formats(model: torch.nn.Module, dense: WeightFormat, given=None) -> dict[torch.nn.Module, WeightFormat]:
    """The format of each linear of ``model`` under ``bits="auto"`` (the module doc)."""
    from csd_compile.config import AUTO_GROUP_SIZE
    from csd_compile.quant.gguf import auto_bits, exact_bits

    if not isinstance(given, torch.nn.Module):
        raise ValueError("bits='auto' counts each weight at its GGUF type: pass the loaded model, not its config")
    out = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            b = auto_bits(module.weight)
            out[module] = dense if b is None else _nested_of(module.weight, b, AUTO_GROUP_SIZE,
                                                             on_file_grid=exact_bits(module.weight) is not None)
    return out


def _head_format(head: torch.nn.Module | None, quant: WeightFormat, dense: WeightFormat, *, bits,
                 quantize_lm_head: bool | None, head_format: WeightFormat | None) -> WeightFormat:
    """The LM head's format: ``head_format`` when given, the linears' ``quant`` when
    ``quantize_lm_head``, and by default (``None``) with static ``bits`` its GGUF grid when the file
    stores it exactly (what the quantize pass does; ``head=None``, a config's, is dense); else ``dense``."""
    from csd_compile.config import AUTO_GROUP_SIZE
    from csd_compile.quant.gguf import exact_bits

    if head_format is not None:
        return head_format
    if quantize_lm_head:
        return _static_format(head, quant, bits)
    b = exact_bits(head.weight) if quantize_lm_head is None and isinstance(bits, int) and head is not None else None
    return dense if b is None else _nested_of(head.weight, b, AUTO_GROUP_SIZE, on_file_grid=True)


def _static_format(module: torch.nn.Module | None, quant: WeightFormat, bits) -> WeightFormat:
    """``quant`` (the nested format at static ``bits``, or a given format) for ``module``'s weight,
    with the scales that weight gets (fewer bytes on its file's grid:
    :func:`~csd_compile.quant.gguf.file_grid`)."""
    from csd_compile.quant.gguf import uses_file_grid

    if module is None or not isinstance(bits, int) or not quant.name.startswith("nested-"):
        return quant
    return _nested_of(module.weight, bits, quant.group_size,
                      on_file_grid=uses_file_grid(module.weight, quant.group_size))


def _kv_geometry(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def step_bytes(
    model_config,
    *,
    bits: int | str | None = None,
    group_size: int = 64,
    dtype: str = "bf16",
    quantize_lm_head: bool | None = None,
    context_len: float = 0.0,
    weight_format: WeightFormat | None = None,
    head_format: WeightFormat | None = None,
    kv_dtype: str | None = None,
) -> dict[str, float]:
    """Bytes read by one decode step (one token) of a causal LM, by part; see the module doc.

    Args:
        model_config: a Hugging Face config (the model is built on the meta device for its shapes)
            or the model itself.
        bits: the nested format's rung for the quantized linears; ``None``: unquantized;
            ``"auto"``: each weight's own (see the module doc; ``group_size`` is then 32).
        group_size: the nested format's group size.
        dtype: the dtype of everything unquantized (and of the KV cache unless ``kv_dtype``).
        quantize_lm_head: the LM head is quantized like the other linears (``True``), dense
            (``False``), or with static ``bits`` as its GGUF file stores it when exact (``None``).
        context_len: positions the attention reads from the KV cache (>= 0).
        weight_format / head_format: another format for the linears / the LM head (e.g.
            :data:`GGUF_Q4_1` / :data:`GGUF_Q8_0` for llama.cpp); they override ``bits``.
        kv_dtype: the KV cache's dtype, default ``dtype``.

    Returns ``{"linears", "lm_head", "kv_cache", "embedding_row", "norms", "total"}`` in bytes.
    """
    if not context_len >= 0:
        raise ValueError(f"context_len={context_len!r} must be a number >= 0")
    dense = dense_format(dtype)
    model = _as_model(model_config)
    auto = auto_formats(model, dense, model_config) if bits == "auto" and weight_format is None else None
    quant = weight_format or (nested_format(bits, group_size) if bits not in (None, "auto") else dense)
    head = model.get_output_embeddings()
    head_fmt = _head_format(head, quant, dense, bits=bits, quantize_lm_head=quantize_lm_head, head_format=head_format)
    embed = model.get_input_embeddings()
    counted = {id(p) for p in embed.parameters()}
    linears = lm_head = 0.0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        n_out, k_in = module.weight.shape
        bias = module.bias.numel() * dense.bytes_per_weight if module.bias is not None else 0.0
        if auto is not None:  # bits="auto": the LM head too, at its own format
            part = auto[module].nbytes(n_out, k_in) + bias
            lm_head, linears = (lm_head + part, linears) if module is head else (lm_head, linears + part)
        elif module is head:
            lm_head += head_fmt.nbytes(n_out, k_in) + bias
        else:
            fits = quant is not dense and (weight_format is not None or (n_out % 2 == 0 and k_in % group_size == 0))
            fmt = (quant if weight_format is not None else _static_format(module, quant, bits)) if fits else dense
            linears += fmt.nbytes(n_out, k_in) + bias
        counted.update(id(p) for p in module.parameters(recurse=False))
    norms = sum(p.numel() for p in model.parameters() if id(p) not in counted) * dense.bytes_per_weight
    layers, kv_heads, head_dim = _kv_geometry(model.config)
    kv = layers * 2 * kv_heads * head_dim * context_len * _dtype_bytes(kv_dtype or dtype)
    row = embed.weight.shape[1] * dense.bytes_per_weight
    parts = {"linears": linears, "lm_head": lm_head, "kv_cache": kv, "embedding_row": row, "norms": norms}
    parts["total"] = sum(parts.values())
    return parts


@dataclasses.dataclass(frozen=True)
class Precision:
    """What a benchmark row reads per step: the arguments of :func:`step_bytes` plus its drafting.

    ``draft``: ``None`` (plain decoding: one step per token), ``"free"`` (a draft that reads no
    weights, e.g. n-gram lookup: bytes per token = bytes per target step / tokens per target
    forward; the verify forward over K+1 positions is counted as one step's reads), or ``"model"``
    (a model draft: its reads depend on the drafts per step, so the roofline is not applicable).
    """

    bits: int | None = None
    group_size: int = 64
    dtype: str = "bf16"
    quantize_lm_head: bool | None = None
    weight_format: WeightFormat | None = None
    head_format: WeightFormat | None = None
    kv_dtype: str | None = None
    draft: str | None = None

    def __post_init__(self):
        if self.draft not in (None, "free", "model"):
            raise ValueError(f"draft={self.draft!r}; choose None, 'free' or 'model'")
        _dtype_bytes(self.dtype)

    def label(self, model: torch.nn.Module | None = None) -> str:
        """A short name for tables: e.g. ``nested-int4-g64 (head bf16)``; with ``bits="auto"`` the
        formats ``model``'s weights get, e.g. ``auto: nested-int4-g32 x210 (head nested-int8-g32)``."""
        if self.bits == "auto" and self.weight_format is None:
            if model is None:
                return f"auto (head auto), {self.dtype}"
            fmts = auto_formats(model, dense_format(self.dtype), model)
            head = model.get_output_embeddings()
            counts = collections.Counter(f.name for m, f in fmts.items() if m is not head)
            lin = ", ".join(f"{name} x{n}" for name, n in counts.most_common())
            return f"auto: {lin} (head {fmts[head].name if head in fmts else self.dtype})"
        lin = self.weight_format or (nested_format(self.bits, self.group_size) if self.bits is not None else None)
        dense = dense_format(self.dtype)
        head_module = model.get_output_embeddings() if model is not None else None
        head = _head_format(head_module, lin or dense, dense,
                            bits=self.bits, quantize_lm_head=self.quantize_lm_head, head_format=self.head_format)
        name = lin.name if lin else self.dtype
        if lin is not None and self.weight_format is None and model is not None:  # each weight's own scales
            counts = collections.Counter(_static_format(m, lin, self.bits).name for m in model.modules()
                                         if isinstance(m, torch.nn.Linear) and m is not head_module)
            name = ", ".join(n if len(counts) == 1 else f"{n} x{c}" for n, c in counts.most_common()) or name
        return f"{name} (head {head.name})"

    def step_bytes(self, model_config, context_len: float) -> dict[str, float]:
        """:func:`step_bytes` with this row's precision."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "draft"}
        return step_bytes(model_config, context_len=context_len, **kw)


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache reported by sysfs (bytes), or ``None`` when it cannot be read."""
    best = None
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            value = int(text.rstrip("KMG")) * mult
        except ValueError:
            continue
        best = max(best or 0, value)
    return best


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_bandwidth_bytes() -> int:
    """8x the last-level cache, at least 512 MiB, at most a quarter of the available memory."""
    size = max(512 << 20, 8 * (last_level_cache_bytes() or 0))
    avail = _available_memory()
    return min(size, avail // 4) if avail else size


def check_bandwidth_bytes(nbytes: int) -> int:
    """``nbytes`` if a measurement of that size fits: an int >= 4096, at most half the available memory
    (a larger one would push the machine into swap or the OOM killer); else ``ValueError``."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 4096:
        raise ValueError(f"nbytes={nbytes!r} must be an int >= 4096")
    avail = _available_memory()
    if avail and nbytes > avail // 2:
        raise ValueError(f"a bandwidth measurement of {nbytes >> 20} MiB is more than half the available memory "
                         f"({avail >> 20} MiB)")
    return nbytes


def measure_bandwidth(nbytes: int | None = None, *, repeats: int = 5, threads: int | None = None) -> dict:
    """Streaming-read bandwidth: the median time of ``sum()`` over a float32 tensor of ``nbytes``.

    ``nbytes`` defaults to :func:`default_bandwidth_bytes`; ``threads`` to
    ``torch.get_num_threads()`` (the bench's). Returns ``{"gb_s", "gb_s_best", "bytes", "threads",
    "repeats", "llc_bytes"}``: the median and the fastest repeat in 1e9 bytes per second (on a
    shared machine the two part when others load the memory).
    """
    nbytes = default_bandwidth_bytes() if nbytes is None else check_bandwidth_bytes(nbytes)
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be an int >= 1")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        x = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)  # touch every page first
        x.sum()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            times.append(time.perf_counter() - t0)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    del x
    read = nbytes // 4 * 4
    return {"gb_s": read / statistics.median(times) / 1e9, "gb_s_best": read / min(times) / 1e9, "bytes": read,
            "threads": used,
            "repeats": repeats, "llc_bytes": last_level_cache_bytes()}



def roofline_row(precision: Precision | None, model_config, *, context_len: float, gb_s: float, tok_s: float,
                 tokens_per_target_forward: float | None = None) -> dict:
    """A bench row's roofline columns: its weights, bytes per step (by part), bytes per emitted
    token, the limit ``gb_s * 1e9 / bytes per token`` in tok/s and ``tok_s`` as a fraction of it.

    ``roofline_tok_s`` and ``roofline_fraction`` are ``None`` (with a ``roofline_note`` saying why)
    for a row without a precision, a model-drafted speculative row, or a free-draft row that did
    not report its tokens per target forward.
    """
    if precision is None:
        return {"roofline_tok_s": None, "roofline_fraction": None, "roofline_note": "no precision declared"}
    parts = precision.step_bytes(model_config, context_len)
    row = {"weights": precision.label(model_config if isinstance(model_config, torch.nn.Module) else None),
           "context_len": context_len, "step_bytes": parts}
    per_forward = 1.0
    if precision.draft == "model":
        per_forward = None
        row["roofline_note"] = "model draft: its reads per step vary with the drafts, not applicable"
    elif precision.draft == "free":
        per_forward = tokens_per_target_forward
        if per_forward is None:
            row["roofline_note"] = "free draft without tokens per target forward: not applicable"
    if per_forward is None:
        return row | {"bytes_per_token": None, "roofline_tok_s": None, "roofline_fraction": None}
    per_token = parts["total"] / per_forward
    limit = gb_s * 1e9 / per_token
    return row | {"bytes_per_token": per_token, "roofline_tok_s": limit, "roofline_fraction": tok_s / limit}
