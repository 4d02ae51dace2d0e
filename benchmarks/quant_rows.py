"""FlexQuant benchmark rows: decode speed per rung and perplexity per rung on the embedded model.

Each ``row_*`` has the signature ``row(model, tokenizer, prompts, max_new_tokens) -> dict`` with at
least ``tok_s`` (median over prompts of new tokens / second, greedy, batch 1) and ``texts``. The
model passed in is never modified: quantized rows work on a deep copy. ``perplexity_table`` gives
the quality ladder (nested rung vs direct RTN at the same group size) on shipped text.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from csd_compile.quant import fake_quantize, quantize_, rtn_fake_quantize, set_bits
from csd_compile.quant.eval import britannica_text, humaneval_text, perplexity
from csd_compile.quant.linear import lm_head_of

__all__ = [
    "perplexity_table",
    "row_bf16_eager",
    "row_nested_b2",
    "row_nested_b3",
    "row_nested_b4",
    "row_nested_b8",
    "row_csd_compiled_b4",
    "row_csd_compiled_b8",
    "row_inductor_bf16",
]


@torch.no_grad()
def _decode_rows(model, tokenizer, prompts, max_new_tokens, **gen_kwargs) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rates, texts = [], []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, **gen_kwargs)
        elapsed = time.perf_counter() - start
        new = out.shape[1] - ids.shape[1]
        rates.append(new / elapsed)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return {"tok_s": statistics.median(rates), "texts": texts}


def row_bf16_eager(model, tokenizer, prompts, max_new_tokens) -> dict:
    """HF greedy, bf16, eager, unquantized (the reference row)."""
    return _decode_rows(model.to(torch.bfloat16), tokenizer, prompts, max_new_tokens) | {"bits": 16}


def _nested_row(bits):
    def row(model, tokenizer, prompts, max_new_tokens) -> dict:
        q = quantize_(copy.deepcopy(model).to(torch.bfloat16), bits=8, group_size=64)
        set_bits(q, bits)  # one stored copy, rung chosen at run time
        return _decode_rows(q, tokenizer, prompts, max_new_tokens) | {"bits": bits}

    row.__doc__ = f"HF greedy, bf16 activations, eager quantize_ (nested g64), running the {bits}-bit rung."
    return row


row_nested_b8 = _nested_row(8)
row_nested_b4 = _nested_row(4)
row_nested_b3 = _nested_row(3)
row_nested_b2 = _nested_row(2)


def _compiled_row(bits):
    def row(model, tokenizer, prompts, max_new_tokens) -> dict:
        from csd_compile.models.hf_generate import compile_config

        m = copy.deepcopy(model).to(torch.bfloat16)
        cc = compile_config({"bits": bits, "group_size": 64}, backend="csd")
        kw = dict(cache_implementation="static", max_cache_len=256, compile_config=cc)
        _decode_rows(m, tokenizer, prompts[:1], max_new_tokens, **kw)  # compile (warm-up)
        return _decode_rows(m, tokenizer, prompts, max_new_tokens, **kw) | {"bits": bits}

    row.__doc__ = f"HF greedy, static cache, decode step compiled by backend='csd' with bits={bits}."
    return row


def row_inductor_bf16(model, tokenizer, prompts, max_new_tokens) -> dict:
    """HF greedy, static cache, decode step compiled by plain Inductor, bf16 (unquantized)."""
    from csd_compile.models.hf_generate import compile_config

    m = copy.deepcopy(model).to(torch.bfloat16)
    kw = dict(cache_implementation="static", max_cache_len=256, compile_config=compile_config(None, backend="inductor"))
    _decode_rows(m, tokenizer, prompts[:1], max_new_tokens, **kw)
    return _decode_rows(m, tokenizer, prompts, max_new_tokens, **kw) | {"bits": 16}


row_csd_compiled_b8 = _compiled_row(8)
row_csd_compiled_b4 = _compiled_row(4)


@torch.no_grad()
def perplexity_table(model, tokenizer, *, bits=(8, 4, 3, 2), group_size=64, max_tokens=4096, window=512) -> list[dict]:
    """Perplexity of the full model and of each rung (nested vs direct RTN), Britannica + HumanEval.

    Weights are fake-quantized (quantize + dequantize) on a copy, LM head kept full precision,
    so the numbers isolate the weight format from the kernels.
    """
    texts = {"britannica": britannica_text(), "humaneval": humaneval_text()}

    def ppl(m):
        return {name: perplexity(m, tokenizer, t, window=window, max_tokens=max_tokens) for name, t in texts.items()}

    rows = [{"method": "full", "bits": 16, **ppl(model)}]
    head = lm_head_of(model)
    for b in bits:
        for method, fq in (("nested", fake_quantize), ("rtn", rtn_fake_quantize)):
            m = copy.deepcopy(model)
            m_head = lm_head_of(m)
            for mod in m.modules():
                if isinstance(mod, torch.nn.Linear) and mod is not m_head:
                    mod.weight.copy_(fq(mod.weight.float(), b, group_size).to(mod.weight.dtype))
            rows.append({"method": method, "bits": b, **ppl(m)})
            del m
    del head
    return rows


if __name__ == "__main__":  # python -m benchmarks.quant_rows
    import sys

    from csd_compile import load_model

    model, tok = load_model("smollm2-135m-instruct", dtype="bf16")
    if "ppl" in sys.argv[1:]:  # python -m benchmarks.quant_rows ppl [--group-size 32|64|128]
        group = int(sys.argv[sys.argv.index("--group-size") + 1]) if "--group-size" in sys.argv else 64
        for r in perplexity_table(model, tok, group_size=group, max_tokens=1024):
            print(r, flush=True)
    else:
        prompts = ["The history of the printing press", "def fibonacci(n):", "Explain photosynthesis simply."]
        names = [a for a in sys.argv[1:] if a.startswith("row_")] or [
            "row_bf16_eager", "row_nested_b8", "row_nested_b4", "row_nested_b3", "row_nested_b2"]
        for name in names:
            r = globals()[name](model, tok, prompts, 64)
            print(name, round(r["tok_s"], 2), repr(r["texts"][0][:60]), flush=True)
