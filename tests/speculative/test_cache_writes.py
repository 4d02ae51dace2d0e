"""The speculative caches' writes: each touches exactly the slots it names, and a compiled step that
writes one buffer several times (a model draft's cache: the verified slots, then one slot per drafted
token) writes it in place rather than cloning the whole buffer and copying it back."""

import re

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code

from csd_compile.speculative import generate
from csd_compile.speculative.cache import RowCache, slot_index
from csd_compile.speculative.drafts import ModelDraft
from tests.conftest import make_tiny_llama, tiny_llama_config


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 5), heads=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_update_writes_each_rows_slots_and_nothing_else(B, T, heads, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    L, D = 12, 8
    cfg = tiny_llama_config(num_attention_heads=heads, num_key_value_heads=heads, hidden_size=heads * D,
                            num_hidden_layers=2)
    cache = RowCache(cfg, B, L, dtype=dtype)
    for buf in cache.keys + cache.values:
        buf.copy_(torch.randn(buf.shape, generator=g))
    before = [buf.clone() for buf in cache.keys + cache.values]
    start = torch.randint(0, L - T + 1, (B,), generator=g)
    cache.start.copy_(start)
    k, v = torch.randn(B, heads, T, D, generator=g), torch.randn(B, heads, T, D, generator=g)  # fp32, cast on write
    out_k, out_v = cache.update(k, v, 1)
    assert out_k is cache.keys[1] and out_v is cache.values[1]
    want_k, want_v = before[1].clone(), before[3].clone()
    for b in range(B):
        s = int(start[b])
        want_k[b, :, s : s + T] = k[b].to(dtype)
        want_v[b, :, s : s + T] = v[b].to(dtype)
    assert torch.equal(cache.keys[1], want_k) and torch.equal(cache.values[1], want_v)
    assert torch.equal(cache.keys[0], before[0]) and torch.equal(cache.values[0], before[2])  # other layer untouched


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), K=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_copy_verified_copies_the_last_verify_pass_slots_per_row(B, K, seed):
    g = torch.Generator().manual_seed(seed)
    cfg = tiny_llama_config()
    L = 16
    draft = ModelDraft(make_tiny_llama(0), K, share_target_kv=True)
    target_cache = RowCache(cfg, B, L, dtype=torch.float32)
    draft.allocate(B, L, torch.float32, "cpu", target_cache)
    for buf in draft.cache.keys + draft.cache.values + target_cache.keys + target_cache.values:
        buf.copy_(torch.randn(buf.shape, generator=g))
    before = [buf.clone() for buf in draft.cache.keys + draft.cache.values]
    length = torch.randint(2, L + 1, (B,), generator=g)
    draft._copy_verified(length)
    for mine, old, theirs in zip(draft.cache.keys + draft.cache.values, before,
                                 target_cache.keys + target_cache.values):
        want = old.clone()
        for b in range(B):
            lo, hi = max(int(length[b]) - 2 - K, 0), int(length[b]) - 1  # slots lo .. length - 2
            want[b, :, lo:hi] = theirs[b, :, lo:hi]
        assert torch.equal(mine, want)
    # the target's cache is only read
    assert all(t.data_ptr() != m.data_ptr() for t, m in zip(target_cache.keys, draft.cache.keys))


def test_slot_index_selects_every_head_of_each_rows_slots():
    cache = torch.arange(2 * 3 * 7 * 2).view(2, 3, 7, 2)
    slots = torch.tensor([[1, 2], [5, 6]])
    got = cache[slot_index(slots, 3)]
    assert got.shape == (2, 3, 2, 2)
    assert torch.equal(got[0], cache[0, :, 1:3]) and torch.equal(got[1], cache[1, :, 5:7])


def test_compiled_self_draft_step_writes_the_caches_in_place():
    """A self draft's cache is written K + 1 times per step. Written through a transposed view, Inductor
    cloned each such buffer at the step's start and copied it back at its end (for the embedded model,
    60 buffers read and written twice per step); written through the buffer itself, no loop of the
    generated code runs over a whole buffer and none of a buffer's size is allocated."""
    target = make_tiny_llama(0)
    cfg = target.config
    L = 200  # 2 heads x 200 slots x 16 = 6400 elements per buffer: a size nothing else in the step has
    numel = cfg.num_key_value_heads * L * (cfg.hidden_size // cfg.num_attention_heads)
    ids = torch.tensor([[5, 9, 17, 5, 9, 17, 40]])
    out, codes = run_and_get_code(generate, target, ids, draft="self", num_draft_tokens=3, max_new_tokens=6,
                                  eos_token_id=[], max_cache_len=L, compile_backend="csd")
    assert codes, "the step was not compiled by Inductor"
    step = max(codes, key=len)
    assert not re.search(rf"<static_cast<int64_t>\({numel}L\)", step), "a loop over a whole cache buffer"
    assert not re.search(rf"empty_strided_cpu\(\(1, ({L}, 2|2, {L}), 16\)", step), "a cache-sized buffer"
    ref = target.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref)  # lossless: the target's own greedy tokens
