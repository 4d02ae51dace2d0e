"""generate(): greedy identical to HF greedy, batches, EOS, HF custom_generate, sampling, bad input.

The step runs eagerly here (compile_backend=None); tests/speculative/test_step_compile.py compiles it.
"""

import copy

import pytest
import torch
from tests.conftest import make_tiny_llama

import csd_compile
from csd_compile.speculative import generate

NO_EOS = []


def _perturbed(model, noise=0.005, seed=5):
    """A draft that agrees with ``model`` often but not always (acceptance varies step to step)."""
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return d


def _prompt(B=1, S=12, seed=1, vocab=128):
    return torch.randint(3, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)


@pytest.fixture(scope="module")
def target():
    return make_tiny_llama(0)


@pytest.mark.parametrize("draft", ["ngram", "model", "self", "other_seed"])
def test_greedy_identical_to_hf(target, draft):
    d = {"model": _perturbed(target), "other_seed": make_tiny_llama(1)}.get(draft, draft)
    for seed in (1, 2):
        ids = _prompt(seed=seed)
        ref = _hf_greedy(target, ids, 40)
        out, stats = generate(target, ids, draft=d, max_new_tokens=40, eos_token_id=NO_EOS,
                              compile_backend=None, return_stats=True)
        assert torch.equal(out, ref)
        assert stats["new_tokens"] == 40
        assert stats["tokens_per_target_forward"] == pytest.approx(40 / (stats["steps"] + 1))  # + the prefill
        assert 0 <= stats["mean_accepted"] <= stats["num_draft_tokens"]


def test_batch_left_padding_rows_advance_independently(target):
    ids = _prompt(B=3, S=14, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0
    ids = ids.masked_fill(mask == 0, 0)
    out, stats = generate(target, ids, attention_mask=mask, draft=_perturbed(target), max_new_tokens=30,
                          eos_token_id=NO_EOS, compile_backend=None, return_stats=True)
    for b in range(3):  # each row equals its own unpadded greedy decoding
        row = ids[b : b + 1, mask[b].bool()]
        ref = _hf_greedy(target, row, 30)
        assert out[b, 14:].tolist() == ref[0, row.shape[1] :].tolist()
    # rows accepted different numbers of drafts, yet all got exactly 30 tokens
    assert stats["new_tokens"] == 90 and stats["steps"] < 30
    assert 0 < stats["prefill_seconds"] < stats["seconds"]


def test_eos_inside_accepted_run_ends_row_there(target):
    ids = _prompt(B=2, S=10, seed=4)
    ref = _hf_greedy(target, ids, 12)
    eos = ref[0, 10 + 2].item()  # the target itself as draft: every draft is accepted, EOS mid-run
    assert eos not in ref[0, 10:12].tolist()
    out, stats = generate(target, ids, draft=target, num_draft_tokens=4, max_new_tokens=12,
                          eos_token_id=eos, compile_backend=None, return_stats=True)
    assert stats["mean_accepted"] == 4.0 or stats["steps"] > 1
    assert out[0, 10:13].tolist() == ref[0, 10:13].tolist()
    assert (out[0, 13:] == eos).all()  # no pad_token_id in this config: padded with EOS, as HF does
    row1 = ref[1, 10:].tolist()
    end = row1.index(eos) + 1 if eos in row1 else 12
    assert out[1, 10 : 10 + end].tolist() == row1[:end]
    assert out.shape[1] == 10 + end or out.shape[1] == 13


def test_hf_custom_generate_path(target):
    ids = _prompt(seed=6)
    ref = _hf_greedy(target, ids, 25)
    out = target.generate(ids, custom_generate=generate, draft="ngram", max_new_tokens=25, eos_token_id=NO_EOS,
                          compile_backend=None, pad_token_id=0)
    assert torch.equal(out, ref)
    # with a left-padded batch and attention_mask through HF's input preparation
    ids2 = _prompt(B=2, S=12, seed=7)
    mask = torch.ones_like(ids2)
    mask[0, :3] = 0
    ids2 = ids2.masked_fill(mask == 0, 0)
    out2 = target.generate(ids2, attention_mask=mask, custom_generate=generate, draft=_perturbed(target),
                           max_new_tokens=15, eos_token_id=NO_EOS, compile_backend=None, pad_token_id=0)
    ref2 = _hf_greedy(target, ids2[1:], 15)
    assert torch.equal(out2[1:], ref2)
    ref0 = _hf_greedy(target, ids2[:1, 3:], 15)
    assert out2[0, 12:].tolist() == ref0[0, 9:].tolist()


def test_on_a_model_compiled_with_csd_backend(target):
    compiled = torch.compile(target, backend="csd")
    ids = _prompt(seed=8)
    ref = _hf_greedy(target, ids, 20)
    out = csd_compile.generate(compiled, ids, draft="ngram", max_new_tokens=20, eos_token_id=NO_EOS,
                               compile_backend=None)
    assert torch.equal(out, ref)
    out = compiled.generate(ids, custom_generate=csd_compile.generate, draft="self", max_new_tokens=20,
                            eos_token_id=NO_EOS, compile_backend=None, pad_token_id=0)
    assert torch.equal(out, ref)


def test_streamer_receives_prompt_then_every_new_token(target):
    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, t):
            self.puts.append(t.reshape(-1).tolist())

        def end(self):
            self.ended = True

    s = Collect()
    ids = _prompt(seed=9)
    out = generate(target, ids, draft="ngram", max_new_tokens=17, eos_token_id=NO_EOS, streamer=s,
                   compile_backend=None)
    assert s.ended and s.puts[0] == ids[0].tolist()
    assert sum(s.puts[1:], []) == out[0, 12:].tolist()


@pytest.mark.parametrize("draft", ["model", "self"])
def test_sampling_matches_target_distribution(draft):
    """Seeded chi-square: the first two sampled tokens follow the target's joint distribution (a
    separate draft model, and the 2-bit self draft reading the target's keys and values)."""
    from scipy.stats import chi2

    V, B = 8, 4000
    target = make_tiny_llama(0, vocab_size=V)
    draft = _perturbed(target, noise=0.2) if draft == "model" else "self"
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    torch.manual_seed(0)
    out, stats = generate(target, prompt.expand(B, 5), draft=draft, draft_bits=2, num_draft_tokens=2,
                          max_new_tokens=2, temperature=0.9, top_p=0.95, eos_token_id=NO_EOS, compile_backend=None,
                          max_cache_len=16, return_stats=True)
    assert 0 < stats["mean_accepted"] < 2
    from csd_compile.speculative.acceptance import logits_to_probs

    with torch.no_grad():
        p1 = logits_to_probs(target(prompt).logits[0, -1], 0.9, 0.95)  # [V]
        cont = torch.cat([prompt.expand(V, 5), torch.arange(V).view(V, 1)], dim=1)
        p2 = logits_to_probs(target(cont).logits[:, -1], 0.9, 0.95)  # [V, V]
    joint = (p1.view(V, 1) * p2).reshape(-1).double()
    counts = torch.bincount(out[:, 5] * V + out[:, 6], minlength=V * V).double()
    assert counts[joint == 0].sum() == 0  # never a token outside the nucleus
    exp = joint * B
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([exp[big], exp[~big].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    assert stat < chi2.ppf(1 - 1e-4, int(keep.sum()) - 1)


def test_other_vocabulary_draft_is_rejected(target):
    other = make_tiny_llama(0, vocab_size=96)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(target, _prompt(), draft=other, max_new_tokens=5, compile_backend=None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_draft_tokens=0), "num_draft_tokens"),
        (dict(num_draft_tokens=65), "num_draft_tokens"),
        (dict(max_new_tokens=300), "static cache"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(draft="medusa"), "draft"),
        (dict(attention_mask=torch.tensor([[1] * 11 + [0]])), "left padding"),
        (dict(bogus=1), "unexpected"),
    ],
)
def test_bad_input_raises_before_work(target, kwargs, match):
    kw = dict(draft="ngram", max_new_tokens=5, compile_backend=None)
    kw.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        generate(target, _prompt(), **kw)


def test_prompt_longer_than_cache_and_unequal_rows(target):
    with pytest.raises(ValueError, match="longer than the static cache"):
        generate(target, _prompt(S=300), draft="ngram", max_new_tokens=5, compile_backend=None)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(target, [[5, 6, 7], [5, 6]], draft="ngram", max_new_tokens=5, compile_backend=None)


def test_self_draft_reads_target_kv_as_seeding_does(target):
    """The "self" draft's first proposal of every step is the argmax of ``shared_kv_logits`` along
    the target's greedy text (the teacher-forced form seeding uses): the draft reads the target's
    keys and values of every earlier slot, its own only for the token it feeds."""
    from csd_compile.speculative.acceptance import greedy_accept
    from csd_compile.speculative.drafts import make_self_draft, shared_kv_logits

    steps = []  # (first draft, accepted) of every step

    def recording(drafts, logits):
        out, n = greedy_accept(drafts, logits)
        steps.append((int(drafts[0, 0]), int(n[0])))
        return out, n

    S, N = 10, 24
    ids = _prompt(S=S, seed=7)
    out = generate(target, ids, draft="self", draft_bits=2, num_draft_tokens=3, max_new_tokens=N,
                   eos_token_id=NO_EOS, compile_backend=None, acceptance=recording)
    assert torch.equal(out, _hf_greedy(target, ids, N))  # still lossless
    _, d_logits = shared_kv_logits(target, make_self_draft(target, bits=2), out[0])
    d_top = d_logits.argmax(-1)
    emitted = 1  # the prefill emits the first new token
    for first, n in steps:  # a step feeds slot S + emitted - 1 and proposes the token after it
        assert first == int(d_top[S + emitted - 1])
        emitted += n + 1
    assert emitted >= N and any(n < 3 for _, n in steps)  # 2-bit drafts: some steps were rejected


def test_every_row_padded_prefill_skips_the_shared_padding(target):
    """All rows left-padded (the prefill starts at the first real token of any row) after an earlier
    call in the same engine left stale keys and values in those slots: every row still equals its
    own unpadded greedy decoding."""
    kw = dict(draft="self", max_new_tokens=20, eos_token_id=NO_EOS, compile_backend=None, max_cache_len=64)
    generate(target, _prompt(B=2, S=16, seed=4), **kw)  # fills slots 0..16 of both rows
    ids = _prompt(B=2, S=16, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    out = generate(target, ids, attention_mask=mask, **kw)
    for b in range(2):
        row = ids[b : b + 1, mask[b].bool()]
        assert out[b, 16:].tolist() == _hf_greedy(target, row, 20)[0, row.shape[1] :].tolist()


def test_shared_kv_logits_same_under_eager_attention():
    """The additive-mask path (eager attention) gives the boolean-mask (SDPA) path's logits."""
    from csd_compile.speculative.drafts import make_self_draft, shared_kv_logits

    ids = _prompt(S=20, seed=9)[0]
    out = {}
    for impl in ("sdpa", "eager"):
        model = make_tiny_llama(0, attn_implementation=impl)
        out[impl] = shared_kv_logits(model, make_self_draft(model, bits=2), ids)
    for a, b in zip(out["sdpa"], out["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[1, 2, 128]]), r"token id 128, outside the model's vocabulary \[0, 127\]"),
    (torch.tensor([[1, -3, 2]]), r"token id -3, outside the model's vocabulary"),
    (torch.zeros(0, 4, dtype=torch.int64), r"input_ids has no rows"),
])
def test_ids_outside_the_vocabulary_or_no_rows_are_refused_before_work(ids, message):
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=message):
        generate(model, ids, draft="ngram", max_new_tokens=4, compile_backend=None)
    assert "_csd_speculative_engines" not in model.__dict__  # nothing was built


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -1.0])
def test_temperature_must_be_finite(temperature):
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        generate(make_tiny_llama(), torch.tensor([[1, 2, 3]]), draft="ngram", max_new_tokens=4,
                 temperature=temperature, compile_backend=None)


def test_cuda_graph_modes_warn_that_the_draft_verify_step_runs_without_them():
    import warnings

    from csd_compile.speculative.generate import warn_if_graphs_requested

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.warns(UserWarning, match=rf"mode='{mode}' asks for CUDA graphs, which the draft-verify step"):
            warn_if_graphs_requested({"bits": 4, "mode": mode}, cuda)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_graphs_requested({"mode": "reduce-overhead"}, cpu)  # nothing to capture on CPU
        warn_if_graphs_requested({"mode": "max-autotune-no-cudagraphs"}, cuda)
        warn_if_graphs_requested(None, cuda)


def test_more_engines_than_dynamos_recompile_limit_each_compile_their_own_step(target):
    """Every engine (a K, a cache size, a draft) compiles build_step's step function; on one shared
    code object the engine past Dynamo's recompile limit failed (fullgraph). Each now compiles a copy
    of its own. The limit is lowered to 2 so that four engines cross it."""
    ids = _prompt(seed=7)
    ref = _hf_greedy(target, ids, 9)
    with torch._dynamo.config.patch(recompile_limit=2):
        for k in (1, 2, 3, 4):
            out = generate(target, ids, draft="self", num_draft_tokens=k, max_new_tokens=9, eos_token_id=NO_EOS,
                           compile_backend="eager")
            assert torch.equal(out, ref)
