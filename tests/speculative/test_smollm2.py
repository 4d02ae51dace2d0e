"""On the embedded real model: speculative greedy equals plain HF greedy token for token.

In fp32: a bf16 GEMM may round a row differently when it is computed among the K + 1 rows of a
verify pass than alone, depending on the CPU's kernels (on a Sapphire Rapids CPU the bf16 texts part
at the 24th token), so bit-identical output is a property of fp32 activations (README).
"""

import torch

from csd_compile import load_model
from csd_compile.models.hf_generate import encode_prompt
from csd_compile.speculative import generate


def test_smollm2_ngram_and_hf_path_equal_hf_greedy():
    model, tok = load_model("smollm2-135m-instruct", dtype="fp32")
    ids = encode_prompt(tok, "Write a Python function that returns the n-th Fibonacci number.", chat=True)
    ref = model.generate(ids, max_new_tokens=24, do_sample=False)
    out, stats = generate(model, ids, draft="ngram", max_new_tokens=24, compile_backend=None, return_stats=True)
    assert torch.equal(out, ref)
    assert stats["new_tokens"] == 24 and stats["steps"] <= 24
    out = model.generate(ids, custom_generate=generate, draft="ngram", max_new_tokens=24, compile_backend=None)
    assert torch.equal(out, ref)
