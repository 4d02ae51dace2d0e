"""Rank-side bodies of the tensor-parallel tests (spawned by ``_spawn.run_ranks``)."""

from __future__ import annotations

import copy

import torch
from torch._dynamo.utils import counters

from tests.conftest import make_tiny_llama

NEW = 16
GROUP = 32  # divides every row-parallel shard of the tiny models below at TP=2


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _prompt() -> torch.Tensor:
    # a repetitive prompt so that prompt lookup has something to propose
    g = torch.Generator().manual_seed(7)
    base = torch.randint(3, 128, (6,), generator=g)
    return torch.cat([base, base, base[:4]]).view(1, -1)


def _hf_greedy(model, ids, **kw):
    out = model.generate(ids, do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones_like(ids), **kw)
    return out[0, ids.shape[1]:].tolist()


@torch.inference_mode()
def _prefill_then_decode(prefill_model, decode_model, ids) -> list[int]:
    """Greedy tokens as HF generate makes them with a compiled decode step: the prompt through
    ``prefill_model`` (eager, full precision), every later token through ``decode_model``."""
    out = prefill_model(ids, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    new = [int(tok)]
    for _ in range(NEW - 1):
        out = decode_model(tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(int(tok))
    return new


def _compiled_greedy(model, ids, options):
    from csd_compile.models.hf_generate import compile_config

    return _hf_greedy(model, ids, cache_implementation="static", compile_config=compile_config(options))


def _memory_state(memory) -> list:
    return [memory.keys.sum().item(), memory.counts.sum().item(), int((memory.counts > 0).sum())]


def decode_matrix(rank: int, overrides: dict, full_matrix: bool) -> dict:
    """Greedy tokens of one process (the full model, eager) and of this rank's shard (compiled),
    for plain decoding, bits 4 and 8, and the speculative engine; graphs compiled per phase.
    Without ``full_matrix``: plain decoding and the self draft, both eager."""
    import csd_compile
    from csd_compile import parallel
    from csd_compile.quant import quantize_, set_bits
    from csd_compile.speculative.memory import CorrectionMemory

    info = parallel.init("gloo", timeout_s=300)
    full = make_tiny_llama(0, **overrides)
    ids = _prompt()
    res: dict = {"world": info.world, "graphs": {}}
    with torch.inference_mode():
        ref = _hf_greedy(full, ids)
        sharded = parallel.shard_model(full)
        res["kv_heads"] = sharded.config.num_key_value_heads

        def phase(name, fn, expect_same=None):
            before = _graphs()
            res[name] = fn()
            res["graphs"][name] = _graphs() - before
            if expect_same is not None:
                res[f"{name}_ref"] = expect_same

        if not full_matrix:  # eager only: the split itself, without paying for compiles
            phase("plain", lambda: _hf_greedy(sharded, ids), ref)
            phase("self", lambda: csd_compile.generate(sharded, ids, draft="self", max_new_tokens=NEW, eos_token_id=[],
                                                       compile_backend=None)[0, ids.shape[1]:].tolist(), ref)
            return res
        phase("plain", lambda: _compiled_greedy(sharded, ids, None), ref)
        before = _graphs()
        res["plain_again"] = _compiled_greedy(sharded, ids, None)
        res["graphs"]["plain_again"] = _graphs() - before
        phase("self", lambda: csd_compile.generate(sharded, ids, draft="self", max_new_tokens=NEW, eos_token_id=[])
              [0, ids.shape[1]:].tolist(), ref)
        phase("ngram", lambda: csd_compile.generate(sharded, ids, draft="ngram", max_new_tokens=NEW, eos_token_id=[])
              [0, ids.shape[1]:].tolist(), ref)

        # bits: the reference quantizes the whole model eagerly (same nested format and groups);
        # like HF's compiled generate, it prefills at full precision and decodes quantized
        ref_q = quantize_(copy.deepcopy(full), bits=4, group_size=GROUP)
        ref4 = _prefill_then_decode(full, ref_q, ids)
        set_bits(ref_q, 8)
        ref8 = _prefill_then_decode(full, ref_q, ids)
        q = parallel.shard_model(full)  # a fresh shard: its own quantized copies
        phase("bits4", lambda: _compiled_greedy(q, ids, {"bits": 4, "group_size": GROUP}), ref4)
        set_bits(q, 8)  # the replicated bit-width: a switch on every rank, no recompile
        phase("bits8", lambda: _compiled_greedy(q, ids, {"bits": 4, "group_size": GROUP}), ref8)

        # CSD: rescue everything the gate admits (lambda 0); the memory must match one process's
        mem_ref, mem_tp = CorrectionMemory(lambda_=0), CorrectionMemory(lambda_=0)
        kw = dict(draft="self", max_new_tokens=NEW, eos_token_id=[], acceptance="csd", lam=0, tau=0.05)
        csd_ref = csd_compile.generate(full, ids, compile_backend=None, memory=mem_ref, **kw)[0, ids.shape[1]:]
        phase("csd", lambda: csd_compile.generate(sharded, ids, memory=mem_tp, **kw)[0, ids.shape[1]:].tolist(),
              csd_ref.tolist())
        res["memory"], res["memory_ref"] = _memory_state(mem_tp), _memory_state(mem_ref)
    return res


def embedded_drafts(rank: int) -> dict:
    """The embedded model (9 query / 3 KV heads: 6 + 3 per rank), fp32, eager: plain greedy, the
    speculative engine with the n-gram and self drafts, and bits 8 and 4 on the shard (group 64, then
    group 32 on the file's grid), against one process's greedy."""
    import csd_compile
    from csd_compile import load_model, parallel
    from csd_compile.quant import quantize_, set_bits
    from csd_compile.quant.gguf import source_of

    info = parallel.init("gloo", timeout_s=300)
    full, tok = load_model("smollm2-135m-instruct", dtype="fp32")
    ids = tok("def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\ndef fib",
              return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ref = _hf_greedy(full, ids)
        sharded = parallel.shard_model(full, info)
        out = {"ref": ref, "heads": [sharded.config.num_attention_heads, sharded.config.num_key_value_heads],
               "plain": _hf_greedy(sharded, ids)}
        for draft in ("ngram", "self"):
            ids_out, stats = csd_compile.generate(sharded, ids, draft=draft, max_new_tokens=NEW, eos_token_id=[],
                                                  compile_backend=None, return_stats=True)
            out[draft] = ids_out[0, ids.shape[1]:].tolist()
            out[f"{draft}_accepted"] = stats["mean_accepted"]
        # bits 8 then 4, eager: quantize_ on the shard quantizes each rank's slices (groups of 64
        # never straddle the 384 | 192 and 768 | 768 column splits); set_bits switches every rank
        ref_q = quantize_(copy.deepcopy(full), bits=8, group_size=64)
        q = quantize_(parallel.shard_model(full, info), bits=8, group_size=64)
        out["bits8"], out["bits8_ref"] = _hf_greedy(q, ids), _hf_greedy(ref_q, ids)
        set_bits(q, 4)
        set_bits(ref_q, 4)
        out["bits4"], out["bits4_ref"] = _hf_greedy(q, ids), _hf_greedy(ref_q, ids)
        # bits 4 at group 32: every rank's slices on the file's own Q4_1 grid (the shards keep their
        # GGUF source), the same numbers as one process's copy; `full` itself is quantized last
        shard = parallel.shard_model(full, info)
        out["g32_sources"] = [getattr(source_of(m.weight), "type", None) for m in shard.modules()
                              if type(m) in (torch.nn.Linear, parallel.RowParallelLinear)]
        q32 = quantize_(shard, bits=4, group_size=32)
        ref32 = quantize_(full, bits=4, group_size=32)
        out["g32"], out["g32_ref"] = _hf_greedy(q32, ids), _hf_greedy(ref32, ids)
    return out


def failing_rank(rank: int, mode: str) -> None:
    """Rank 1 raises (``mode="raise"``) or hangs (``"hang"``) after joining; rank 0's next
    collective must fail with an error, not wait forever (the group's timeout is 8 s)."""
    import time

    from csd_compile import parallel

    parallel.init("gloo", timeout_s=8)
    if rank == 1:
        if mode == "raise":
            raise RuntimeError("rank 1 fails on purpose")
        time.sleep(600)
    torch.distributed.all_reduce(torch.ones(4))


if __name__ == "__main__":
    import sys

    failing_rank(int(sys.argv[1]), sys.argv[2])
