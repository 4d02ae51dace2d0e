"""The ``csd-compile`` command line: ``generate``, ``bench`` (and later ``calibrate``).

Every argument is checked before the model is loaded, and a bad one exits with status 2 and a
message naming the value and what is allowed, like argparse does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]

DTYPES = ("bf16", "fp32")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as dynamic or a path
    return key, value


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="csd-compile", description="Fast LLM inference through torch.compile(backend='csd')."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt, streamed as it comes")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded model name or local path (default {DEFAULT_MODEL})")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=128, help="new tokens at most (default 128)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--dtype", choices=DTYPES, default="bf16", help="weights/activations dtype (default bf16)")
    gen.add_argument("--no-compile", action="store_true", help="run eagerly, without torch.compile")
    gen.add_argument(
        "--option", "-o", type=_option, action="append", default=[], metavar="KEY=VALUE",
        help="a csd backend option, e.g. -o bits=4 (repeatable)",
    )

    bench = sub.add_parser("bench", help="time several systems side by side on shipped prompts")
    bench.add_argument("--model", default=DEFAULT_MODEL)
    bench.add_argument("--prompts", type=_positive_int, default=8, help="prompts in all, half MT-Bench, half HumanEval")
    bench.add_argument("--max-new-tokens", type=_positive_int, default=128)
    bench.add_argument("--systems", default=None, help="comma-separated system names (default: all available)")
    bench.add_argument("--out", default="bench_results", help="folder for results.json, results.md, results.png")
    bench.add_argument("--list", action="store_true", help="list the systems and exit")
    return parser


def _fail(parser: argparse.ArgumentParser, command: str, message: str) -> None:
    parser.exit(2, f"csd-compile {command}: error: {message}\n")


def _check_model_arg(parser, command: str, model: str) -> None:
    from .models import EMBEDDED_MODELS

    if not model:
        _fail(parser, command, "--model is empty")
    if model not in EMBEDDED_MODELS and not Path(model).expanduser().exists():
        _fail(parser, command, f"--model {model!r} is neither an embedded model {sorted(EMBEDDED_MODELS)} nor an existing path")


def cmd_generate(args, parser) -> int:
    from .config import CSDConfig, OptionError

    if not args.prompt.strip():
        _fail(parser, "generate", "--prompt is empty")
    _check_model_arg(parser, "generate", args.model)
    options = dict(args.option)
    try:
        CSDConfig.from_options(options)
    except OptionError as e:
        _fail(parser, "generate", str(e))

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from .models import load_model
    from .models.hf_generate import TextPrinter, compile_config, encode_prompt

    err = sys.stderr
    t0 = time.perf_counter()
    print(f"[csd-compile] loading {args.model} ({args.dtype})", file=err, flush=True)
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, verbose=True)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        _fail(parser, "generate", str(e))
    print(f"[csd-compile] loaded in {time.perf_counter() - t0:.1f}s", file=err, flush=True)
    try:
        input_ids = encode_prompt(tokenizer, args.prompt, chat=args.chat)
    except ValueError as e:
        _fail(parser, "generate", str(e))

    gen_kwargs = dict(
        do_sample=False,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        attention_mask=torch.ones_like(input_ids),
    )
    if not args.no_compile:
        gen_kwargs.update(cache_implementation="static", compile_config=compile_config(options))

    compile_s = 0.0
    with torch.inference_mode():
        if not args.no_compile:
            # Warm-up with the same prompt and max_new_tokens (so the same static cache shape),
            # stopped after a few tokens: it compiles the decode step once, outside the timing.
            print("[csd-compile] compiling the decode step with backend='csd' (cached after the first run)", file=err, flush=True)
            t0 = time.perf_counter()
            model.generate(input_ids, stopping_criteria=StoppingCriteriaList([_StopAfter(input_ids.shape[1] + 3)]), **gen_kwargs)
            compile_s = time.perf_counter() - t0
            print(f"[csd-compile] compiled in {compile_s:.1f}s; generating", file=err, flush=True)
        printer = TextPrinter(tokenizer)
        t0 = time.perf_counter()
        out = model.generate(input_ids, streamer=printer, **gen_kwargs)
        elapsed = time.perf_counter() - t0
    new = out.shape[1] - input_ids.shape[1]
    print(
        f"[csd-compile] prompt tokens {input_ids.shape[1]} | new tokens {new} | {new / elapsed:.1f} tok/s"
        f" | compile {compile_s:.1f} s | backend {'eager' if args.no_compile else 'csd'} {args.dtype}",
        file=err,
        flush=True,
    )
    return 0


class _StopAfter:
    """Stopping criterion: stop once the sequence reaches ``length`` tokens."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def cmd_bench(args, parser) -> int:
    harness = _load_bench_harness(parser)
    if args.list:
        for name, system in harness.SYSTEMS.items():
            print(f"{name:24s} {system.description}")
        return 0
    _check_model_arg(parser, "bench", args.model)
    systems = None
    if args.systems:
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in systems if s not in harness.SYSTEMS]
        if unknown or not systems:
            _fail(parser, "bench", f"unknown system(s) {unknown}; choose from {list(harness.SYSTEMS)}")
    harness.run(
        model_name=args.model,
        num_prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        systems=systems,
        out_dir=Path(args.out),
    )
    return 0


def _load_bench_harness(parser):
    """The harness lives in the source tree's ``benchmarks/`` folder, next to the package."""
    import importlib

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "harness.py").is_file():
        _fail(parser, "bench", f"the benchmarks/ folder was not found next to {Path(__file__).parent}; run from a source checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    harness = importlib.import_module("benchmarks.harness")
    importlib.import_module("benchmarks.systems")  # registers the systems
    return harness


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        return cmd_generate(args, parser)
    if args.command == "bench":
        return cmd_bench(args, parser)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
