"""Speculative decoding benchmark rows: csd-lossless with each draft against HF's own modes.

Each ``row_*`` has the signature ``row(model, tokenizer, prompts, max_new_tokens) -> dict`` with
``tok_s`` (median over prompts of new tokens / second, greedy, batch 1), ``texts``,
``mean_accepted`` and ``tokens_per_target_forward`` (medians; ``None`` where a mode has no drafts).
Compiled rows warm up (compile) on the first prompt, outside the timing. The model passed in is
never modified. There is one real model here, so the "separate draft model" is an independent
4-bit copy of the target (``quantize_`` on a deep copy: its own module, its own weights).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from csd_compile.speculative import generate

__all__ = [
    "row_hf_greedy",
    "row_hf_prompt_lookup",
    "row_hf_assisted_q4",
    "row_csd_ngram",
    "row_csd_self",
    "row_csd_draft_q4",
]


def _ids(tokenizer, prompt: str) -> torch.Tensor:
    from csd_compile.models.hf_generate import encode_prompt

    return encode_prompt(tokenizer, prompt, chat=getattr(tokenizer, "chat_template", None) is not None)


def _summary(rates, texts, accepted=None, per_forward=None) -> dict:
    med = (lambda xs: statistics.median(xs) if xs else None)
    return {"tok_s": med(rates), "texts": texts, "mean_accepted": med(accepted or []),
            "tokens_per_target_forward": med(per_forward or [])}


@torch.no_grad()
def _hf_rows(model, tokenizer, prompts, max_new_tokens, **kw) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rates, texts = [], []
    for prompt in prompts:
        ids = _ids(tokenizer, prompt)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, **kw)
        rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return _summary(rates, texts)


def _csd_rows(model, tokenizer, prompts, max_new_tokens, **kw) -> dict:
    generate(model, _ids(tokenizer, prompts[0]), max_new_tokens=max_new_tokens, **kw)  # compile
    rates, texts, acc, per = [], [], [], []
    for prompt in prompts:
        ids = _ids(tokenizer, prompt)
        out, st = generate(model, ids, max_new_tokens=max_new_tokens, return_stats=True, **kw)
        rates.append(st["tok_per_s"])
        acc.append(st["mean_accepted"])
        per.append(st["tokens_per_target_forward"])
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return _summary(rates, texts, acc, per)


def _q4_copy(model):
    from csd_compile.quant import quantize_

    return quantize_(copy.deepcopy(model), bits=4, group_size=64)


def row_hf_greedy(model, tokenizer, prompts, max_new_tokens) -> dict:
    """Plain HF greedy, bf16, eager (the reference)."""
    return _hf_rows(model.to(torch.bfloat16), tokenizer, prompts, max_new_tokens)


def row_hf_prompt_lookup(model, tokenizer, prompts, max_new_tokens) -> dict:
    """HF prompt lookup decoding (10 tokens), bf16."""
    return _hf_rows(model.to(torch.bfloat16), tokenizer, prompts, max_new_tokens, prompt_lookup_num_tokens=10)


def row_hf_assisted_q4(model, tokenizer, prompts, max_new_tokens) -> dict:
    """HF assisted generation with the 4-bit copy as assistant (the same draft as ``row_csd_draft_q4``)."""
    m = model.to(torch.bfloat16)
    return _hf_rows(m, tokenizer, prompts, max_new_tokens, assistant_model=_q4_copy(m))


def row_csd_ngram(model, tokenizer, prompts, max_new_tokens) -> dict:
    """csd-lossless, prompt lookup draft (K=8), step compiled with backend='csd'."""
    return _csd_rows(model.to(torch.bfloat16), tokenizer, prompts, max_new_tokens, draft="ngram")


def row_csd_self(model, tokenizer, prompts, max_new_tokens) -> dict:
    """csd-lossless, self draft (the target's linears as 4-bit QLinear, weights shared), K=4."""
    return _csd_rows(model.to(torch.bfloat16), tokenizer, prompts, max_new_tokens, draft="self")


def row_csd_draft_q4(model, tokenizer, prompts, max_new_tokens) -> dict:
    """csd-lossless with a separate draft model (an independent 4-bit copy of the target), K=4."""
    m = model.to(torch.bfloat16)
    return _csd_rows(m, tokenizer, prompts, max_new_tokens, draft=_q4_copy(m))


if __name__ == "__main__":  # python -m benchmarks.spec_rows [n_prompts] [max_new_tokens] [rows...]
    import json
    import sys

    from csd_compile import load_model

    from csd_compile.bench.prompts import load_prompts

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    new = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    names = sys.argv[3:] or __all__
    model, tok = load_model("smollm2-135m-instruct", dtype="bf16")
    prompts = [p if isinstance(p, str) else p[-1] for p in load_prompts(n)]
    res = {}
    for name in names:
        t0 = time.perf_counter()
        res[name] = globals()[name](model, tok, prompts, new)
        r = res[name]
        print(json.dumps({"row": name, "tok_s": r["tok_s"], "mean_accepted": r["mean_accepted"],
                          "tokens_per_target_forward": r["tokens_per_target_forward"],
                          "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
    base = res.get("row_hf_greedy")
    if base:
        for name, r in res.items():
            same = sum(a == b for a, b in zip(r["texts"], base["texts"]))
            print(f"{name}: {r['tok_s'] / base['tok_s']:.2f}x hf greedy, texts identical {same}/{len(base['texts'])}")
