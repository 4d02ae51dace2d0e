"""The benchmark systems. Adding one is one small function: ``@system(name, description)`` on a
``setup(ctx)`` that returns ``run(input_ids) -> {"ids": ...}``. Later features add their rows here."""

from __future__ import annotations

import importlib.util

import torch

from .harness import BenchContext, system
from .roofline import GGUF_Q4_1, GGUF_Q8_0, Precision, WeightFormat

# What each row reads per step (csd_compile.bench.roofline). bf16/fp32: everything dense.
BF16, FP32 = Precision(dtype="bf16"), Precision(dtype="fp32")
# torchao's layouts, as we read them: int8 weight-only keeps one bf16 scale per output row;
# Int4OpaqueTensor (g64) keeps a bf16 scale and zero per group of 64.
TORCHAO_INT8 = WeightFormat("torchao-int8", 1.0, 0, 2.0)
TORCHAO_INT4_G64 = WeightFormat("torchao-int4-g64", 0.5, 64, 4.0)


def _hf_runner(model, ctx: BenchContext, **extra):
    def run(ids):  # kwargs read at each call: the profiler changes ctx.max_new_tokens between runs
        kwargs = ctx.greedy_kwargs() | extra
        return {"ids": model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)}

    return run


@system("hf-fp32", "plain HF greedy, fp32, eager", precision=FP32)
def hf_fp32(ctx):
    return _hf_runner(ctx.load("fp32"), ctx)


@system("hf-bf16", "plain HF greedy, bf16, eager (the baseline)", precision=BF16)
def hf_bf16(ctx):
    return _hf_runner(ctx.load("bf16"), ctx)


def _static_compiled(ctx, backend: str, options=None, model=None):
    from csd_compile.models.hf_generate import compile_config

    return _hf_runner(
        ctx.load("bf16") if model is None else model,
        ctx,
        cache_implementation="static",
        max_cache_len=ctx.max_cache_len,
        compile_config=compile_config(options, backend=backend),
    )


@system("hf-inductor-static", "HF greedy, bf16, static cache, decode step compiled by Inductor", precision=BF16)
def hf_inductor(ctx):
    return _static_compiled(ctx, "inductor")


@system("hf-prompt-lookup", "HF assisted generation with prompt lookup (10 tokens), bf16",
        precision=Precision(draft="free"))
def hf_prompt_lookup(ctx):
    return _hf_runner(ctx.load("bf16"), ctx, prompt_lookup_num_tokens=10)


@system("csd", "HF greedy, bf16, static cache, decode step compiled by backend='csd'", precision=BF16)
def csd_static(ctx):
    return _static_compiled(ctx, "csd")


def _llama_cpp_missing():
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (optional: pip install llama-cpp-python, ~10 min build)"
    return None


@system("llama.cpp", "llama.cpp (llama-cpp-python) on the same GGUF file, 2 threads, greedy",
        available=_llama_cpp_missing,
        precision=Precision(dtype="fp32", weight_format=GGUF_Q4_1, head_format=GGUF_Q8_0, kv_dtype="fp16"))
def llama_cpp(ctx):
    from llama_cpp import Llama

    from csd_compile.models import EMBEDDED_MODELS

    if ctx.model_name not in EMBEDDED_MODELS:
        raise ValueError("the llama.cpp row needs an embedded GGUF model")
    path = EMBEDDED_MODELS[ctx.model_name].gguf_path()
    llm = Llama(model_path=str(path), n_ctx=ctx.max_cache_len, n_threads=torch.get_num_threads(), verbose=False)
    eos = llm.token_eos()

    def run(ids):
        prompt = ids[0].tolist()
        new = []
        for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            if tok == eos or len(new) >= ctx.max_new_tokens:
                break
            new.append(tok)
        if len(new) < ctx.max_new_tokens and new[-1:] != [eos]:
            new.append(eos)  # HF counts the EOS it emits; so do we
        return {"ids": torch.tensor([prompt + new])}

    return run


def _csd_generate_runner(model, ctx: BenchContext, **kw):
    import csd_compile

    eos = ctx.tokenizer.eos_token_id

    def run(ids):
        out, stats = csd_compile.generate(
            model, ids, max_new_tokens=ctx.max_new_tokens, eos_token_id=eos, return_stats=True,
            max_cache_len=ctx.max_cache_len, **kw,
        )
        return {"ids": out, "mean_accepted": stats["mean_accepted"],
                "tokens_per_target_forward": stats["tokens_per_target_forward"]}

    return run


@system("csd-ngram", "csd_compile.generate, lossless, n-gram prompt-lookup draft, bf16",
        precision=Precision(draft="free"))
def csd_ngram(ctx):
    return _csd_generate_runner(ctx.load("bf16"), ctx, draft="ngram")


@system("csd-self4", "csd_compile.generate, lossless, the model itself at 4 bits as draft, bf16",
        precision=Precision(draft="model"))
def csd_self4(ctx):
    return _csd_generate_runner(ctx.load("bf16"), ctx, draft="self", draft_bits=4)


def _self4_with_k(k: int):
    def setup(ctx):
        return _csd_generate_runner(ctx.load("bf16"), ctx, draft="self", draft_bits=4, num_draft_tokens=k)

    return setup


for _k in (3, 5, 6, 8):  # the draft-length sweep behind the self draft's default K
    system(f"csd-self4-k{_k}", f"csd-self4 with K={_k} drafts per step", default=False,
           precision=Precision(draft="model"))(_self4_with_k(_k))


_LOSSLESS_INT8 = {"bits": 8, "quantize_lm_head": True}


@system("csd-int8-fp32", "HF greedy, static cache, backend='csd' bits=8 with the LM head at 8 bits too, fp32 "
        "activations (the target that csd-int8-ngram reproduces token for token)", default=False,
        precision=Precision(bits=8, quantize_lm_head=True, dtype="fp32"))
def csd_int8_fp32(ctx):
    return _static_compiled(ctx, "csd", _LOSSLESS_INT8, model=ctx.load("fp32"))


@system("csd-int8-ngram", "csd_compile.generate, n-gram draft (K=3), lossless w.r.t. csd-int8-fp32 (same "
        "model: 8-bit weights and LM head, fp32 activations)", default=False, plain="csd-int8-fp32",
        precision=Precision(bits=8, quantize_lm_head=True, dtype="fp32", draft="free"))
def csd_int8_ngram(ctx):
    return _csd_generate_runner(ctx.load("fp32"), ctx, draft="ngram", num_draft_tokens=3,
                                compile_options=_LOSSLESS_INT8)


@system("csd-int8-self", "csd_compile.generate, the target's own 4-bit rung as draft (K=4), lossless w.r.t. "
        "csd-int8-fp32 (same model: 8-bit weights and LM head, fp32 activations)", default=False,
        plain="csd-int8-fp32", precision=Precision(bits=8, quantize_lm_head=True, dtype="fp32", draft="model"))
def csd_int8_self(ctx):
    return _csd_generate_runner(ctx.load("fp32"), ctx, draft="self", draft_bits=4, compile_options=_LOSSLESS_INT8)


@system("csd-int8-fp32-graph", "csd-int8-fp32's model and options in our own greedy loop, the step replayed as a "
        "CPU graph (mode='reduce-overhead': csd_compile.cpu_graph)", default=False, plain="csd-int8-fp32",
        precision=Precision(bits=8, quantize_lm_head=True, dtype="fp32"))
def csd_int8_fp32_graph(ctx):
    return _greedy_loop(ctx, {**_LOSSLESS_INT8, "mode": "reduce-overhead"}, model=ctx.load("fp32"))


@system("csd-int8-self-graph", "csd-int8-self with its steps replayed as CPU graphs (mode='reduce-overhead'); "
        "compared with csd-int8-fp32-graph, the same model's plain decoding replayed the same way", default=False,
        plain="csd-int8-fp32-graph", precision=Precision(bits=8, quantize_lm_head=True, dtype="fp32", draft="model"))
def csd_int8_self_graph(ctx):
    return _csd_generate_runner(ctx.load("fp32"), ctx, draft="self", draft_bits=4,
                                compile_options={**_LOSSLESS_INT8, "mode": "reduce-overhead"})


@system("csd-int8-self-csd", "csd-int8-self with CSD acceptance at its defaults (tau 0.3, lambda 6, memory "
        "learning online from an empty table): lossy; compared with csd-int8-fp32", default=False,
        plain="csd-int8-fp32", precision=Precision(bits=8, quantize_lm_head=True, dtype="fp32", draft="model"))
def csd_int8_self_csd(ctx):
    return _csd_generate_runner(ctx.load("fp32"), ctx, draft="self", draft_bits=4, compile_options=_LOSSLESS_INT8,
                                acceptance="csd", tokenizer=ctx.tokenizer)


@system("csd-int8-self-csd-graph", "csd-int8-self-csd with its steps replayed as CPU graphs (mode='reduce-overhead'); "
        "lossy; compared with csd-int8-self-graph, the same pair with exact acceptance", default=False,
        plain="csd-int8-self-graph", precision=Precision(bits=8, quantize_lm_head=True, dtype="fp32", draft="model"))
def csd_int8_self_csd_graph(ctx):
    return _csd_generate_runner(ctx.load("fp32"), ctx, draft="self", draft_bits=4, acceptance="csd",
                                tokenizer=ctx.tokenizer, compile_options={**_LOSSLESS_INT8, "mode": "reduce-overhead"})


@system("csd-self4-csd", "csd-self4 with CSD acceptance at its defaults (tau 0.3, lambda 6, memory learning "
        "online from an empty table): lossy; compared with csd-self4", default=False, plain="csd-self4",
        precision=Precision(draft="model"))
def csd_self4_csd(ctx):
    return _csd_generate_runner(ctx.load("bf16"), ctx, draft="self", draft_bits=4, acceptance="csd",
                                tokenizer=ctx.tokenizer)


# The embedded GGUF is Q4_1 (blocks of 32, w = d * q + m): at group_size 32 the 4-bit rung's grid
# (float zero point) is the file's own, so these rows run the file's weights, not an approximation.
_Q4_1_GRID = {"bits": 4, "group_size": 32}


@system("csd-q4-g32", "HF greedy, static cache, backend='csd' bits=4 group_size=32, bf16: the GGUF's own "
        "Q4_1 grid, i.e. hf-bf16's weights up to bf16 rounding", default=False,
        precision=Precision(bits=4, group_size=32))
def csd_q4_g32(ctx):
    return _static_compiled(ctx, "csd", _Q4_1_GRID)


def _greedy_loop(ctx, options, model=None):
    from csd_compile.models.greedy import GreedyDecoder

    decoder = GreedyDecoder(ctx.load("bf16") if model is None else model, backend="csd", options=options)

    def run(ids):  # EOS as HF's: the model's generation config
        return {"ids": decoder(ids, max_new_tokens=ctx.max_new_tokens)}

    return run


@system("csd-q4-g32-loop", "csd-q4-g32's compiled step in our own greedy loop (csd_compile.models.greedy) "
        "instead of HF generate's", default=False, plain="csd-q4-g32", precision=Precision(bits=4, group_size=32))
def csd_q4_g32_loop(ctx):
    return _greedy_loop(ctx, _Q4_1_GRID)


@system("csd-q4-g32-regions", "csd-q4-g32 with each decoder layer one nested_compile_region (compiled once, "
        "called per layer: csd_compile.models.regions.mark_decoder_regions)", default=False, plain="csd-q4-g32",
        precision=Precision(bits=4, group_size=32))
def csd_q4_g32_regions(ctx):
    from csd_compile.models.regions import mark_decoder_regions

    model = ctx.load("bf16")
    mark_decoder_regions(model)
    return _static_compiled(ctx, "csd", _Q4_1_GRID, model=model)


@system("csd-q4-g32-fp32", "HF greedy, static cache, backend='csd' bits=4 group_size=32, fp32 activations: "
        "the GGUF's own Q4_1 grid, i.e. hf-fp32's weights", default=False, plain="hf-fp32",
        precision=Precision(bits=4, group_size=32, dtype="fp32"))
def csd_q4_g32_fp32(ctx):
    return _static_compiled(ctx, "csd", _Q4_1_GRID, model=ctx.load("fp32"))


@system("csd-q4-g32-ngram", "csd_compile.generate, n-gram draft (K=3), on csd-q4-g32-fp32's model",
        default=False, plain="csd-q4-g32-fp32", precision=Precision(bits=4, group_size=32, dtype="fp32", draft="free"))
def csd_q4_g32_ngram(ctx):
    return _csd_generate_runner(ctx.load("fp32"), ctx, draft="ngram", num_draft_tokens=3, compile_options=_Q4_1_GRID)


@system("csd-auto", "HF greedy, static cache, backend='csd' bits='auto', bf16: every weight at its GGUF type's "
        "own grid (the embedded file: Q4_1 linears at 4 bits, the Q8_0 LM head at 8 bits)", default=False,
        precision=Precision(bits="auto"))
def csd_auto(ctx):
    return _static_compiled(ctx, "csd", {"bits": "auto"})


@system("csd-auto-loop", "csd-auto's compiled step in our own greedy loop (what `csd-compile generate` and "
        "`make demo` run)", default=False, plain="csd-auto", precision=Precision(bits="auto"))
def csd_auto_loop(ctx):
    return _greedy_loop(ctx, {"bits": "auto"})


@system("csd-auto-graph", "csd-auto-loop with its step replayed as a CPU graph (mode='reduce-overhead': "
        "csd_compile.cpu_graph)", default=False, plain="csd-auto", precision=Precision(bits="auto"))
def csd_auto_graph(ctx):
    return _greedy_loop(ctx, {"bits": "auto", "mode": "reduce-overhead"})


@system("csd-q4-g32-graph", "csd-q4-g32-loop with its step replayed as a CPU graph (mode='reduce-overhead': "
        "csd_compile.cpu_graph)", default=False, plain="csd-q4-g32", precision=Precision(bits=4, group_size=32))
def csd_q4_g32_graph(ctx):
    return _greedy_loop(ctx, {**_Q4_1_GRID, "mode": "reduce-overhead"})


@system("csd-q4-g32-ngram-graph", "csd_compile.generate, n-gram draft (K=3), on csd-q4-g32-graph's model and "
        "options (bf16, the file's Q4_1 grid, steps replayed as CPU graphs); compared with csd-q4-g32-graph",
        default=False, plain="csd-q4-g32-graph", precision=Precision(bits=4, group_size=32, draft="free"))
def csd_q4_g32_ngram_graph(ctx):
    return _csd_generate_runner(ctx.load("bf16"), ctx, draft="ngram", num_draft_tokens=3,
                                compile_options={**_Q4_1_GRID, "mode": "reduce-overhead"})


@system("hf-assisted-q4", "HF assisted generation, assistant = the model at 4 bits (csd QLinear), bf16",
        precision=Precision(draft="model"))
def hf_assisted_q4(ctx):
    import copy

    from csd_compile.quant import quantize_

    model = ctx.load("bf16")
    assistant = quantize_(copy.deepcopy(model), bits=4, group_size=64)
    return _hf_runner(model, ctx, assistant_model=assistant)


@system("csd-draft-q4", "csd_compile.generate, lossless, a separate draft model: an independent 4-bit copy "
        "of the target (its own weights and KV cache), K=4, bf16", default=False, precision=Precision(draft="model"))
def csd_draft_q4(ctx):
    import copy

    from csd_compile.quant import quantize_

    model = ctx.load("bf16")
    return _csd_generate_runner(model, ctx, draft=quantize_(copy.deepcopy(model), bits=4, group_size=64))


def _eager_rung(bits: int):
    def setup(ctx):
        from csd_compile.quant import quantize_, set_bits

        model = quantize_(ctx.load("bf16"), bits=8, group_size=64)  # one stored copy ...
        set_bits(model, bits)  # ... read at this rung
        return _hf_runner(model, ctx)

    return setup


for _b in (8, 4, 3, 2):  # FlexQuant's rungs without the compiler: QLinear modules, eager HF generate
    system(f"qlinear-eager-b{_b}", f"HF greedy, bf16, eager, quantize_ (nested g64) read at its {_b}-bit rung",
           default=False, precision=Precision(bits=_b))(_eager_rung(_b))


@system("csd-int8", "HF greedy, static cache, backend='csd' with options bits=8 (weights at 8 bits)",
        precision=Precision(bits=8))
def csd_int8(ctx):
    return _static_compiled(ctx, "csd", {"bits": 8})


@system("csd-int4", "HF greedy, static cache, backend='csd' with options bits=4 (weights at 4 bits)",
        precision=Precision(bits=4))
def csd_int4(ctx):
    return _static_compiled(ctx, "csd", {"bits": 4})


@system("csd-int3", "HF greedy, static cache, backend='csd' with options bits=3 (weights at 3 bits)", default=False,
        precision=Precision(bits=3))
def csd_int3(ctx):
    return _static_compiled(ctx, "csd", {"bits": 3})


@system("csd-int2", "HF greedy, static cache, backend='csd' with options bits=2 (weights at 2 bits)", default=False,
        precision=Precision(bits=2))
def csd_int2(ctx):
    return _static_compiled(ctx, "csd", {"bits": 2})


def _torchao_missing():
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install --no-deps torchao)"
    return None


def _not_lm_head(module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")


@system("torchao-int8", "HF greedy, static cache, Inductor, torchao int8 weight-only (LM head bf16)",
        available=_torchao_missing, precision=Precision(weight_format=TORCHAO_INT8))
def torchao_int8(ctx):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = ctx.load("bf16")
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=_not_lm_head)
    return _static_compiled(ctx, "inductor", model=model)


@system("torchao-int4", "HF greedy, static cache, Inductor, torchao int4 weight-only g64, its CPU "
        "layout (Int4OpaqueTensor; LM head bf16)", available=_torchao_missing,
        precision=Precision(weight_format=TORCHAO_INT4_G64))
def torchao_int4(ctx):
    # torchao 0.18's Int4WeightOnlyConfig has no CPU packing format without extra packages; its
    # CPU int4 tensor (PyTorch's _weight_int4pack_mm_for_cpu underneath) is applied directly.
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    model = ctx.load("bf16")
    for fqn, module in model.named_modules():
        if _not_lm_head(module, fqn):
            w = module.weight.detach()
            module.weight = torch.nn.Parameter(Int4OpaqueTensor.from_hp(w, [1, 64]), requires_grad=False)
    return _static_compiled(ctx, "inductor", model=model)


@system("csd-tp2", "csd-int4's configuration tensor-parallel over 2 torchrun ranks (gloo on CPU; ranks "
        "share this machine's cores and memory bus)", default=False, plain="csd-int4", precision=Precision(bits=4))
def csd_tp2(ctx):
    import atexit

    from .tp_server import TPServer

    greedy = ctx.greedy_kwargs()
    server = TPServer(model=ctx.model_name, options={"bits": 4}, max_new_tokens=ctx.max_new_tokens,
                      max_cache_len=ctx.max_cache_len, pad_token_id=greedy["pad_token_id"])
    atexit.register(server.close)

    def run(ids):
        reply = server(ids)
        return {"ids": torch.tensor([ids[0].tolist() + reply["tokens"]])}

    return run
