"""What makes Inductor's caches see csd-compile's own code.

Inductor keys its FX-graph and AOT caches on the graph, torch's code and its config, not on the
Python bodies of custom ops or on which kernels were available when a graph was traced. A graph
traced with one version of csd-compile (or without its C++ kernels) must not be served to another.
:class:`CacheKeyPass` is a no-op post-grad pass whose ``uuid`` (part of the cache key) hashes every
source file of the package plus whether the C++ kernels are loaded.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

__all__ = ["CacheKeyPass", "source_fingerprint"]

_PACKAGE = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """sha256 over csd-compile's ``.py`` and ``.cpp`` sources (paths and contents)."""
    h = hashlib.sha256()
    for path in sorted([*_PACKAGE.rglob("*.py"), *_PACKAGE.rglob("*.cpp")]):
        h.update(str(path.relative_to(_PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class CacheKeyPass(CustomGraphPass):
    """No-op ``post_grad_custom_post_pass`` that only contributes a cache key."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        from ..kernels import native

        return f"{source_fingerprint()}-native{int(native.available())}"
