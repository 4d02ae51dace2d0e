"""The ``csd-compile`` command line: ``generate``, ``calibrate``, ``bench`` and ``profile``.

Every argument is checked before the model is loaded, and a bad one exits with status 2 and a
message naming the value and what is allowed, like argparse does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]

DTYPES = ("bf16", "fp32")
MAX_DRAFT_TOKENS = 64  # the engine's bound (speculative.engine_args.MAX_DRAFT_TOKENS), checked before any import


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _lambda(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or inf, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 or inf, got {text!r}")
    return value


# acceptance settings are generate's (--acceptance/--tau/--lambda), not backend options


def _draft_tokens(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_DRAFT_TOKENS:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_DRAFT_TOKENS}, got {value}")
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
    gen.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                     help="chat template to use (implies --chat): 'chatml', 'plain', or a Jinja template file; "
                          "for checkpoints that ship none or to replace theirs")
    gen.add_argument("--allow-special-tokens", action="store_true",
                     help="parse special-token strings typed in the prompt (e.g. <|im_start|>) as control tokens; "
                          "by default they stay text, so a prompt cannot inject a turn")
    gen.add_argument("--dtype", choices=DTYPES, default="bf16", help="weights/activations dtype (default bf16)")
    gen.add_argument("--no-compile", action="store_true", help="run eagerly, without torch.compile")
    gen.add_argument(
        "--draft", choices=("none", "self", "ngram"), default="none",
        help="speculative draft: none (plain decoding, default), the model itself at low bits (self), or prompt lookup (ngram)",
    )
    gen.add_argument("--num-draft-tokens", type=_draft_tokens, default=None,
                     help=f"drafts per step, 1..{MAX_DRAFT_TOKENS} (default: the engine's)")
    gen.add_argument("--draft-bits", type=int, choices=(2, 3, 4, 8), default=4, help="bits of the self draft (default 4)")
    gen.add_argument(
        "--acceptance", choices=("exact", "csd"), default="exact",
        help="exact (lossless) or csd (calibrated rescue through the correction memory)",
    )
    gen.add_argument("--memory", default=None,
                     help="with --acceptance csd: a seeded correction-memory file from `csd-compile calibrate --ocm` "
                          "(default: the memory starts empty and learns online)")
    gen.add_argument("--tau", type=float, default=None,
                     help="with --acceptance csd: admit draft x iff p(x)/p(t*) >= tau (default 0.3; the paper's: 0.01)")
    gen.add_argument("--lambda", dest="lam", type=_lambda, default=None,
                     help="with --acceptance csd: rescue a pair once rejected more than this often (default 6; inf: never)")
    gen.add_argument(
        "--option", "-o", type=_option, action="append", default=[], metavar="KEY=VALUE",
        help="a csd backend option, e.g. -o bits=4 (repeatable)",
    )
    gen.add_argument("--tp", action="store_true",
                     help="tensor parallel over the ranks of a torchrun launch "
                          "(torchrun --nproc-per-node N -m csd_compile generate --tp ...); rank 0 prints")
    gen.add_argument("--tp-backend", choices=("auto", "gloo", "nccl"), default="auto",
                     help="with --tp: the torch.distributed backend (default auto: NCCL with CUDA, else gloo)")

    cal = sub.add_parser("calibrate", help="offline calibration: FlexQuant sensitivity table, or the CSD correction memory")
    cal.add_argument("--model", default=DEFAULT_MODEL)
    cal.add_argument("--data", default=None,
                     help="calibration text: 'britannica' (shipped, the default) or a UTF-8 text file path")
    cal.add_argument("--out", required=True, help="output file (precision table JSON, or memory file with --ocm)")
    cal.add_argument("--ocm", action="store_true", help="seed the Online Correction Memory from shipped prompts instead")
    cal.add_argument("--prompts", type=_positive_int, default=64, help="with --ocm: prompts to seed from (default 64)")
    cal.add_argument("--max-new-tokens", type=_positive_int, default=64, help="with --ocm: tokens generated per prompt")
    cal.add_argument("--draft-bits", type=int, choices=(2, 3, 4, 8), default=4,
                     help="with --ocm: bits of the self draft whose disagreements are counted (use the value "
                          "`generate --draft-bits` will use; default 4)")
    cal.add_argument("--dtype", choices=DTYPES, default=None,
                     help="model dtype; default fp32 for the precision table (in bf16 the forward's own rounding "
                          "noise is as large as the 8-bit KL it measures; the table serves the model in any dtype), "
                          "bf16 with --ocm (the dtype the memory's disagreements are generated in)")

    bench = sub.add_parser("bench", help="time several systems side by side on shipped prompts")
    bench.add_argument("--model", default=DEFAULT_MODEL)
    bench.add_argument("--prompts", type=_positive_int, default=8, help="prompts in all, half MT-Bench, half HumanEval")
    bench.add_argument("--max-new-tokens", type=_positive_int, default=128)
    bench.add_argument("--systems", default=None, help="comma-separated system names (default: all available)")
    bench.add_argument("--out", default="bench_results", help="folder for results.json, results.md, results.png")
    bench.add_argument("--list", action="store_true", help="list the systems and exit")
    bench.add_argument("--bandwidth-mib", type=_positive_int, default=None,
                       help="size of the bandwidth measurement's tensor (default: 8x the last-level cache, "
                            "at least 512 MiB, at most a quarter of the available memory)")

    prof = sub.add_parser("profile", help="where a decode step's time goes: torch.profiler buckets per system")
    prof.add_argument("--model", default=DEFAULT_MODEL)
    prof.add_argument("--systems", default=None,
                      help="comma-separated bench system names (default: hf-bf16,csd-int4,csd-q4-g32)")
    prof.add_argument("--steps", type=_positive_int, default=16, help="decode steps profiled per system")
    prof.add_argument("--out", default="profile_results", help="folder for profile.json, profile.md, profile.png")
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true",
                             help="show the full traceback of an unexpected error instead of one line")
    return parser


def _fail(parser: argparse.ArgumentParser, command: str, message: str) -> None:
    parser.exit(2, f"csd-compile {command}: error: {message}\n")


def _check_model_arg(parser, command: str, model: str) -> None:
    from .models import EMBEDDED_MODELS

    if not model:
        _fail(parser, command, "--model is empty")
    if model not in EMBEDDED_MODELS and not Path(model).expanduser().exists():
        _fail(parser, command, f"--model {model!r} is neither an embedded model {sorted(EMBEDDED_MODELS)} nor an existing path")


def _check_length(parser, command: str, model: str, flag: str, value: int) -> None:
    """``flag`` counts tokens the model's context must hold besides the prompt; refuse a value past the
    context before loading (read from the model's files; unknown: the later checks still hold)."""
    from .models.loader import context_length

    context = context_length(model)
    if context is not None and value >= context:
        _fail(parser, command, f"{flag} {value} does not fit the model's context of {context} tokens "
                               "(the prompt takes some of it too)")


def _check_out_folder(parser, command: str, out: str) -> None:
    if Path(out).exists() and not Path(out).is_dir():
        _fail(parser, command, f"--out {out!r} is a file; it must be a folder (or a new name)")


def cmd_generate(args, parser) -> int:
    if not args.tp:
        if args.tp_backend != "auto":
            _fail(parser, "generate", f"--tp-backend {args.tp_backend}: only with --tp")
        return _cmd_generate(args, parser)
    import contextlib
    import os

    from .parallel import check_launch, close, resolve_backend

    try:  # each rank checks the same things; only rank 0 speaks
        check_launch()
        resolve_backend(args.tp_backend)
    except ValueError as e:
        _fail(parser, "generate", f"--tp: {e}")
    if int(os.environ["RANK"]) == 0:
        rc = _cmd_generate(args, parser)
    else:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            rc = _cmd_generate(args, parser)  # other ranks: silent (main() still reports an unexpected error)
    close()  # every rank finished: leave the group together (a failed rank exits without waiting for the others)
    return rc


def _shard_for_tp(args, parser, model, cfg):
    """``--tp``: check the split before any work, join the process group, return this rank's shard."""
    import os

    from .parallel import check_split, init, shard_model

    world = int(os.environ["WORLD_SIZE"])
    try:
        check_split(model.config, world, cfg)
    except ValueError as e:
        _fail(parser, "generate", f"--tp: {e}")
    info = init(args.tp_backend)
    print(f"[csd-compile] tensor parallel: {info.world} ranks ({info.backend})", file=sys.stderr, flush=True)
    if info.backend == "nccl":  # one device per rank
        model = model.to(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    return shard_model(model, info)


def _cmd_generate(args, parser) -> int:
    from .config import _MOVED_KEYS, CSDConfig, OptionError
    from .models.hf_generate import check_utf8

    if not args.prompt.strip():
        _fail(parser, "generate", "--prompt is empty")
    try:
        check_utf8(args.prompt, "--prompt")
    except ValueError as e:
        _fail(parser, "generate", str(e))
    _check_model_arg(parser, "generate", args.model)
    _check_length(parser, "generate", args.model, "--max-new-tokens", args.max_new_tokens)
    if args.no_compile and args.option:
        _fail(parser, "generate", "-o options configure backend='csd'; they do nothing with --no-compile "
                                  "(drop one or the other)")
    if args.acceptance == "csd" and args.draft == "none":
        _fail(parser, "generate", "--acceptance csd needs a draft: use --draft self or --draft ngram")
    if args.memory is not None and not Path(args.memory).is_file():
        _fail(parser, "generate", f"--memory {args.memory!r} is not a file")
    if args.tau is not None and not (0.0 < args.tau <= 1.0):
        _fail(parser, "generate", f"--tau {args.tau!r} must be in (0, 1]")
    if args.acceptance != "csd":
        given = [flag for flag, value in (("--memory", args.memory), ("--tau", args.tau), ("--lambda", args.lam))
                 if value is not None]
        if given:
            _fail(parser, "generate", f"{', '.join(given)}: only with --acceptance csd (got --acceptance {args.acceptance})")
    options = dict(args.option)
    for key in _MOVED_KEYS:  # the backend refuses them too; here each has a flag of the same name
        if key in options:
            _fail(parser, "generate", f"-o {key}=... is not a backend option of generate; use --{key}")
    try:
        cfg = CSDConfig.from_options(options)
    except OptionError as e:
        _fail(parser, "generate", str(e))
    template = None
    if args.chat_template is not None:
        from .models.hf_generate import resolve_chat_template

        try:
            template = resolve_chat_template(args.chat_template)
        except ValueError as e:
            _fail(parser, "generate", f"--chat-template: {e}")
    table = None
    if cfg.bits == "dynamic":  # a corrupt table or one for another group size: an error before loading
        from .quant.compiled_policy import load_table

        try:
            table, _ = load_table(cfg.calibration, cfg.avg_bits, cfg.group_size)
        except (OSError, ValueError) as e:
            _fail(parser, "generate", str(e))

    import torch

    from .models import load_model
    from .models.greedy import GreedyDecoder
    from .models.hf_generate import TextPrinter, encode_prompt
    from .progress import CompileProgress

    err = sys.stderr
    t0 = time.perf_counter()
    print(f"[csd-compile] loading {args.model} ({args.dtype})", file=err, flush=True)
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, verbose=True)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        _fail(parser, "generate", str(e))
    print(f"[csd-compile] loaded in {time.perf_counter() - t0:.1f}s", file=err, flush=True)
    if template is not None:
        tokenizer.chat_template = template
    try:
        input_ids = encode_prompt(tokenizer, args.prompt, chat=args.chat or template is not None,
                                  allow_special_tokens=args.allow_special_tokens)
    except ValueError as e:
        _fail(parser, "generate", str(e))
    if table is not None:  # a table made for another model: an error before compiling
        try:
            table.check_model(model)
        except ValueError as e:
            _fail(parser, "generate", f"-o calibration={cfg.calibration}: {e}")
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and input_ids.shape[1] + args.max_new_tokens > context:
        _fail(parser, "generate", f"the prompt ({input_ids.shape[1]} tokens) + --max-new-tokens {args.max_new_tokens} "
                                  f"exceeds the model's context of {context} tokens")

    if args.tp:
        model = _shard_for_tp(args, parser, model, cfg)
        input_ids = input_ids.to(next(model.parameters()).device)
    if args.draft != "none":
        return _generate_speculative(args, parser, model, tokenizer, input_ids, options)

    # plain greedy decoding: our own loop around the compiled step (csd_compile.models.greedy), which
    # the bench measured faster than HF generate's loop around the same step; on CPU the step is
    # replayed as a CPU graph unless -o mode=... says otherwise (csd_compile.cpu_graph: measured
    # faster, the same tokens)
    if not args.no_compile and "mode" not in options and not args.tp and input_ids.device.type == "cpu":
        options = {**options, "mode": "reduce-overhead"}
    decoder = GreedyDecoder(model, backend=None if args.no_compile else "csd", options=None if args.no_compile else options)
    compile_s = 0.0
    with torch.inference_mode():
        if not args.no_compile:
            # the same prompt and max_new_tokens (so the same static cache shape), a few tokens only:
            # it compiles the decode step once, outside the timing
            what = f"the decode step with backend='csd' ({_options_text(options)})"
            with CompileProgress(what) as progress:
                decoder.warm_up(input_ids, max_new_tokens=args.max_new_tokens)
            compile_s = progress.seconds
        printer = TextPrinter(tokenizer)
        t0 = time.perf_counter()
        out = decoder(input_ids, max_new_tokens=args.max_new_tokens, streamer=printer)
        elapsed = time.perf_counter() - t0
    new = out.shape[1] - input_ids.shape[1]
    print(
        f"[csd-compile] prompt tokens {input_ids.shape[1]} | new tokens {new} | {new / elapsed:.1f} tok/s"
        f" | compile {compile_s:.1f} s | backend {'eager' if args.no_compile else 'csd'} {args.dtype}{_tp_text(args)}",
        file=err,
        flush=True,
    )
    return 0


def _generate_speculative(args, parser, model, tokenizer, input_ids, options) -> int:
    """``generate --draft self|ngram``: the compiled draft-verify engine, streamed."""
    import torch

    from .models.hf_generate import TextPrinter
    from .progress import CompileProgress
    from .speculative.generate import generate as spec_generate

    err = sys.stderr
    csd = {}
    if args.acceptance == "csd":
        from .speculative.memory import CorrectionMemory

        memory = None
        if args.memory:
            try:  # loaded once here, so the warm-up and the run share one engine and one memory
                memory = CorrectionMemory.load(args.memory, tokenizer, device=next(model.parameters()).device)
            except (ValueError, OSError) as e:
                _fail(parser, "generate", str(e))
        else:
            print("[csd-compile] no --memory given: the correction memory starts empty and learns online", file=err)
        csd = dict(memory=memory, tokenizer=tokenizer)
        csd.update({k: v for k, v in (("tau", args.tau), ("lam", args.lam)) if v is not None})
    kwargs = dict(
        draft=args.draft,
        num_draft_tokens=args.num_draft_tokens,
        draft_bits=args.draft_bits,
        compile_backend=None if args.no_compile else "csd",
        compile_options=options or None,
        acceptance=args.acceptance,
        eos_token_id=tokenizer.eos_token_id,
        **csd,
    )
    compile_s = 0.0
    with torch.inference_mode():
        if not args.no_compile:
            what = f"the draft-verify step ({args.draft} draft) with backend='csd' ({_options_text(options)})"
            with CompileProgress(what) as progress:
                spec_generate(model, input_ids, max_new_tokens=min(4, args.max_new_tokens), **kwargs)
            compile_s = progress.seconds
        printer = TextPrinter(tokenizer)
        out, stats = spec_generate(
            model, input_ids, max_new_tokens=args.max_new_tokens, streamer=printer, return_stats=True, **kwargs
        )
    draft = f"self {args.draft_bits}-bit" if args.draft == "self" else args.draft
    acceptance = args.acceptance
    if csd:
        from .speculative.csd_accept import DEFAULT_LAMBDA, DEFAULT_TAU

        acceptance += f" (tau {csd.get('tau', DEFAULT_TAU):g}, lambda {csd.get('lam', DEFAULT_LAMBDA):g})"
    print(
        f"[csd-compile] prompt tokens {input_ids.shape[1]} | new tokens {stats['new_tokens']} | {stats['tok_per_s']:.1f} tok/s"
        f" | accepted/step {stats['mean_accepted']:.2f} | tokens/target-forward {stats['tokens_per_target_forward']:.2f}"
        f" | compile {compile_s:.1f} s | draft {draft} | acceptance {acceptance} | {args.dtype}{_tp_text(args)}",
        file=err,
        flush=True,
    )
    return 0


def _tp_text(args) -> str:
    import os

    return f" | tp {os.environ['WORLD_SIZE']} ranks" if args.tp else ""


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "no options: unquantized"


def cmd_calibrate(args, parser) -> int:
    _check_model_arg(parser, "calibrate", args.model)
    out = Path(args.out)
    if not out.parent.is_dir():
        _fail(parser, "calibrate", f"--out {args.out!r}: folder {str(out.parent)!r} does not exist")
    if out.is_dir():
        _fail(parser, "calibrate", f"--out {args.out!r} is a folder; give a file name")
    if args.ocm and args.data is not None:
        _fail(parser, "calibrate", "--data: only without --ocm (the memory is seeded from shipped prompts)")
    if not args.ocm:
        from .quant.calibrate import TEXTS, calibration_text

        data = args.data or "britannica"
        if data not in TEXTS and not Path(data).is_file():
            _fail(parser, "calibrate", f"--data {data!r} is neither a text file nor one of {list(TEXTS)}")
        if data not in TEXTS:
            try:  # binary or empty content: refused before the model loads
                calibration_text(data)
            except (ValueError, OSError) as e:
                _fail(parser, "calibrate", f"--data: {e}")
        from .quant.calibrate import calibrate_main

        try:
            table = calibrate_main(args.model, data=data, out=out, dtype=args.dtype or "fp32")
        except ValueError as e:
            _fail(parser, "calibrate", str(e))
        print(f"[csd-compile] wrote the precision-requirement table ({len(table.names)} layers) to {out}", file=sys.stderr)
        return 0

    import torch

    from .data import calibration_prompts
    from .models import load_model
    from .models.hf_generate import encode_prompt
    from .speculative.memory import CorrectionMemory, seed_from_prompts, tokenizer_fingerprint

    _check_length(parser, "calibrate", args.model, "--max-new-tokens", args.max_new_tokens)
    texts = calibration_prompts(args.prompts)
    if len(texts) < args.prompts:
        _fail(parser, "calibrate", f"--prompts {args.prompts}: only {len(texts)} held-out calibration prompts ship")
    model, tokenizer = load_model(args.model, dtype=args.dtype or "bf16", verbose=True)
    prompts = [encode_prompt(tokenizer, p, chat=True)[0] for p in texts]
    memory = CorrectionMemory(fingerprint=tokenizer_fingerprint(tokenizer))
    with torch.inference_mode():
        recorded = seed_from_prompts(memory, model, tokenizer, prompts, draft="self", draft_bits=args.draft_bits,
                                     max_new_tokens=args.max_new_tokens)
    memory.save(out)
    print(f"[csd-compile] seeded the correction memory from {len(prompts)} held-out prompts "
          f"({recorded} rejection pairs) -> {out}", file=sys.stderr)
    return 0


def _systems_arg(parser, command: str, text: str | None, known) -> list[str] | None:
    """``--systems a,b`` as a list of known system names (``None``: the command's default)."""
    if not text:
        return None
    systems = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in systems if s not in known]
    if unknown or not systems:
        _fail(parser, command, f"unknown system(s) {unknown}; choose from {list(known)}")
    return systems


def cmd_bench(args, parser) -> int:
    from .bench import harness  # importing the package registers the systems

    if args.list:
        for name, system in harness.SYSTEMS.items():
            print(f"{name:24s} {system.description}")
        return 0
    _check_model_arg(parser, "bench", args.model)
    systems = _systems_arg(parser, "bench", args.systems, harness.SYSTEMS)
    _check_out_folder(parser, "bench", args.out)
    if args.bandwidth_mib is not None:
        from .bench.roofline import check_bandwidth_bytes

        try:
            check_bandwidth_bytes(args.bandwidth_mib << 20)
        except ValueError as e:
            _fail(parser, "bench", f"--bandwidth-mib {args.bandwidth_mib}: {e}")
    _check_length(parser, "bench", args.model, "--max-new-tokens", args.max_new_tokens)
    from .data import humaneval_problems, mtbench_questions

    # half MT-Bench (rounded up), half HumanEval: the most prompts served in full
    limit = min(2 * len(mtbench_questions()), 2 * len(humaneval_problems()) + 1)
    if args.prompts > limit:
        _fail(parser, "bench", f"--prompts {args.prompts}: at most {limit} (half MT-Bench, half HumanEval questions)")
    harness.run(
        model_name=args.model,
        num_prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        systems=systems,
        out_dir=Path(args.out),
        bandwidth_bytes=args.bandwidth_mib << 20 if args.bandwidth_mib else None,
    )
    return 0


def cmd_profile(args, parser) -> int:
    from .bench import harness, profile

    _check_model_arg(parser, "profile", args.model)
    systems = _systems_arg(parser, "profile", args.systems, harness.SYSTEMS)
    _check_out_folder(parser, "profile", args.out)
    _check_length(parser, "profile", args.model, "--steps", args.steps)
    profile.profile(model_name=args.model, systems=systems, steps=args.steps, out_dir=Path(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad arguments exit 2 before any work; an unexpected error from inside the
    libraries is one line naming the command and the error, exit 2 (``--debug``: the traceback);
    Ctrl-C is one line, exit 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"generate": cmd_generate, "calibrate": cmd_calibrate, "bench": cmd_bench, "profile": cmd_profile}
    if args.command not in commands:
        parser.error(f"unknown command {args.command!r}")
    try:
        return commands[args.command](args, parser)
    except KeyboardInterrupt:
        print(f"\ncsd-compile {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, not a library traceback
        if args.debug:
            raise
        text = " ".join(str(e).split())[:500] or "(no message)"
        print(f"csd-compile {args.command}: error: {type(e).__name__}: {text} (--debug shows the traceback)",
              file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
