"""Plumbing for Hugging Face ``generate`` with the csd backend: prompts, compile config, streaming."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["CHAT_TEMPLATES", "TextPrinter", "check_utf8", "compile_config", "encode_prompt", "resolve_chat_template"]

# Named templates for checkpoints that ship none (many GGUF files): Jinja, as transformers renders them.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "plain": (
        "{% for message in messages %}{% if message['role'] == 'user' %}User: {% elif message['role'] == 'assistant' %}"
        "Assistant: {% endif %}{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
}


def resolve_chat_template(name_or_path: str) -> str:
    """The Jinja text of a named template (:data:`CHAT_TEMPLATES`) or of a template file."""
    import os

    if name_or_path in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name_or_path]
    if not os.path.isfile(name_or_path):
        raise ValueError(f"chat template {name_or_path!r} is neither one of {sorted(CHAT_TEMPLATES)} nor a file")
    try:
        with open(name_or_path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"chat template file {name_or_path!r} cannot be read as UTF-8 text ({e})") from None
    if "{{" not in text and "{%" not in text:
        raise ValueError(f"chat template file {name_or_path!r} holds no Jinja template ({{{{ ... }}}} / {{% ... %}})")
    return text


def compile_config(options: Mapping[str, Any] | None = None, backend: str = "csd"):
    """A transformers ``CompileConfig`` that compiles the decode step with ``backend``.

    ``fullgraph=True`` so a graph break is an error rather than a silent slowdown; ``mode=None``
    since torch.compile modes are Inductor's; on CPU HF only auto-compiles when told to.
    """
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=True, backend=backend, mode=None, options=dict(options) if options else None)
    cc._compile_all_devices = True
    return cc


def check_utf8(text: str, what: str) -> None:
    """Raise ``ValueError`` when ``text`` holds characters that are not UTF-8 text: the lone
    surrogates Python makes of undecodable bytes (a command-line argument in another encoding)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        byte = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        raise ValueError(f"{what} is not valid UTF-8 text ({byte} at character {e.start}); "
                         "pass it UTF-8 encoded") from None


def encode_prompt(tokenizer, prompt: str, *, chat: bool, allow_special_tokens: bool = False) -> torch.Tensor:
    """Token ids ``[1, S]`` of ``prompt``, wrapped in the tokenizer's chat template when ``chat``.

    The user's text is tokenized as text: a special-token string typed into it (``<|im_start|>``,
    ``<|endoftext|>``, ...) stays those characters instead of becoming a control token, so prompt
    text cannot open a system turn or end the conversation. ``allow_special_tokens=True`` opts out
    (the text is then parsed as the tokenizer parses it, special tokens included).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    check_utf8(prompt, "prompt")
    if not chat:
        enc = tokenizer(prompt, return_tensors="pt", split_special_tokens=not allow_special_tokens)
        return enc["input_ids"]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat=True but this tokenizer has no chat template; drop --chat or give one with --chat-template chatml|plain|FILE")
    if allow_special_tokens:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"]
    # render the template around a marker, tokenize the template's parts as usual (its control
    # tokens are real) and the user's text with special tokens split into plain text
    marker = "\ue000csd-user-text\ue001"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                             tokenize=False)
    if rendered.count(marker) != 1:
        raise ValueError("this tokenizer's chat template does not place the user's text once; "
                         "pass allow_special_tokens=True (--allow-special-tokens)")
    before, after = rendered.split(marker)
    # cut the template at its control tokens nearest the text, so the plain text around the user's
    # (e.g. "user\n") is tokenized together with it, as in the template's own tokenization
    added = [t for t in tokenizer.get_added_vocab() if t]
    cut = max((before.rfind(t) + len(t) for t in added if t in before), default=0)
    end = min((after.find(t) for t in added if t in after), default=len(after))

    def ids(text: str, split: bool) -> list[int]:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"] if text else []

    middle = before[cut:] + prompt + after[:end]
    return torch.tensor([ids(before[:cut], False) + ids(middle, True) + ids(after[end:], False)], dtype=torch.int64)


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
