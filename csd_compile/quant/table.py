"""The precision-requirement table: per-layer KL sensitivity per rung, as a versioned JSON file.

Written by :func:`csd_compile.calibrate` (``csd-compile calibrate``), read by the dynamic-precision
policy. One file per model; it carries the model's fingerprint so that a table made for another
model is refused. Format (``format`` = ``"csd-precision-table"``, ``version`` = 2)::

    {
      "format": "csd-precision-table", "version": 2,
      "fingerprint": "<sha256 prefix of the layer names/shapes and a few weight values>",
      "ladder": [2, 3, 4, 8],
      "layers": [{"name": "model.layers.0.self_attn.q_proj", "numel": 331776,
                  "kl": [kl@2, kl@3, kl@4, kl@8],              # quantized-linear order
                  "kl_by_entropy": [[kl@2 in bucket 0, ...], ...]}, ...],   # [rung][entropy bucket]
      "entropy_quantiles": [...],   # full-precision next-token entropies (nats) at q = 0, 1/16 .. 1
      "entropy_edges": [...],       # the NB - 1 boundaries of the equally likely entropy buckets
      "settings": {"group_size": 64, "window": 32, "num_windows": 8, "entropy_buckets": 4, "text": "...", ...}
    }

``kl[r]`` is the mean KL(p_full || p_lowered) in nats over the calibration positions when only
that layer runs at ``ladder[r]`` bits (every other layer full precision); ``kl_by_entropy[r][b]``
the same mean over the positions whose full-precision next-token entropy falls in bucket ``b``
(between ``entropy_edges[b-1]`` and ``entropy_edges[b]``). Version 1 tables (no per-entropy KL)
still load; the policy then uses the ``spread`` rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any

import torch
from torch import nn

from ..config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .nested import group_minima

__all__ = ["PrecisionTable", "TableError", "model_fingerprint", "quantizable_linears", "weights_fingerprint"]

FORMAT = "csd-precision-table"
VERSION = 2
_READABLE = (1, 2)


_KL_MAX = 1e3  # nats per token: far above any measured KL (2-bit layers: ~10); larger is a corrupt file


def _valid_kl(v: object) -> bool:
    # a measured KL may come out a hair below 0 from float rounding; a clearly negative one is corrupt
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and -1e-6 <= v <= _KL_MAX


class TableError(ValueError):
    """A precision-requirement table that is corrupt, of an unknown version, or for another model."""


def quantizable_linears(model: nn.Module, group_size: int = 64) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the linears ``quantize_`` would quantize, in module order.

    Plain ``nn.Linear`` layers except the LM head and shapes the nested format cannot hold, plus
    layers already turned into ``QLinear``: the order of a per-layer plan for ``set_bits``.
    """
    from .linear import QLinear, lm_head_of

    head = lm_head_of(model)
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear):
            if mod.in_plan:
                out.append((name, mod))
        elif type(mod) is nn.Linear and mod is not head:
            n, k = mod.weight.shape
            if n % 2 == 0 and k % group_size == 0:
                out.append((name, mod))
    return out


def _group_minima(mod: nn.Module, group_size: int) -> torch.Tensor:
    """:func:`group_minima` of a layer's weight; a ``QLinear`` kept them from its original weight."""
    from .linear import QLinear

    if isinstance(mod, QLinear):
        return mod.fingerprint_minima.cpu()
    return group_minima(mod.weight, group_size)


def model_fingerprint(model: nn.Module, group_size: int = 64) -> str:
    """A short hash of ``model``'s quantizable layers (names, shapes) and of some weight values.

    The values are the bf16-rounded group minima of the first rows of the first, middle and last
    layer, so the same checkpoint matches in bf16, in fp32 and after ``quantize_``.
    """
    layers = quantizable_linears(model, group_size)
    return _fingerprint([(n, _shape(m)) for n, m in layers], lambda i: _group_minima(layers[i][1], group_size))


def weights_fingerprint(named_weights: list[tuple[str, torch.Tensor]], group_size: int = 64) -> str:
    """:func:`model_fingerprint` from ``(module name, weight [N, K])`` pairs in module order, for
    code that sees weights but not modules (a compile pass); names without the ``.weight``."""
    return _fingerprint([(n, tuple(w.shape)) for n, w in named_weights],
                        lambda i: group_minima(named_weights[i][1], group_size))


def _fingerprint(shapes: list[tuple[str, tuple[int, int]]], minima) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([[name, list(shape)] for name, shape in shapes]).encode())
    picks = sorted({0, len(shapes) // 2, len(shapes) - 1}) if shapes else []
    with torch.no_grad():
        for i in picks:
            h.update(minima(i).numpy().tobytes())
    return h.hexdigest()[:16]


def _shape(mod: nn.Module) -> tuple[int, int]:
    return (mod.out_features, mod.in_features)


@dataclasses.dataclass(frozen=True)
class PrecisionTable:
    """Per-layer KL sensitivity of a model for each rung of a bit ladder.

    Attributes:
        fingerprint: :func:`model_fingerprint` of the calibrated model.
        ladder: the rungs, increasing, e.g. ``(2, 3, 4, 8)``.
        names: quantized-linear names, in plan order.
        numels: weight count of each layer (for parameter-weighted average bits).
        kl: ``kl[i][r]`` = mean KL (nats) with only layer ``i`` at ``ladder[r]`` bits.
        entropy_quantiles: full-precision next-token entropy quantiles (nats), 17 values at
            q = 0, 1/16, ..., 1, over the calibration positions.
        settings: how the table was made (group size, windows, text, ...).
        kl_by_entropy: ``kl_by_entropy[i][r][b]`` = that KL over the positions of entropy bucket ``b``
            (``None`` for a version-1 table).
        entropy_edges: the ``NB - 1`` increasing bucket boundaries (nats); ``None`` with ``kl_by_entropy``.
    """

    fingerprint: str
    ladder: tuple[int, ...]
    names: tuple[str, ...]
    numels: tuple[int, ...]
    kl: tuple[tuple[float, ...], ...]
    entropy_quantiles: tuple[float, ...]
    settings: dict = dataclasses.field(default_factory=dict)
    kl_by_entropy: tuple[tuple[tuple[float, ...], ...], ...] | None = None
    entropy_edges: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        ladder = tuple(self.ladder)
        if not ladder or any(b not in SUPPORTED_BITS for b in ladder) or list(ladder) != sorted(set(ladder)):
            raise TableError(f"table ladder {list(ladder)} must be increasing rungs from {list(SUPPORTED_BITS)}")
        n = len(self.names)
        if n == 0 or len(self.numels) != n or len(self.kl) != n:
            raise TableError(f"table has {n} names, {len(self.numels)} numels and {len(self.kl)} kl rows; "
                             "they must be equal and non-zero")
        if len(set(self.names)) != n:
            raise TableError("table layer names must be distinct")
        for name, numel in zip(self.names, self.numels):
            if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
                raise TableError(f"table numel of {name!r} must be a positive int, got {numel!r}")
        for name, row in zip(self.names, self.kl):
            if len(row) != len(ladder) or not all(_valid_kl(v) for v in row):
                raise TableError(f"table row for {name!r} must hold {len(ladder)} KL values in [0, {_KL_MAX:g}] "
                                 f"nats, got {row!r}")
        group = self.settings.get("group_size", 64) if isinstance(self.settings, dict) else None
        if isinstance(group, bool) or group not in SUPPORTED_GROUP_SIZES:
            raise TableError(f"table settings group_size={group!r} is not one of {list(SUPPORTED_GROUP_SIZES)}")
        q = self.entropy_quantiles
        if len(q) < 2 or list(q) != sorted(q) or not all(math.isfinite(v) for v in q):
            raise TableError(f"table entropy_quantiles must be >= 2 increasing finite values, got {list(q)!r}")
        if (self.kl_by_entropy is None) != (self.entropy_edges is None):
            raise TableError("table kl_by_entropy and entropy_edges come together (both or neither)")
        if self.kl_by_entropy is not None:
            edges = self.entropy_edges
            if list(edges) != sorted(edges) or not all(math.isfinite(v) for v in edges):
                raise TableError(f"table entropy_edges must be increasing finite values, got {list(edges)!r}")
            nb = len(edges) + 1
            if len(self.kl_by_entropy) != n:
                raise TableError(f"table has {n} layers but {len(self.kl_by_entropy)} kl_by_entropy rows")
            for name, row in zip(self.names, self.kl_by_entropy):
                if len(row) != len(ladder) or any(len(cells) != nb or not all(_valid_kl(v) for v in cells)
                                                  for cells in row):
                    raise TableError(f"table kl_by_entropy for {name!r} must be {len(ladder)} rungs x {nb} buckets "
                                     f"of KL values in [0, {_KL_MAX:g}] nats, got {row!r}")

    @property
    def num_entropy_buckets(self) -> int | None:
        """Entropy buckets of ``kl_by_entropy`` (``None`` for a version-1 table)."""
        return None if self.entropy_edges is None else len(self.entropy_edges) + 1

    @property
    def group_size(self) -> int:
        return int(self.settings.get("group_size", 64))

    def to_json(self) -> dict:
        """The JSON document (see the module docstring); version 1 when there is no per-entropy KL."""
        layers = [{"name": n, "numel": c, "kl": list(r)} for n, c, r in zip(self.names, self.numels, self.kl)]
        doc = {"format": FORMAT, "version": 1 if self.kl_by_entropy is None else VERSION,
               "fingerprint": self.fingerprint, "ladder": list(self.ladder), "layers": layers,
               "entropy_quantiles": list(self.entropy_quantiles)}
        if self.kl_by_entropy is not None:
            for layer, row in zip(layers, self.kl_by_entropy):
                layer["kl_by_entropy"] = [list(cells) for cells in row]
            doc["entropy_edges"] = list(self.entropy_edges)
        return doc | {"settings": dict(self.settings)}

    def save(self, path: str | os.PathLike) -> None:
        """Write the table to ``path`` (JSON)."""
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def from_json(cls, doc: Any, source: str = "table") -> "PrecisionTable":
        """Parse a JSON document; :class:`TableError` if it is not a valid version-1 or -2 table."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise TableError(f"{source} is not a csd precision table (no format={FORMAT!r}); "
                             "make one with `csd-compile calibrate --model M --data D --out F`")
        version = doc.get("version")
        if isinstance(version, bool) or version not in _READABLE:
            raise TableError(f"{source} has table version {version!r}; "
                             f"this csd-compile reads versions {list(_READABLE)}")
        try:
            layers = doc["layers"]
            by_entropy = edges = None
            if version >= 2:
                by_entropy = tuple(tuple(tuple(float(v) for v in cells) for cells in layer["kl_by_entropy"])
                                   for layer in layers)
                edges = tuple(float(v) for v in doc["entropy_edges"])
            return cls(
                fingerprint=str(doc["fingerprint"]),
                ladder=tuple(int(b) for b in doc["ladder"]),
                names=tuple(str(l["name"]) for l in layers),
                numels=tuple(int(l["numel"]) for l in layers),
                kl=tuple(tuple(float(v) for v in l["kl"]) for l in layers),
                entropy_quantiles=tuple(float(v) for v in doc["entropy_quantiles"]),
                settings=dict(doc.get("settings", {})),
                kl_by_entropy=by_entropy,
                entropy_edges=edges,
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, TableError):
                raise
            raise TableError(f"{source} is a corrupt precision table ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "PrecisionTable":
        """Read a table; with ``model``, also check it was made for that model (fingerprint)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"precision table {path!r} not found; make one with "
                                    "`csd-compile calibrate --model M --data D --out F`")
        try:
            with open(path) as f:
                doc = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TableError(f"precision table {path!r} is corrupt (not JSON: {e})") from None
        table = cls.from_json(doc, source=f"precision table {path!r}")
        if model is not None:
            table.check_model(model)
        return table

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`TableError` unless this table was calibrated on ``model``."""
        self.check_fingerprint(model_fingerprint(model, self.group_size))

    def check_fingerprint(self, fingerprint: str) -> None:
        """Raise :class:`TableError` unless ``fingerprint`` (:func:`model_fingerprint` or
        :func:`weights_fingerprint`) is the one this table was calibrated for."""
        if fingerprint != self.fingerprint:
            raise TableError(
                f"precision table was calibrated for another model (fingerprint {self.fingerprint}, "
                f"this model {fingerprint}); run `csd-compile calibrate` for this model")
