"""Speculative decoding: acceptance rules, draft sources, the compiled draft-verify step, ``generate``."""

from .acceptance import greedy_accept, sample_accept
from .drafts import ModelDraft, NgramDraft, make_self_draft
from .generate import generate
from .step import build_step

__all__ = ["ModelDraft", "NgramDraft", "build_step", "generate", "greedy_accept", "make_self_draft", "sample_accept"]
