"""Cold compile time of the decode step, per model family (and layer count), and decode speed after it.

    python -m benchmarks.compile_time [--families llama,qwen2,...,smollm2] [--layers 2] [--bits 4]
                                      [--group-size 32] [--mode whole|layers] [--new-tokens 32] [--out FILE.md]

Each case runs in its own Python process with an empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR``
set to a new temporary folder; the C++ kernel's extension cache is kept, it is built once per
machine, not per model). There, HF ``generate`` with a static cache compiles the decode step with
``backend="csd"`` (``csd_compile.models.hf_generate.compile_config``) on a 16-token prompt: the
first call of ``--new-tokens`` tokens compiles and decodes, three more only decode, timed with the
bench's timing (``csd_compile.bench.timing``); the compile time is the first call's time less the
median of the others, tok/s their median (prefill included, greedy). Cases run in separate
processes, one after the other, so their tok/s are not an interleaved comparison: compare decode
speed with ``csd-compile bench`` rows.

Families: the tiny random models of ``tests/test_architectures.py`` (hidden 64, vocab 128, fp32;
``--layers`` sets their depth) and ``smollm2`` (the embedded SmolLM2-135M-Instruct, 30 layers, bf16).

``--mode`` (regional compilation against the default ``whole``, the step as one graph):
``layers`` compiles each decoder layer module on its own (``layer.compile(...)``) and runs the rest
of the step eagerly (HF layers differ in a constant ``layer_idx``, so Dynamo compiles each layer
anew and stops at its recompile limit: a measurement, not a usable mode); ``nested`` makes the decoder layer's ``forward`` one
``torch.compiler.nested_compile_region`` (``csd_compile.models.regions.mark_decoder_regions``), so
the whole step is one graph in which the layer is traced and compiled once and invoked per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

MODES = ("whole", "layers", "nested")
WARM_CALLS = 3
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "smollm2")


def _model(family: str, layers: int):
    import torch

    if family == "smollm2":
        import csd_compile

        model, _ = csd_compile.load_model("smollm2-135m-instruct", dtype="bf16")
        return model, model.config.vocab_size
    from tests.test_architectures import _model as tiny

    return tiny(family, layers=layers), 128


def _decoder_layers(model):
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    return max(lists, key=len)


def run_one(family: str, layers: int, bits: int | None, group_size: int, mode: str, new_tokens: int,
            threads: int | None = None) -> dict:
    """Measure one case in this process (the caller gives it a fresh Inductor cache)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from csd_compile.models.hf_generate import compile_config

    torch.manual_seed(0)
    model, vocab = _model(family, layers)
    options = {} if bits is None else {"bits": bits, "group_size": group_size}
    ids = torch.randint(1, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    if mode == "layers":
        for layer in _decoder_layers(model):
            layer.compile(backend="csd", options=options, fullgraph=True)
    else:
        kwargs["compile_config"] = compile_config(options)
    if mode == "nested":  # the decoder layer as one region: traced and compiled once, called per layer
        from csd_compile.models.regions import mark_decoder_regions

        mark_decoder_regions(model)
    torch._dynamo.reset()
    from csd_compile.bench.timing import measure, timed_call

    def run(x):
        return {"ids": model.generate(x, **kwargs)}

    first = timed_call(run, ids)[1]  # the cold compile happens here
    warm = measure({"run": run}, [ids] * WARM_CALLS, warmup=False, progress=None)  # the bench's timing
    median_s = statistics.median(r["seconds"] for r in warm.records["run"])
    return {"family": family, "layers": len(_decoder_layers(model)), "bits": bits, "group_size": group_size,
            "mode": mode, "threads": torch.get_num_threads(), "compile_s": round(first - median_s, 2),
            "tok_s": round(warm.median_tok_s("run"), 1), "first_call_s": round(first, 2)}


def _measure(family: str, layers: int, mode: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="csd-inductor-cold-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        bits = "none" if args.bits is None else str(args.bits)
        cmd = [sys.executable, "-m", "benchmarks.compile_time", "--one", family, "--layers", str(layers),
               "--bits", bits, "--group-size", str(args.group_size), "--mode", mode,
               "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{family} x{layers} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    """The Markdown table of ``rows``."""
    out = ["| family | layers | bits | mode | cold compile s | decode tok/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        bits = "none" if r["bits"] is None else f"{r['bits']} (g{r['group_size']})"
        out.append(f"| {r['family']} | {r['layers']} | {bits} | {r['mode']} | {r['compile_s']:.1f} | {r['tok_s']:.1f} |")
    return "\n".join(out)


def _bits(text: str) -> int | None:
    if text == "none":
        return None
    if text not in ("2", "3", "4", "8"):
        raise argparse.ArgumentTypeError(f"--bits {text!r}: choose none, 2, 3, 4 or 8")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {','.join(FAMILIES)}")
    p.add_argument("--layers", default="2", help="comma-separated decoder layer counts of the tiny models")
    p.add_argument("--bits", type=_bits, default=4, help="none, 2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=32)
    p.add_argument("--mode", default="whole", help="comma-separated, from whole,layers,nested (interleaved)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: PyTorch's own choice)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", help="also write the table (Markdown) and rows (JSON next to it) here")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error(f"--new-tokens {args.new_tokens} must be >= 2")
    try:
        layer_counts = [int(v) for v in args.layers.split(",")]
    except ValueError:
        p.error(f"--layers {args.layers!r} must be comma-separated integers")
    if any(n < 1 for n in layer_counts):
        p.error(f"--layers {args.layers!r}: every count must be >= 1")
    modes = [m for m in args.mode.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--mode {args.mode!r}: choose from {list(MODES)}")
    if args.one:
        print(json.dumps(run_one(args.one, layer_counts[0], args.bits, args.group_size, modes[0], args.new_tokens,
                                 args.threads)))
        return
    families = [f for f in args.families.split(",") if f]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        p.error(f"--families: unknown {bad}; choose from {list(FAMILIES)}")
    rows = []
    for family in families:
        for n in ([30] if family == "smollm2" else layer_counts):
            for mode in modes:
                rows.append(_measure(family, n, mode, args))
                print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"`python -m benchmarks.compile_time {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                    + text + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
