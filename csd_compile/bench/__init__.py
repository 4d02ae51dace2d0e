"""The side-by-side benchmark behind ``csd-compile bench``: the harness, its systems, its prompts.

Importing this package registers every system in :data:`SYSTEMS`. Rows that need optional
packages (llama-cpp-python, torchao) import them only when they run, and say why they are
skipped when the package is missing.
"""

from . import systems as _systems  # noqa: F401  (registers the systems)
from .harness import BASELINE, SYSTEMS, BenchContext, System, run, system

__all__ = ["BASELINE", "SYSTEMS", "BenchContext", "System", "run", "system"]
