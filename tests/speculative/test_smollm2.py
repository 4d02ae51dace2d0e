"""On the embedded real model: speculative greedy equals plain HF greedy token for token."""

import torch

from csd_compile.models.hf_generate import encode_prompt
from csd_compile.speculative import generate


def test_smollm2_ngram_and_hf_path_equal_hf_greedy(smollm2):
    model, tok = smollm2
    ids = encode_prompt(tok, "Write a Python function that returns the n-th Fibonacci number.", chat=True)
    ref = model.generate(ids, max_new_tokens=24, do_sample=False)
    out, stats = generate(model, ids, draft="ngram", max_new_tokens=24, compile_backend=None, return_stats=True)
    assert torch.equal(out, ref)
    assert stats["new_tokens"] == 24 and stats["steps"] <= 24
    out = model.generate(ids, custom_generate=generate, draft="ngram", max_new_tokens=24, compile_backend=None)
    assert torch.equal(out, ref)
