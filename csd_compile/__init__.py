"""csd-compile: a torch.compile backend for fast LLM inference.

``torch.compile(model, backend="csd", options={...})`` works after ``pip install csd-compile``
without importing this package; import it for the helpers below.
"""

from .backend import CSDFallbackWarning, csd_backend
from .config import CSDConfig, OptionError
from .models import load_model
from .quant import QLinear, quantize_, set_bits
from .quant.calibrate import calibrate
from .quant.policy import DynamicPrecisionPolicy, enable_dynamic_precision
from .quant.table import PrecisionTable
from .speculative import generate
from .speculative.memory import CorrectionMemory, MemoryFileError, protected_tokens, seed_from_prompts

__all__ = [
    "CSDConfig",
    "CSDFallbackWarning",
    "CorrectionMemory",
    "DynamicPrecisionPolicy",
    "MemoryFileError",
    "OptionError",
    "PrecisionTable",
    "QLinear",
    "calibrate",
    "csd_backend",
    "enable_dynamic_precision",
    "generate",
    "load_model",
    "protected_tokens",
    "quantize_",
    "seed_from_prompts",
    "set_bits",
]
__version__ = "0.1.0"
