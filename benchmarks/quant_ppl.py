"""FlexQuant's weight-format quality: perplexity per rung on the embedded model (no timing).

``perplexity_table`` gives the quality ladder (nested rung vs direct RTN at the same group size) on
shipped text. The speed of each rung is a ``csd-compile bench`` row (``qlinear-eager-b8`` ...
``-b2`` eager, ``csd-int8`` ... ``csd-int2`` compiled), timed like every other row.

    python -m benchmarks.quant_ppl [--group-size 32|64|128]
"""

from __future__ import annotations

import copy

import torch

from csd_compile.quant import fake_quantize, rtn_fake_quantize
from csd_compile.quant.eval import britannica_text, humaneval_text, perplexity
from csd_compile.quant.linear import lm_head_of

__all__ = ["perplexity_table"]


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


if __name__ == "__main__":
    import argparse

    from csd_compile import load_model

    ap = argparse.ArgumentParser(prog="python -m benchmarks.quant_ppl", description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    ap.add_argument("--max-tokens", type=int, default=1024, help="tokens scored per text")
    a = ap.parse_args()
    model, tok = load_model("smollm2-135m-instruct", dtype="bf16")
    for r in perplexity_table(model, tok, group_size=a.group_size, max_tokens=a.max_tokens):
        print(r, flush=True)
