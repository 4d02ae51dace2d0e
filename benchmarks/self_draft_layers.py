"""A self draft that skips decoder layers: how often it still agrees with the target, per layer skipped.

    python -m benchmarks.self_draft_layers [--tokens 512] [--max-skip 4] [--out DIR]

The target is the lossless 8-bit model of the bench's ``csd-int8-self`` row (fp32 activations, 8-bit
weights and LM head), the draft its 4-bit self draft (``make_self_draft(bits=4)``, as the engine
builds it). Skipping layers would cut the draft's cost in proportion (a layer is 1/L of the weights
it streams and of its fixed per-step cost), so it pays only if acceptance holds up. This measures
the acceptance side directly, with teacher forcing (no compile, eager): over ``--tokens`` tokens of
each shipped text (the Britannica article, HumanEval's prompts), the share of positions where the
draft's greedy next token equals the target's. Rows: the 4-bit draft with every layer; each single
layer skipped (which layers matter least), and the best 1..``--max-skip`` layers skipped together
(chosen by their single-skip agreement, averaged over both texts).

With a per-token agreement a and K drafts, a greedy draft-verify step yields about
(1 - a^(K+1)) / (1 - a) tokens per target forward, so a few points of agreement cost more than a
layer's 1/L of draft cost saves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.self_draft_layers", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="tokens of each text (teacher forced), 16..4096")
    ap.add_argument("--max-skip", type=int, default=4, help="layers skipped together at most, 1..8")
    ap.add_argument("--out", default=None, help="folder for self_draft_layers.json (default: print only)")
    a = ap.parse_args(argv)
    if not 16 <= a.tokens <= 4096:
        ap.error(f"--tokens must be in 16..4096, got {a.tokens}")
    if not 1 <= a.max_skip <= 8:
        ap.error(f"--max-skip must be in 1..8, got {a.max_skip}")

    from csd_compile import load_model
    from csd_compile.quant.eval import britannica_text, humaneval_text
    from csd_compile.speculative.drafts import make_self_draft

    model, tok = load_model("smollm2-135m-instruct", dtype="fp32")
    target = make_self_draft(model, bits=8, quantize_lm_head=True)  # the compiled target's weights, eager
    draft = make_self_draft(model, bits=4)
    layers = draft.model.layers  # the draft's own (shallow) copies: changing them leaves the target alone
    texts = {"britannica": britannica_text(), "humaneval": humaneval_text()}
    ids = {name: tok(text, return_tensors="pt").input_ids[:, : a.tokens] for name, text in texts.items()}

    def greedy(m) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: m(x).logits[0].argmax(-1) for name, x in ids.items()}

    reference = greedy(target)

    def agreement(skip: set[int]) -> dict[str, float]:
        try:
            for i in skip:  # the residual stream passes the layer unchanged (an instance attribute)
                layers[i].forward = lambda hidden_states, *args, **kwargs: hidden_states
            out = greedy(draft)
        finally:
            for i in skip:  # the class's forward again
                layers[i].__dict__.pop("forward", None)
        return {name: (out[name] == reference[name]).float().mean().item() for name in out}

    def mean(row: dict[str, float]) -> float:
        return sum(row.values()) / len(row)

    result = {"tokens": {name: x.shape[1] for name, x in ids.items()}, "layers": len(layers),
              "threads": torch.get_num_threads(), "every_layer": agreement(set()), "single": {}, "best_together": {}}
    print(f"4-bit draft, every layer: " + ", ".join(f"{k} {v:.1%}" for k, v in result["every_layer"].items()),
          flush=True)
    for i in range(len(layers)):
        result["single"][i] = agreement({i})
    order = sorted(result["single"], key=lambda i: mean(result["single"][i]), reverse=True)
    print("one layer skipped, best five: " + ", ".join(f"{i}: {mean(result['single'][i]):.1%}" for i in order[:5]),
          flush=True)
    for n in range(1, a.max_skip + 1):
        skip = sorted(order[:n])
        row = agreement(set(skip))
        result["best_together"][n] = {"layers": skip, "agreement": row}
        print(f"{n} skipped {skip}: " + ", ".join(f"{k} {v:.1%}" for k, v in row.items()), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "self_draft_layers.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
