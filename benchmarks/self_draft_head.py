"""The self draft's LM head, dense or quantized: acceptance and speed, side by side in one run.

    python -m benchmarks.self_draft_head [--prompts 4] [--max-new-tokens 96] [--out DIR]

Two copies of the embedded model as the lossless 8-bit target of the bench's ``csd-int8-self`` row
(fp32 activations, 8-bit weights and LM head, ``backend="csd"``), each decoding with the ``"self"``
draft at 4 bits: one whose draft keeps the LM head module as it is (dense fp32; the default), one
whose draft reads a 4-bit view of it, group 64 (``make_self_draft(..., quantize_lm_head=True)``). Plain decoding of the same target is the reference
row. Timed with the bench's timing (``csd_compile.bench.timing``); every output is checked against
the plain decoding (the draft changes speed, never tokens).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.self_draft_head", description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", default=None, help="folder for self_draft_head.json (default: print only)")
    a = ap.parse_args(argv)
    if a.prompts < 1 or a.max_new_tokens < 1:
        ap.error("--prompts and --max-new-tokens must be >= 1")

    import importlib

    import csd_compile
    from csd_compile import load_model
    from csd_compile.bench.timing import measure
    from csd_compile.data import load_prompts
    from csd_compile.models.greedy import GreedyDecoder
    from csd_compile.models.hf_generate import encode_prompt

    engine = importlib.import_module("csd_compile.speculative.generate")  # the module, not the function
    options = {"bits": 8, "quantize_lm_head": True}
    _, tok = load_model("smollm2-135m-instruct", dtype="fp32")
    inputs = [encode_prompt(tok, text, chat=True) for _, text in load_prompts(a.prompts)]
    cache_len = 256 * -(-(max(x.shape[1] for x in inputs) + a.max_new_tokens + 16) // 256)

    def speculative(head_quantized: bool):
        model, _ = load_model("smollm2-135m-instruct", dtype="fp32")
        original = engine.make_self_draft
        engine.make_self_draft = functools.partial(original, quantize_lm_head=head_quantized)
        try:  # the engine (and so its draft) is built on the first call, here
            csd_compile.generate(model, inputs[0], draft="self", draft_bits=4, max_new_tokens=4,
                                 compile_options=options, max_cache_len=cache_len)
        finally:
            engine.make_self_draft = original

        def run(ids):
            out, st = csd_compile.generate(model, ids, draft="self", draft_bits=4, max_new_tokens=a.max_new_tokens,
                                           compile_options=options, max_cache_len=cache_len, return_stats=True)
            return {"ids": out, "mean_accepted": st["mean_accepted"]}

        return run

    plain_model, _ = load_model("smollm2-135m-instruct", dtype="fp32")
    plain = GreedyDecoder(plain_model, backend="csd", options=options)
    runners = {
        "plain": lambda ids: {"ids": plain(ids, max_new_tokens=a.max_new_tokens)},
        "self-dense-head": speculative(False),
        "self-4bit-head": speculative(True),
    }
    m = measure(runners, inputs, progress="self_draft_head")
    ref = [r["output"]["ids"].tolist() for r in m.records["plain"]]
    result = {"prompts": a.prompts, "max_new_tokens": a.max_new_tokens, "threads": torch.get_num_threads(), "rows": {}}
    for name, recs in m.records.items():
        acc = [r["output"]["mean_accepted"] for r in recs if "mean_accepted" in r["output"]]
        result["rows"][name] = {
            "median_tok_s": m.median_tok_s(name), "vs_plain": m.ratio(name, "plain"),
            "identical_to_plain": sum(r["output"]["ids"].tolist() == x for r, x in zip(recs, ref)),
            "mean_accepted": sum(acc) / len(acc) if acc else None,
        }
    for name, row in result["rows"].items():
        acc = "-" if row["mean_accepted"] is None else f"{row['mean_accepted']:.2f}"
        print(f"{name}: {row['median_tok_s']:.1f} tok/s, {row['vs_plain']:.2f}x plain, accepted/step {acc}, "
              f"identical {row['identical_to_plain']}/{a.prompts}", flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "self_draft_head.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
