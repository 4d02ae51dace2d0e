"""The benchmark systems. Adding one is one small function: ``@system(name, description)`` on a
``setup(ctx)`` that returns ``run(input_ids) -> {"ids": ...}``. Later features add their rows here."""

from __future__ import annotations

import importlib.util

import torch

from .harness import BenchContext, system


def _hf_runner(model, ctx: BenchContext, **extra):
    kwargs = ctx.greedy_kwargs() | extra

    def run(ids):
        return {"ids": model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)}

    return run


@system("hf-fp32", "plain HF greedy, fp32, eager")
def hf_fp32(ctx):
    return _hf_runner(ctx.load("fp32"), ctx)


@system("hf-bf16", "plain HF greedy, bf16, eager (the baseline)")
def hf_bf16(ctx):
    return _hf_runner(ctx.load("bf16"), ctx)


def _static_compiled(ctx, backend: str, options=None):
    from csd_compile.models.hf_generate import compile_config

    return _hf_runner(
        ctx.load("bf16"),
        ctx,
        cache_implementation="static",
        max_cache_len=ctx.max_cache_len,
        compile_config=compile_config(options, backend=backend),
    )


@system("hf-inductor-static", "HF greedy, bf16, static cache, decode step compiled by Inductor")
def hf_inductor(ctx):
    return _static_compiled(ctx, "inductor")


@system("hf-prompt-lookup", "HF assisted generation with prompt lookup (10 tokens), bf16")
def hf_prompt_lookup(ctx):
    return _hf_runner(ctx.load("bf16"), ctx, prompt_lookup_num_tokens=10)


@system("csd", "HF greedy, bf16, static cache, decode step compiled by backend='csd'")
def csd_static(ctx):
    return _static_compiled(ctx, "csd")


def _llama_cpp_missing():
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (optional: pip install llama-cpp-python, ~10 min build)"
    return None


@system("llama.cpp", "llama.cpp (llama-cpp-python) on the same GGUF file, 2 threads, greedy",
        available=_llama_cpp_missing)
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
