"""Backend options: the one place where ``torch.compile(..., options=...)`` is parsed.

``CSDConfig.from_options(options)`` turns the user's dict into a frozen, validated dataclass. An
unknown key or a bad value raises :class:`OptionError` (a ``ValueError``) that names the value and
what is allowed, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["CSDConfig", "OptionError", "SUPPORTED_BITS", "SUPPORTED_GROUP_SIZES", "MODES"]

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
AUTO_GROUP_SIZE = 32  # bits="auto": every GGUF block type holds 32 (or 8 x 32) weights of a row
# torch.compile's modes, which are Inductor's settings (torch._inductor.list_mode_options)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class OptionError(ValueError):
    """A backend option that is unknown or has a value outside what is allowed."""


# Keys earlier versions accepted that the backend cannot honour: the decoding loop (and so the
# acceptance rule, its memory and gate) belongs to ``csd_compile.generate``, never to a compiled graph.
_MOVED_KEYS = {
    "acceptance": "csd_compile.generate(..., acceptance='csd')",
    "lambda": "csd_compile.generate(..., acceptance='csd', lam=...)",
    "tau": "csd_compile.generate(..., acceptance='csd', tau=...)",
}


@dataclasses.dataclass(frozen=True)
class CSDConfig:
    """Validated options of the ``"csd"`` backend.

    Attributes:
        bits: weight bit-width of the quantized linears: ``None`` (no quantization, the default),
            one of ``SUPPORTED_BITS`` for a static width, ``"dynamic"`` for the entropy-driven
            per-token policy (needs ``calibration``), or ``"auto"``: each weight loaded from a GGUF
            file at the rung and grid that reproduce its GGUF type (``csd_compile.quant.gguf``:
            Q4_0/Q4_1/Q4_K exactly at 4 bits, Q8_0 at 8, other quantized types at 8 bits, float
            types left dense); a graph with weight linears none of which came from a GGUF file
            is an error.
        group_size: quantization group size along the input features, one of
            ``SUPPORTED_GROUP_SIZES``; default 64, and 32 (the only choice) with ``bits="auto"``.
        quantize_lm_head: the output projection. ``True``: quantized like the other linears
            (at ``bits``; with ``bits="auto"`` at its file's grid); ``False``: dense. ``None``
            (the default) reads it as the checkpoint stores it: with static ``bits`` or ``"auto"``,
            a head a GGUF file stores in a type the nested format holds exactly (Q8_0 at 8 bits,
            Q4_0/Q4_1/Q4_K at 4, group 32) runs on that grid, bit for bit the file's weights and
            fewer bytes than a dense copy; ``"auto"`` also takes other quantized types (at 8 bits,
            like its linears); every other head stays dense (a 4-bit head hurts quality most, and
            the dynamic policy keeps it out of its plan).
        avg_bits: bit budget of the dynamic policy, between the lowest and highest rung of the
            table (default 6.0, clipped to its ladder).
        calibration: path of the precision-requirement table made by ``csd-compile calibrate``.
        fuse_gating: rewrite acceptance written in plain torch (exact greedy acceptance, or CSD's
            read-only rescue test) into one fused ``csd.gate`` op (off by default). The rule itself
            (exact or CSD, its ``tau`` and ``lambda``) is the caller's code, e.g. the step that
            ``csd_compile.generate`` builds; the backend only fuses what it finds.
        group_linears: quantized linears that read the same input (a layer's q/k/v projections,
            gate and up) run as one ``csd.qlinear_multi`` call, each on its own weight copy at its
            own bit-width (default ``True``; fewer calls per decode step; the same values up to
            the order of float additions).
        mode: Inductor's compile mode for the graphs the backend compiles, one of ``MODES``
            (default ``"default"``), as ``torch.compile(mode=...)`` sets it for Inductor:
            ``"reduce-overhead"`` replays a CUDA graph of each compiled step (a decode step of a
            small model on a GPU is bound by kernel launches, not by the GPU), ``"max-autotune"``
            adds Inductor's autotuning. An option because ``torch.compile`` takes ``mode=`` or
            ``options=``, never both; ``torch.compile(model, backend="csd", mode=...)`` works too.
            On CPU, CUDA graphs do not apply and Inductor runs the step as usual.
    """

    bits: int | str | None = None
    group_size: int | None = None
    quantize_lm_head: bool | None = None
    avg_bits: float | None = None
    calibration: str | None = None
    fuse_gating: bool = False
    group_linears: bool = True
    mode: str | None = None

    @classmethod
    def option_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None) -> "CSDConfig":
        """Parse the ``options=`` dict of ``torch.compile``; the dict itself is not modified."""
        if options is None:
            return cls()
        if isinstance(options, CSDConfig):
            return options
        if not isinstance(options, Mapping):
            raise OptionError(
                f"options must be a dict, got {type(options).__name__}; valid keys: {cls.option_keys()}"
            )
        valid = cls.option_keys()
        kwargs = {}
        for key, value in options.items():
            if key in _MOVED_KEYS:
                raise OptionError(f"csd option {key!r} is not a backend option (the backend never owns the decoding "
                                  f"loop): use {_MOVED_KEYS[key]}; valid options are {valid}")
            if key not in valid:
                raise OptionError(f"unknown csd option {key!r}; valid options are {valid}")
            kwargs[key] = value
        return cls(**kwargs)

    def __post_init__(self) -> None:
        bits = self.bits
        if bits is not None and bits not in ("dynamic", "auto"):
            if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
                raise OptionError(f"option 'bits'={bits!r} is not supported; use None, 'dynamic', 'auto' or one of "
                                  f"{list(SUPPORTED_BITS)}")
        if self.group_size is None:
            object.__setattr__(self, "group_size", AUTO_GROUP_SIZE if bits == "auto" else 64)
        elif bits == "auto" and self.group_size != AUTO_GROUP_SIZE:
            raise OptionError(f"option 'group_size'={self.group_size!r} does not go with bits='auto', which keeps the "
                              f"GGUF file's blocks of {AUTO_GROUP_SIZE} weights; leave group_size out or set it to "
                              f"{AUTO_GROUP_SIZE}")
        if self.quantize_lm_head is None:
            # static bits keep None: "the file's grid if exact, else dense" is decided per weight
            if bits == "auto":
                object.__setattr__(self, "quantize_lm_head", True)
            elif not isinstance(bits, int):
                object.__setattr__(self, "quantize_lm_head", False)
        _check_choice("group_size", self.group_size, SUPPORTED_GROUP_SIZES, int)
        if self.quantize_lm_head is not None:
            _check_type("quantize_lm_head", self.quantize_lm_head, bool)
        if self.avg_bits is not None:
            _check_type("avg_bits", self.avg_bits, (int, float))
            lo, hi = min(SUPPORTED_BITS), 16
            if not (math.isfinite(self.avg_bits) and lo <= self.avg_bits <= hi):
                raise OptionError(f"option 'avg_bits'={self.avg_bits!r} is outside [{lo}, {hi}]")
            if bits != "dynamic":
                raise OptionError(f"option 'avg_bits' needs bits='dynamic', got bits={bits!r}")
        if bits == "dynamic" and self.calibration is None:
            raise OptionError(
                "option bits='dynamic' needs 'calibration', a precision-requirement table; make one with "
                "`csd-compile calibrate --model MODEL --data britannica --out table.json`"
            )
        if self.calibration is not None:
            _check_type("calibration", self.calibration, (str, os.PathLike))
            object.__setattr__(self, "calibration", os.fspath(self.calibration))
            if bits == "dynamic" and not os.path.isfile(self.calibration):
                raise OptionError(f"option 'calibration'={self.calibration!r}: no such file; make one with "
                                  "`csd-compile calibrate --model MODEL --data britannica --out table.json`")
        _check_type("fuse_gating", self.fuse_gating, bool)
        _check_type("group_linears", self.group_linears, bool)
        if self.mode is not None:
            _check_choice("mode", self.mode, MODES, str)

def _check_type(key: str, value: Any, types: type | tuple[type, ...]) -> None:
    names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
    # bool is an int subclass; only a bool option accepts it.
    is_bool_ok = types is bool or (isinstance(types, tuple) and bool in types)
    if not isinstance(value, types) or (isinstance(value, bool) and not is_bool_ok):
        raise OptionError(f"option {key!r}={value!r} has type {type(value).__name__}; expected {names}")


def _check_choice(key: str, value: Any, choices: tuple, typ: type) -> None:
    _check_type(key, value, typ)
    if value not in choices:
        raise OptionError(f"option {key!r}={value!r} is not supported; choose one of {list(choices)}")
