"""Plumbing for Hugging Face ``generate`` with the csd backend: prompts, compile config, streaming."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["TextPrinter", "compile_config", "encode_prompt"]


def compile_config(options: Mapping[str, Any] | None = None, backend: str = "csd"):
    """A transformers ``CompileConfig`` that compiles the decode step with ``backend``.

    ``fullgraph=True`` so a graph break is an error rather than a silent slowdown; ``mode=None``
    since torch.compile modes are Inductor's; on CPU HF only auto-compiles when told to.
    """
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=True, backend=backend, mode=None, options=dict(options) if options else None)
    cc._compile_all_devices = True
    return cc


def encode_prompt(tokenizer, prompt: str, *, chat: bool) -> torch.Tensor:
    """Token ids ``[1, S]`` of ``prompt``, wrapped in the tokenizer's chat template when ``chat``."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat=True but this tokenizer has no chat template; drop --chat")
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


class TextPrinter:
    """A generate streamer that prints the new text as it comes (HF calls ``put`` with the prompt
    first, then with each new token, then ``end``) and counts the new tokens."""

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True, file=None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.file = file
        self.new_tokens = 0
        self._seen_prompt = False
        self._ids: list[int] = []
        self._printed = 0

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        ids = value.reshape(-1).tolist()
        self.new_tokens += len(ids)
        self._ids.extend(ids)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        # hold back a partial UTF-8 sequence (it decodes as U+FFFD) until its last byte arrives
        if not text.endswith("\ufffd"):
            print(text[self._printed :], end="", flush=True, file=self.file)
            self._printed = len(text)

    def end(self) -> None:
        if self._printed:
            print(flush=True, file=self.file)
