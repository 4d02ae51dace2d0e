"""Online Correction Memory: update rule, eviction bound, decay, save/load and bad input."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.speculative.memory import (
    COUNT_MAX,
    CorrectionMemory,
    MemoryFileError,
    bucket_of,
    pair_key,
    tokenizer_fingerprint,
)


class _Tok:
    def __init__(self, vocab):
        self._vocab = vocab

    def get_vocab(self):
        return dict(self._vocab)


TOK_A = _Tok({"a": 0, "b": 1, "c": 2})
TOK_B = _Tok({"a": 0, "b": 2, "c": 1})


class _DictModel:
    """The update rule written with Python dicts/lists: the specification."""

    def __init__(self, S, W):
        self.S, self.W = S, W
        self.keys = [[-1] * W for _ in range(S)]
        self.counts = [[0] * W for _ in range(S)]

    def record(self, d, t):
        s, k = bucket_of(d, t, self.S), pair_key(d, t)
        ks, cs = self.keys[s], self.counts[s]
        if k in ks:
            i = ks.index(k)
            cs[i] = min(cs[i] + 1, COUNT_MAX)
        else:
            i = ks.index(-1) if -1 in ks else cs.index(min(cs))
            ks[i], cs[i] = k, 1


def test_counts_and_threshold():
    mem = CorrectionMemory(num_buckets=16, ways=4, lambda_=6)
    d, t = torch.tensor(1234), torch.tensor(5678)
    for n in range(1, 9):
        mem.record(d, t)
        assert int(mem.count(d, t)) == n
        assert bool(mem.is_frequent(d, t)) == (n > 6)
    assert int(mem.count(torch.tensor(5678), torch.tensor(1234))) == 0  # ordered pair
    assert mem.top_pairs(1) == [(1234, 5678, 8)]


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 8),
    st.sampled_from([1, 2, 4]),
    st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=120),
)
def test_update_rule_matches_spec(S, W, pairs):
    mem = CorrectionMemory(num_buckets=S, ways=W)
    ref = _DictModel(S, W)
    d = torch.tensor([p[0] for p in pairs])
    t = torch.tensor([p[1] for p in pairs])
    mem.record(d, t)
    for a, b in pairs:
        ref.record(a, b)
    assert mem.keys.tolist() == ref.keys
    assert mem.counts.tolist() == ref.counts
    assert int(mem.num_pairs()) <= S * W


def test_bounded_for_any_vocabulary_and_eviction_keeps_frequent():
    rng = random.Random(0)
    mem = CorrectionMemory(num_buckets=4, ways=2)
    hot = (7, 9)
    for _ in range(20):
        mem.record(torch.tensor(hot[0]), torch.tensor(hot[1]))
    # a stream of never-repeating pairs from a 2**30 vocabulary
    for _ in range(300):
        mem.record(torch.tensor(rng.randrange(2**30)), torch.tensor(rng.randrange(2**30)))
    assert mem.keys.shape == (4, 2) and int(mem.num_pairs()) <= 8
    # the hot pair is never the smallest in its bucket, so it survives
    assert int(mem.count(torch.tensor(hot[0]), torch.tensor(hot[1]))) == 20


def test_decay_halves_and_frees():
    mem = CorrectionMemory(num_buckets=8, ways=2)
    mem.record(torch.tensor([1, 1, 1, 2]), torch.tensor([3, 3, 3, 4]))
    mem.decay()
    assert int(mem.count(torch.tensor(1), torch.tensor(3))) == 1
    assert int(mem.count(torch.tensor(2), torch.tensor(4))) == 0
    assert int(mem.num_pairs()) == 1


def test_save_load_roundtrip(tmp_path):
    fp = tokenizer_fingerprint(TOK_A)
    mem = CorrectionMemory(num_buckets=32, ways=4, lambda_=3, fingerprint=fp)
    g = torch.Generator().manual_seed(0)
    mem.record(torch.randint(0, 40, (200,), generator=g), torch.randint(0, 40, (200,), generator=g))
    mem.save(tmp_path / "m.ocm")
    back = CorrectionMemory.load(tmp_path / "m.ocm", TOK_A)
    assert torch.equal(back.keys, mem.keys) and torch.equal(back.counts, mem.counts)
    assert back.lambda_ == 3 and back.fingerprint == fp


def test_fingerprint_real_tokenizer(smollm2):
    _, tok = smollm2
    fp = tokenizer_fingerprint(tok)
    assert fp == tokenizer_fingerprint(tok) and len(fp) == 64
    assert fp != tokenizer_fingerprint(TOK_A)


def test_load_other_tokenizer_is_error(tmp_path):
    mem = CorrectionMemory(num_buckets=4, ways=2, fingerprint=tokenizer_fingerprint(TOK_A))
    mem.record(torch.tensor(1), torch.tensor(2))
    mem.save(tmp_path / "m.ocm")
    with pytest.raises(MemoryFileError, match="another tokenizer"):
        CorrectionMemory.load(tmp_path / "m.ocm", TOK_B)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "bad_header", "bad_shape", "version", "missing"])
def test_load_corrupt_is_error(tmp_path, damage):
    fp = tokenizer_fingerprint(TOK_A)
    path = tmp_path / "m.ocm"
    mem = CorrectionMemory(num_buckets=4, ways=2, fingerprint=fp)
    mem.save(path)
    state = mem.state_dict()
    if damage == "garbage":
        path.write_bytes(b"\x00not a torch file" * 10)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "bad_header":
        state["header"] = "{not json"
        torch.save(state, path)
    elif damage == "bad_shape":
        state["keys"] = state["keys"][:2]
        torch.save(state, path)
    elif damage == "version":
        state["header"] = state["header"].replace('"version": 1', '"version": 99')
        torch.save(state, path)
    else:
        path = tmp_path / "nope.ocm"
    with pytest.raises(MemoryFileError):
        CorrectionMemory.load(path, fingerprint=fp)


@pytest.mark.parametrize(
    "kwargs",
    [dict(lambda_=-1), dict(lambda_=float("nan")), dict(num_buckets=0), dict(ways=3), dict(ways=True)],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        CorrectionMemory(**kwargs)


def test_save_without_fingerprint_is_error(tmp_path):
    with pytest.raises(ValueError, match="fingerprint"):
        CorrectionMemory(num_buckets=2, ways=1).save(tmp_path / "m.ocm")


def test_seed_from_prompts_counts_disagreements():
    from tests.conftest import make_tiny_llama

    from csd_compile.speculative.memory import seed_from_prompts

    target, draft = make_tiny_llama(0), make_tiny_llama(1)
    tok = _Tok({f"t{i}": i for i in range(128)})
    prompts = [[5, 17, 3, 99], torch.tensor([1, 2, 3, 4, 5, 6])]
    mem = CorrectionMemory(num_buckets=1024, ways=8)
    n = seed_from_prompts(mem, target, tok, prompts, draft=draft, max_new_tokens=8, progress=False)
    # independent count: the same disagreements, computed here
    expected = []
    for p in prompts:
        ids = torch.as_tensor(p).reshape(1, -1)
        with torch.no_grad():
            text = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
            t = target(text).logits.argmax(-1)[0, ids.shape[1] - 1 : -1]
            d = draft(text).logits.argmax(-1)[0, ids.shape[1] - 1 : -1]
        expected += [(int(a), int(b)) for a, b in zip(d, t) if a != b]
    assert n == len(expected) > 0
    assert int(mem.counts.sum()) == n  # big table: nothing evicted
    for a, b in set(expected):
        assert int(mem.count(torch.tensor(a), torch.tensor(b))) == expected.count((a, b))
    assert mem.fingerprint == tokenizer_fingerprint(tok)
    with pytest.raises(ValueError, match="another tokenizer"):
        seed_from_prompts(mem, target, TOK_B, prompts, draft=draft, max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        seed_from_prompts(mem, target, tok, prompts, draft=draft, max_new_tokens=0, progress=False)


def test_seed_self_draft_counts_what_the_live_step_rejects():
    """Seeding with the "self" draft (which reads the target's keys and values) records every
    first-proposal rejection the live engine meets along the same greedy text."""
    from tests.conftest import make_tiny_llama

    from csd_compile.speculative import generate
    from csd_compile.speculative.acceptance import greedy_accept
    from csd_compile.speculative.memory import seed_from_prompts

    target = make_tiny_llama(0)
    tok = _Tok({f"t{i}": i for i in range(128)})
    prompt = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(11))
    rejected = []

    def recording(drafts, logits):
        out, n = greedy_accept(drafts, logits)
        if int(n[0]) == 0:
            rejected.append((int(drafts[0, 0]), int(out[0, 0])))  # (draft, the target's token)
        return out, n

    generate(target, prompt, draft="self", draft_bits=2, num_draft_tokens=3, max_new_tokens=16, eos_token_id=[],
             compile_backend=None, acceptance=recording)
    mem = CorrectionMemory(num_buckets=1024, ways=8)
    seed_from_prompts(mem, target, tok, [prompt[0]], draft="self", draft_bits=2, max_new_tokens=16, progress=False)
    assert rejected
    for d, t in set(rejected):
        assert int(mem.count(torch.tensor(d), torch.tensor(t))) >= rejected.count((d, t))
