"""In-process A/B of one fixed-cost lever of the decode step, on the embedded model.

    python -m benchmarks.fixed_cost_ab --lever size_asserts|direct|direct_qlinear|decode_attention|group_linears|
        scale_layout|packed_scales|fp16_scales|file_grid|bf16_dot|attention_loops|metadata_prefetch|bound_replay|
        native_loop|cpu_graph [--options bits=auto]
        [--rounds 7] [--dtype bf16|fp32] [--isa avx2]
        [--cache-slots N]

Two ``GreedyDecoder`` s decode the same 53-token prompt, one with the lever as shipped and one with
it undone, in alternating rounds of one process (the machine's drift hits both alike; which side
runs first alternates too, as the first of a pair measured up to 3% slower in one session):

- ``size_asserts``: the backend's ``WRAPPER_CONFIG`` (Inductor's ``size_asserts`` off) against a
  backend compiled with it on (a second registered backend, so each decoder has its own graph);
- ``direct``: ``csd_compile.stance.LoopSteps`` (a call's first step through Dynamo, its later ones
  straight to the compiled graph) against its later steps through Dynamo too, guards skipped (what it
  did before: one decoder, direct calls refused in alternate rounds);
- ``direct_qlinear``: the Python wrapper calling the C++ kernel as a plain function
  (``csd_compile.kernels.native.direct_qlinear``) against calling ``torch.ops.csd.qlinear_cpu_native``
  through the dispatcher (a second backend compiling without that codegen, Inductor's caches off);
- ``decode_attention``: the pass's ``csd::decode_attention`` op (reads only the open cache slots)
  against the same math as tensor ops that Inductor fuses (a second backend, caches off);
- ``group_linears``: linears that read one input as one ``csd.qlinear_multi`` call (the option's
  default) against one ``csd.qlinear`` per linear (``group_linears=False``);
- ``scale_layout``: the nested weights' scales and zeros column-major (``nested.column_major``, as
  stored) against row-major copies (what they were before; the C++ kernel gathers them), each
  side's quantized copies made under its layout (caches off);
- ``packed_scales``: the C++ kernel reading each weight's packed scale/zero copy
  (``QLinear.kernel_scales``, ``nested.pack_scale_zero``) against the column-major pair, each side
  compiled with its own (caches off);
- ``fp16_scales``: those packed copies in float16 where float16 holds the grid (``pack_scale_zero``'s
  ``fp16="auto"``, as ``QLinear`` packs them: a GGUF Q4 file's linears, the pair; a Q8_0 head, its
  step alone) against float32 everywhere, each side compiled with its own (caches off);
- ``file_grid``: a GGUF Q4 weight quantized at group 32 on the file's own grid
  (``quant.gguf.file_grid``: the file's weights, fp16 scales) against ``nested.quantize``'s
  estimate of that grid from the weight in the model's dtype (fp32 scales), each side compiled
  with its own (caches off); with ``--nll-tokens``, what the exact grid does to quality;
- ``bf16_dot``: the C++ kernel's ``avx512bf16`` path (bf16 dot products, where the CPU has AVX-512
  BF16 and VBMI) against the best float path without it (``avx512vnni``), one decoder, the path
  forced in alternate rounds (``native.use_isa``);
- ``attention_loops``: the C++ decode-attention kernel's register path for head sizes 64 and 128
  against its general loops (``native.use_attention_loops``), one decoder, the loops switched in
  alternate rounds;
- ``metadata_prefetch``: a replayed CPU graph fetching each call's record and tensor metadata
  ahead of the call (``csd_compile.cpu_graph``) against reading them when the call does, one
  decoder, switched in alternate rounds (needs ``mode=reduce-overhead`` in ``--options``);
- ``bound_replay``: a decoding loop replaying its step's CPU graph bound to the step's inputs
  (``csd_compile.cpu_graph.BoundReplay``: the compiled graph's entry and its list of every input
  skipped) against calling the compiled graph, one decoder, switched in alternate rounds (needs
  ``mode=reduce-overhead`` in ``--options``; both sides decode every token through Python);
- ``native_loop``: ``GreedyDecoder`` decoding in C++ once its step's CPU graph is bound
  (``csd_compile.models.greedy.native_loop``, ``BoundReplay.loop``) against every token through
  Python (bound replays on both sides), one decoder, switched in alternate rounds (needs
  ``mode=reduce-overhead``);
- ``cpu_graph``: the step replayed as a CPU graph (``mode="reduce-overhead"``, ``csd_compile.cpu_graph``)
  against Inductor's Python wrapper running it, two decoders of one model.

``--dtype fp32`` loads the model in fp32 (fp32 activations: the C++ kernel's float paths, as the
speculative rows' 8-bit target runs); bf16 by default. ``--isa NAME`` forces the C++ kernel's path
on both sides (``native.use_isa``: e.g. ``avx2`` on an AVX-512 CPU). ``--cache-slots N`` sizes the
static KV cache at N slots (a call asks for N - 53 new tokens and is stopped after 97), as a longer
request would; by default the cache holds 256. ``--nll-tokens N`` (levers that change values: not
direct) then scores quality: each side's step, compiled the same way but returning logits, reads
N tokens of shipped text (Britannica, HumanEval) one at a time over a static cache (teacher
forcing), and the mean negative log-likelihood per token is printed for both, with how often the
two steps' argmax (the greedy token) agree at the same position.

Decode-only ms/token = (time of a 97-token call - time of a 1-token call) / 96; medians, the ratio
of the medians and the median of the rounds' own ratios (the two sides of a round run back to
back: the better estimate on a host whose speed drifts from round to round), and whether both
produced the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import random
import statistics
import time

import torch


def _ms_per_token(dec, ids, tokens: int, budget: int) -> tuple[float, torch.Tensor]:
    # budget: max_new_tokens of every call (it sizes the cache); the calls stop after tokens + 1 and 1
    t0 = time.perf_counter()
    out = dec(ids, max_new_tokens=budget, eos_token_id=[], _stop_after=tokens + 1)
    a = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec(ids, max_new_tokens=budget, eos_token_id=[], _stop_after=1)
    return (a - (time.perf_counter() - t0)) / tokens * 1e3, out


@torch.inference_mode()
def _step_nll(model, backend_name: str, options, tokenizer, tokens: int) -> tuple[dict[str, float], dict[str, list]]:
    """Mean NLL per token of the compiled decode step (logits out), teacher-forced over shipped text,
    and the step's argmax at every position (per text)."""
    import torch.nn.functional as F
    from transformers import StaticCache

    from csd_compile.quant.eval import britannica_text, humaneval_text

    def step(**kw):
        return model(**kw).logits[:, -1].float()

    compiled = torch.compile(step, backend=backend_name, fullgraph=True, options=options)
    out, argmax = {}, {}
    for name, text in (("britannica", britannica_text()), ("humaneval", humaneval_text())):
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
        cache = StaticCache(config=model.config, max_cache_len=256 * -(-ids.shape[1] // 256))
        nll = 0.0
        argmax[name] = []
        for i in range(ids.shape[1] - 1):
            logits = compiled(input_ids=ids[:, i:i + 1], position_ids=torch.tensor([[i]]), cache=cache,
                              use_cache=True, logits_to_keep=1)
            nll += F.cross_entropy(logits, ids[0, i + 1:i + 2]).item()
            argmax[name].append(int(logits.argmax()))
        out[name] = nll / (ids.shape[1] - 1)
    return out, argmax


def _compiled_afresh() -> contextlib.ExitStack:
    # Inductor's and AOT autograd's cache keys do not see a patched codegen or pass
    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
    stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
    return stack


@contextlib.contextmanager
def _patched_afresh(owner, name: str, value):
    """``owner.name`` replaced by ``value`` while the block runs (compiling afresh), then restored."""
    real = getattr(owner, name)
    setattr(owner, name, value)
    try:
        with _compiled_afresh():
            yield
    finally:
        setattr(owner, name, real)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lever", required=True, choices=["size_asserts", "direct", "direct_qlinear", "decode_attention",
                                                         "group_linears", "scale_layout", "packed_scales",
                                                         "fp16_scales", "file_grid", "bf16_dot",
                                                         "attention_loops", "metadata_prefetch", "bound_replay",
                                                         "native_loop", "cpu_graph"])
    ap.add_argument("--options", default="bits=auto", help="backend options, k=v[,k=v]")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the model's dtype (its activations)")
    ap.add_argument("--isa", default=None, help="force the C++ kernel's path on both sides (native.use_isa)")
    ap.add_argument("--cache-slots", type=int, default=None, help="static KV cache size (default 256)")
    ap.add_argument("--nll-tokens", type=int, default=0, help="score each side's quality on N tokens of text")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        raise SystemExit("--rounds and --threads must be >= 1")
    if args.nll_tokens and (args.nll_tokens < 2 or args.lever == "direct"):
        raise SystemExit("--nll-tokens must be >= 2, for a lever that changes the values (not direct)")
    prompt, tokens = 53, 96
    if args.cache_slots is not None and args.cache_slots < prompt + tokens + 1:
        raise SystemExit(f"--cache-slots must be >= {prompt + tokens + 1} (prompt {prompt} + {tokens + 1} tokens)")
    budget = tokens + 1 if args.cache_slots is None else args.cache_slots - prompt

    import csd_compile.backend as backend
    import csd_compile.models.greedy as greedy
    from benchmarks.llama_cpp_decode import _parse_options
    from csd_compile.models.loader import load_model

    torch.set_num_threads(args.threads)
    if args.isa is not None:
        from csd_compile.kernels import native

        if not native.load() or args.isa not in native.supported_isas():
            raise SystemExit(f"--isa {args.isa}: this machine's C++ kernels run {native.supported_isas()}")
        native.set_isa(args.isa)
    options = _parse_options(args.options)
    ids = torch.tensor([[random.Random(0).randrange(100, 20000) for _ in range(prompt)]])
    shipped = f"{args.lever} as shipped"
    undone = f"{args.lever} undone"
    building = {}  # side -> context its warm-up (compile, quantized copies) runs under

    if args.lever == "cpu_graph":  # one model, two decoders: the step with and without mode="reduce-overhead"
        model, tokenizer = load_model(dtype=args.dtype)
        graphs = {**options, "mode": "reduce-overhead"}
        decoders = {shipped: greedy.GreedyDecoder(model, backend="csd", options=graphs),
                    undone: greedy.GreedyDecoder(model, backend="csd", options=options)}
        backend_names = {shipped: "csd", undone: "csd"}
        lever_options = {shipped: graphs, undone: options}
        settings = {shipped: contextlib.nullcontext, undone: contextlib.nullcontext}
    elif args.lever in ("group_linears", "scale_layout", "packed_scales", "fp16_scales", "file_grid"):  # two models
        import csd_compile.quant.nested as nested
        from csd_compile.kernels import native
        from csd_compile.quant.linear import QLinear

        if args.lever in ("packed_scales", "fp16_scales", "file_grid") and not native.load():
            raise SystemExit(f"--lever {args.lever} needs the C++ kernels, which did not build here")

        import csd_compile.quant.gguf as gguf
        import csd_compile.quant.linear as linear

        # the undone side's warm-up runs with one name its quantized copies or compile look up replaced
        undo = {
            # pack_codes looks it up at every call: row-major copies
            "scale_layout": (nested, "column_major", torch.Tensor.contiguous),
            # the compile pass asks it: the column-major pair instead of the packed copy
            "packed_scales": (QLinear, "kernel_scales", lambda self: (self.scale, self.zero)),
            # QLinear.repack looks it up at every call: float32 packing everywhere
            "fp16_scales": (linear, "pack_scale_zero", functools.partial(nested.pack_scale_zero, fp16=False)),
            # QLinear looks it up at every call: quantize's estimate of the file's grid
            "file_grid": (gguf, "file_grid", lambda weight, group_size: None),
        }

        model, tokenizer = load_model(dtype=args.dtype)
        separate = {**options, "group_linears": False} if args.lever == "group_linears" else options
        decoders = {shipped: greedy.GreedyDecoder(model, backend="csd", options=options),
                    undone: greedy.GreedyDecoder(load_model(dtype=args.dtype)[0], backend="csd", options=separate)}
        backend_names = {shipped: "csd", undone: "csd"}
        lever_options = {shipped: options, undone: separate}
        settings = {shipped: contextlib.nullcontext, undone: contextlib.nullcontext}
        if args.lever in undo:
            building = {undone: functools.partial(_patched_afresh, *undo[args.lever])}
    elif args.lever in ("size_asserts", "direct_qlinear", "decode_attention"):
        from torch._dynamo import register_backend

        @contextlib.contextmanager
        def size_asserts_on():
            backend.WRAPPER_CONFIG["size_asserts"] = True
            try:
                yield
            finally:
                backend.WRAPPER_CONFIG["size_asserts"] = False

        @contextlib.contextmanager
        def qlinear_as_op():
            from torch._inductor.codegen.custom_extern_kernel_codegen import CUSTOM_EXTERN_KERNEL_CODEGEN

            key = "torch.ops.csd.qlinear_cpu_native.default"
            entry = CUSTOM_EXTERN_KERNEL_CODEGEN.pop(key)
            try:
                with _compiled_afresh():
                    yield
            finally:
                CUSTOM_EXTERN_KERNEL_CODEGEN[key] = entry

        @contextlib.contextmanager
        def attention_as_tensor_ops():
            import csd_compile.passes.decode_attention as pass_module

            real = pass_module._emit_op
            pass_module._emit_op = lambda graph, bound: None  # the pass then writes the tensor-op math
            try:
                with _compiled_afresh():
                    yield
            finally:
                pass_module._emit_op = real

        lever_undone = {"size_asserts": size_asserts_on, "direct_qlinear": qlinear_as_op,
                        "decode_attention": attention_as_tensor_ops}[args.lever]

        @register_backend
        def csd_lever_undone(gm, example_inputs, **kw):
            with lever_undone():
                return backend.csd_backend(gm, example_inputs, **kw)

        model, tokenizer = load_model(dtype=args.dtype)
        decoders = {shipped: greedy.GreedyDecoder(model, backend="csd", options=options),
                    undone: greedy.GreedyDecoder(load_model(dtype=args.dtype)[0], backend="csd_lever_undone",
                                                 options=options)}
        backend_names = {shipped: "csd", undone: "csd_lever_undone"}
        lever_options = {shipped: options, undone: options}
        settings = {shipped: contextlib.nullcontext, undone: contextlib.nullcontext}
    else:  # direct, bf16_dot, attention_loops, metadata_prefetch, bound_replay, native_loop: one decoder, toggled
        if args.lever in ("metadata_prefetch", "bound_replay", "native_loop"):
            from csd_compile import cpu_graph
            from csd_compile.kernels import native

            if options.get("mode") != "reduce-overhead":
                raise SystemExit(f"--lever {args.lever} acts on CPU graphs: add mode=reduce-overhead to --options")
            if not native.load():
                raise SystemExit(f"--lever {args.lever} needs the C++ kernels (CPU graphs), which did not build here")
            if args.lever == "native_loop":
                settings = {shipped: lambda: greedy.native_loop(True), undone: lambda: greedy.native_loop(False)}
            elif args.lever == "bound_replay":  # the native loop needs the binding: off on both sides
                def bound(on: bool) -> contextlib.ExitStack:
                    stack = contextlib.ExitStack()
                    stack.enter_context(greedy.native_loop(False))
                    stack.enter_context(cpu_graph.bound_replays(on))
                    return stack

                settings = {shipped: lambda: bound(True), undone: lambda: bound(False)}
            else:
                settings = {shipped: lambda: cpu_graph.metadata_prefetch(True),
                            undone: lambda: cpu_graph.metadata_prefetch(False)}
        elif args.lever == "attention_loops":
            from csd_compile.kernels import native

            if not native.load():
                raise SystemExit("--lever attention_loops needs the C++ kernels, which did not build here")
            settings = {shipped: lambda: native.use_attention_loops("registers"),
                        undone: lambda: native.use_attention_loops("general")}
        elif args.lever == "bf16_dot":
            from csd_compile.kernels import native

            native.load()
            if "avx512bf16" not in native.supported_isas():
                raise SystemExit(f"--lever bf16_dot needs a CPU with AVX-512 BF16 and VBMI; this one runs "
                                 f"{native.supported_isas()}")
            float_path = [isa for isa in native.supported_isas() if isa != "avx512bf16"][-1]
            settings = {shipped: lambda: native.use_isa("avx512bf16"), undone: lambda: native.use_isa(float_path)}
        else:
            @contextlib.contextmanager
            def through_dynamo():
                from csd_compile import stance

                real = stance._Direct.__dict__["of"]  # the classmethod itself
                stance._Direct.of = classmethod(lambda cls, *a: None)  # every step then skips only the guards
                try:
                    yield
                finally:
                    stance._Direct.of = real

            settings = {shipped: contextlib.nullcontext, undone: through_dynamo}
        model, tokenizer = load_model(dtype=args.dtype)
        dec = greedy.GreedyDecoder(model, backend="csd", options=options)
        decoders = {shipped: dec, undone: dec}
        backend_names = {shipped: "csd", undone: "csd"}
        lever_options = {shipped: options, undone: options}

    for name, dec in decoders.items():
        t = time.perf_counter()
        with building.get(name, contextlib.nullcontext)(), settings[name]():
            dec.warm_up(ids, max_new_tokens=budget)
        print(f"{name}: warm-up {time.perf_counter() - t:.1f} s", flush=True)
    if args.lever in ("fp16_scales", "file_grid"):  # what each side's compiled graph runs on
        from csd_compile.quant.registry import lookup_quantized

        for name, dec in decoders.items():
            copies = [q for p in dec.model.parameters() for q in lookup_quantized(p)]
            half = sum(q.scale_zero is not None and q.scale_zero.dtype == torch.float16 for q in copies)
            print(f"{name}: {half} of {len(copies)} quantized weights with float16 scales")
    if args.lever == "scale_layout":  # what each side's compiled graph runs on
        from csd_compile.quant.registry import lookup_quantized

        for name, dec in decoders.items():
            copies = [q for p in dec.model.parameters() for q in lookup_quantized(p)]
            cols = sum(q.scale.stride(0) == 1 for q in copies)
            print(f"{name}: {cols} of {len(copies)} quantized weights with column-major scales")
    res: dict[str, list[float]] = {name: [] for name in decoders}
    outs = {}
    for r in range(args.rounds):
        for name in list(decoders)[:: -1 if r % 2 else 1]:
            dec = decoders[name]
            with settings[name]():
                ms, outs[name] = _ms_per_token(dec, ids, tokens, budget)
            res[name].append(ms)
    for name, v in res.items():
        print(f"{name}: median {statistics.median(v):.2f} ms/token  {[round(x, 2) for x in v]}")
    ratio = statistics.median(res[undone]) / statistics.median(res[shipped])
    # each round's own ratio: the two sides of a round ran back to back, so a host that drifts
    # from round to round moves both (the medians above move with it)
    paired = statistics.median(u / s for u, s in zip(res[undone], res[shipped]))
    print(f"speed-up of the lever: {ratio:.3f}x (median of the rounds' own ratios {paired:.3f}x); "
          f"same tokens: {torch.equal(outs[shipped], outs[undone])}")
    if args.nll_tokens:
        argmax = {}
        for name, dec in decoders.items():
            with settings[name]():
                nll, argmax[name] = _step_nll(dec.model, backend_names[name], lever_options[name], tokenizer,
                                              args.nll_tokens)
            print(f"{name}: mean NLL per token " + ", ".join(f"{k} {v:.5f}" for k, v in nll.items()), flush=True)
        # how often the two steps pick the same next token on the same (teacher-forced) context
        agree = {text: sum(a == b for a, b in zip(argmax[shipped][text], argmax[undone][text])) / len(argmax[shipped][text])
                 for text in argmax[shipped]}
        print("teacher-forced argmax agreement: " + ", ".join(f"{k} {v:.1%}" for k, v in agree.items()))


if __name__ == "__main__":
    main()
