"""Small GGUF files written with the gguf package's own writer, for the loader and ``bits="auto"``
tests: random but valid blocks of any GGML type, and a tiny llama model transformers can load."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

T = GGMLQuantizationType
# byte offsets of each block's fp16 scale fields (the rest of a block is codes: any bytes are valid)
_HALVES = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.Q4_K: (0, 2),
           T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_blocks(rng: np.random.Generator, qtype: GGMLQuantizationType, n: int, k: int) -> np.ndarray:
    """Raw blocks uint8 [n, bytes per row] of ``qtype``: random codes, random finite fp16 scales
    of either sign (GGUF Q4_0 writes negative ones)."""
    per, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // per, nbytes), dtype=np.uint8)
    for off in _HALVES[qtype]:
        d = rng.uniform(1e-3, 0.05, (n, k // per)) * rng.choice([-1.0, 1.0], (n, k // per))
        raw[..., off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(n, k // per, 2)
    return raw.reshape(n, -1)


def _byte_tokens() -> list[str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):  # GPT-2's byte-level alphabet: printable bytes as themselves, others moved past 255
        chars[b] = chr(b) if b in keep else chr(256 + extra)
        extra += b not in keep
    return [chars[b] for b in range(256)]


def add_tensor(w: GGUFWriter, rng: np.random.Generator, name: str, n: int, k: int, qtype) -> None:
    if qtype == T.F32:
        w.add_tensor(name, rng.normal(0, 0.05, (n, k)).astype(np.float32))
    elif qtype == T.F16:
        w.add_tensor(name, rng.normal(0, 0.05, (n, k)).astype(np.float16))
    else:
        w.add_tensor(name, random_blocks(rng, qtype, n, k), raw_dtype=qtype)


def write_tiny_llama(path, types: dict | None = None, *, tied: bool = True, arch: str = "llama", seed: int = 0,
                     hidden: int = 64, ffn: int = 256, layers: int = 2, heads: int = 4, kv_heads: int = 2) -> None:
    """A tiny llama-architecture GGUF model at ``path``. ``types``: GGML type per tensor kind
    (``"attn_q"``, ..., ``"ffn_down"``, ``"token_embd"``, ``"output"``), or per kind and layer
    (``"ffn_down.1"``); default Q8_0. ``tied``: no ``output.weight`` (the head is the embedding)."""
    types = types or {}
    rng = np.random.default_rng(seed)
    tokens = _byte_tokens() + ["Ġt", "he"]
    w = GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    hd = hidden // heads
    add_tensor(w, rng, "token_embd.weight", len(tokens), hidden, types.get("token_embd", T.Q8_0))
    if not tied:
        add_tensor(w, rng, "output.weight", len(tokens), hidden, types.get("output", T.Q8_0))
    w.add_tensor("output_norm.weight", (1 + rng.normal(0, 0.1, hidden)).astype(np.float32))
    shapes = {"attn_q": (heads * hd, hidden), "attn_k": (kv_heads * hd, hidden), "attn_v": (kv_heads * hd, hidden),
              "attn_output": (hidden, heads * hd), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + rng.normal(0, 0.1, hidden)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + rng.normal(0, 0.1, hidden)).astype(np.float32))
        for kind, (n, k) in shapes.items():
            add_tensor(w, rng, f"blk.{i}.{kind}.weight", n, k, types.get(f"{kind}.{i}", types.get(kind, T.Q8_0)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
