"""Loading the embedded default model and local Hugging Face checkpoints."""

from .loader import EMBEDDED_MODELS, DEFAULT_MODEL, load_model, resolve_dtype

__all__ = ["DEFAULT_MODEL", "EMBEDDED_MODELS", "load_model", "resolve_dtype"]
