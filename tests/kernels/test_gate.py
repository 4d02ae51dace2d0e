"""csd::gate: exact tables, the CPU path against the reference, memory-update semantics, bad input."""

import math

import pytest
import torch
import torch._functorch.config
import torch._inductor.config
from torch._inductor.utils import run_and_get_code
from hypothesis import given, settings
from hypothesis import strategies as st

import csd_compile.kernels.gate  # noqa: F401  (registers torch.ops.csd.gate)
from csd_compile.kernels.gate import csd_accept_torch, exact_accept_torch, gate_ref, log_tau_of
from csd_compile.speculative.csd_accept import make_csd_accept
from csd_compile.speculative.acceptance import greedy_accept
from csd_compile.speculative.memory import CorrectionMemory

LOG_TAU = math.log(0.01)


def _table_case(dtype=torch.float32):
    """4 rows, K=3, V=8; see test_exact_table for what each row exercises."""
    g = torch.Generator().manual_seed(0)
    logits = torch.rand(4, 4, 8, generator=g) * -10 - 10  # background in [-20, -10]
    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [2, 0, 0], [4, 6, 0]])
    tops = [[1, 2, 3, 7], [1, 5, 3, 4], [5, 1, 1, 2], [4, 3, 1, 6]]
    for b, row in enumerate(tops):
        for i, t in enumerate(row):
            logits[b, i, t] = 1.0
    logits[1, 1, 2] = 1.0 + math.log(0.5)  # rescue candidate passes the gate (ratio 0.5)
    logits[2, 0, 2] = 1.0 + math.log(0.001)  # fails it (ratio 0.001 < tau)
    mem = CorrectionMemory(num_buckets=16, ways=4)
    mem.record(torch.tensor([2] * 6), torch.tensor([5] * 6))  # (2 -> 5) seen 6 times
    return draft, logits.to(dtype), mem


@pytest.mark.parametrize("impl", ["op", "ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_table(impl, dtype):
    draft, logits, mem = _table_case(dtype)
    fn = torch.ops.csd.gate if impl == "op" else gate_ref
    tokens, n = fn(draft, logits, mem.keys, mem.counts, 6.0, LOG_TAU, True)
    assert tokens.tolist() == [
        [1, 2, 3, 7],  # all match -> bonus
        [1, 2, 3, 4],  # (2,5) counted to 7 > 6, ratio 0.5 >= tau: rescued, then bonus
        [5, -1, -1, -1],  # (2,5) counted to 8, ratio 0.001 < tau: stop with t*
        [4, 3, -1, -1],  # new pair (6,3) counted to 1: stop; pos 2 is past the stop, not counted
    ]
    assert n.tolist() == [3, 3, 0, 1]
    c = lambda d, t: int(mem.count(torch.tensor(d), torch.tensor(t)))  # noqa: E731
    assert (c(2, 5), c(6, 3), c(0, 1)) == (8, 1, 0)
    assert int(mem.num_pairs()) == 2


@pytest.mark.parametrize("impl", ["op", "ref"])
def test_exact_table_memory_disabled(impl):
    draft, logits, mem = _table_case()
    fn = torch.ops.csd.gate if impl == "op" else gate_ref
    tokens, n = fn(draft, logits, mem.keys, mem.counts, float("inf"), LOG_TAU, True)
    assert tokens.tolist() == [[1, 2, 3, 7], [1, 5, -1, -1], [5, -1, -1, -1], [4, 3, -1, -1]]
    assert n.tolist() == [3, 1, 0, 1]
    (ref_tokens, ref_n) = exact_accept_torch(draft, logits)
    assert torch.equal(tokens, ref_tokens) and torch.equal(n, ref_n)


def test_count_then_check_threshold():
    """The occurrence being verified is counted before the threshold test (count > lambda)."""
    draft, logits, _ = _table_case()
    for seeded, rescued in [(5, False), (6, True)]:
        mem = CorrectionMemory(num_buckets=16, ways=4)
        mem.record(torch.tensor([2] * seeded), torch.tensor([5] * seeded))
        _, n = torch.ops.csd.gate(draft[1:2], logits[1:2], mem.keys, mem.counts, 6.0, LOG_TAU, True)
        assert int(n) == (3 if rescued else 1)


def test_update_false_reads_only():
    draft, logits, mem = _table_case()
    keys, counts = mem.keys.clone(), mem.counts.clone()
    tokens, n = torch.ops.csd.gate(draft, logits, mem.keys, mem.counts, 5.0, LOG_TAU, False)
    assert torch.equal(mem.keys, keys) and torch.equal(mem.counts, counts)
    assert n.tolist() == [3, 3, 0, 1]  # (2,5) has 6 > 5: rescued in row 1 without counting


@st.composite
def gate_cases(draw):
    B, K, V = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(2, 40))
    S, W = draw(st.integers(1, 8)), draw(st.sampled_from([1, 2, 4]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    logits = (torch.randn(B, K + 1, V, generator=g) * draw(st.sampled_from([0.5, 3.0]))).to(dtype)
    top = logits.argmax(-1)[:, :K]
    # mostly-agreeing drafts over a small alphabet, so matches, repeats and collisions all happen
    alphabet = min(V, draw(st.integers(2, 6)))
    rand = torch.randint(0, alphabet, (B, K), generator=g)
    agree = torch.rand(B, K, generator=g) < draw(st.sampled_from([0.3, 0.8]))
    draft = torch.where(agree, top, rand)
    if draw(st.booleans()):  # rows proposing fewer than K drafts
        draft = torch.where(torch.rand(B, K, generator=g) < 0.15, -1, draft)
    mem = CorrectionMemory(num_buckets=S, ways=W)
    npairs = draw(st.integers(0, 30))
    mem.record(torch.randint(0, alphabet, (npairs,), generator=g), torch.randint(0, V, (npairs,), generator=g))
    lam = draw(st.sampled_from([0.0, 1.0, 2.0, 6.0, float("inf")]))
    log_tau = draw(st.sampled_from([0.0, math.log(0.5), LOG_TAU, -float("inf")]))
    return draft, logits, mem, lam, log_tau, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(gate_cases())
def test_cpu_op_matches_reference(case):
    draft, logits, mem, lam, log_tau, update = case
    k1, c1 = mem.keys.clone(), mem.counts.clone()
    k2, c2 = mem.keys.clone(), mem.counts.clone()
    t1, n1 = gate_ref(draft, logits, k1, c1, lam, log_tau, update)
    t2, n2 = torch.ops.csd.gate(draft, logits, k2, c2, lam, log_tau, update)
    assert torch.equal(t1, t2) and torch.equal(n1, n2)
    assert torch.equal(k1, k2) and torch.equal(c1, c2)
    if not update:
        t3, n3 = csd_accept_torch(draft, logits, mem.keys, mem.counts, lam, log_tau)
        assert torch.equal(t1, t3) and torch.equal(n1, n3)
    if lam == float("inf"):
        t4, n4 = exact_accept_torch(draft, logits)
        assert torch.equal(t1, t4) and torch.equal(n1, n4)
        t5, n5 = greedy_accept(draft, logits)  # the engine's lossless rule
        assert torch.equal(t1, t5) and torch.equal(n1, n5)
    # invariants: tokens are accepted drafts, then one target token, then -1
    K = draft.shape[1]
    for b in range(draft.shape[0]):
        nb = int(n1[b])
        assert t1[b, :nb].tolist() == draft[b, :nb].tolist()
        assert int(t1[b, nb]) == int(logits[b, nb].argmax())
        assert (t1[b, nb + 1 :] == -1).all() and 0 <= nb <= K


def test_counted_pairs_are_the_reached_mismatches():
    """Total count added == number of mismatches at positions up to each row's stop."""
    g = torch.Generator().manual_seed(3)
    B, K, V = 8, 6, 30
    logits = torch.randn(B, K + 1, V, generator=g)
    top = logits.argmax(-1)[:, :K]
    draft = torch.where(torch.rand(B, K, generator=g) < 0.5, top, torch.randint(0, V, (B, K), generator=g))
    mem = CorrectionMemory(num_buckets=256, ways=8)
    _, n = torch.ops.csd.gate(draft, logits, mem.keys, mem.counts, 0.0, LOG_TAU, True)
    mism = draft != top
    reached = torch.arange(K) <= n.unsqueeze(1)
    assert int(mem.counts.sum()) == int((mism & reached).sum())


@torch._functorch.config.patch(enable_autograd_cache=False)  # traces the op's current source
@torch._inductor.config.patch(fx_graph_cache=False)
def test_compiled_fullgraph_updates_buffers():
    class Step(torch.nn.Module):
        def __init__(self, mem):
            super().__init__()
            self.register_buffer("keys", mem.keys)
            self.register_buffer("counts", mem.counts)

        def forward(self, draft, logits):
            return torch.ops.csd.gate(draft, logits, self.keys, self.counts, 0.0, LOG_TAU, True)

    draft, logits, mem = _table_case()
    eager_mem = CorrectionMemory(num_buckets=16, ways=4)
    eager_mem.keys.copy_(mem.keys), eager_mem.counts.copy_(mem.counts)
    step = Step(mem)
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(torch.compile(step, fullgraph=True), draft, logits)
    # CPU: the argmax is Inductor's (C++), only the sequential walk is an opaque call
    assert "torch.ops.csd.gate_walk.default(" in code and "argmax" in code
    ref = gate_ref(draft, logits, eager_mem.keys, eager_mem.counts, 0.0, LOG_TAU, True)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert torch.equal(step.counts, eager_mem.counts) and torch.equal(step.keys, eager_mem.keys)


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5, float("nan"), True])
def test_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        log_tau_of(tau)


def test_tau_one_is_log_zero():
    assert log_tau_of(1.0) == 0.0 and log_tau_of(0.01) == pytest.approx(LOG_TAU)


@pytest.mark.parametrize(
    "change, err",
    [
        (dict(lambda_=-1.0), ValueError),
        (dict(lambda_=float("nan")), ValueError),
        (dict(log_tau=0.5), ValueError),
        (dict(draft=torch.zeros(4, 3, dtype=torch.int32)), TypeError),
        (dict(logits=torch.randn(4, 3, 8)), ValueError),
        (dict(logits=torch.randint(0, 5, (4, 4, 8))), TypeError),
        (dict(counts=torch.zeros(16, 4, dtype=torch.int64)), TypeError),
        (dict(keys=torch.full((16, 3), -1), counts=torch.zeros(16, 3, dtype=torch.int32)), ValueError),
    ],
)
def test_bad_input(change, err):
    draft, logits, mem = _table_case()
    args = dict(draft=draft, logits=logits, keys=mem.keys, counts=mem.counts, lambda_=6.0, log_tau=LOG_TAU)
    args.update(change)
    for fn in (torch.ops.csd.gate, gate_ref):
        with pytest.raises(err):
            fn(args["draft"], args["logits"], args["keys"], args["counts"], args["lambda_"], args["log_tau"], True)


@torch._functorch.config.patch(enable_autograd_cache=False)
@torch._inductor.config.patch(fx_graph_cache=False)
def test_make_csd_accept_compiled_closure_updates_memory():
    draft, logits, mem = _table_case()
    ref_mem = CorrectionMemory(num_buckets=16, ways=4)
    ref_mem.keys.copy_(mem.keys), ref_mem.counts.copy_(mem.counts)
    accept = torch.compile(make_csd_accept(mem, tau=0.01), fullgraph=True)
    with torch.no_grad():
        for _ in range(2):  # the second call sees the first call's counts
            got = accept(draft, logits)
            ref = gate_ref(draft, logits, ref_mem.keys, ref_mem.counts, 6.0, LOG_TAU, True)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert torch.equal(mem.counts, ref_mem.counts) and torch.equal(mem.keys, ref_mem.keys)


@pytest.mark.parametrize("kwargs", [dict(tau=0.0), dict(tau=2.0), dict(lambda_=-1)])
def test_make_csd_accept_bad_args(kwargs):
    with pytest.raises(ValueError):
        make_csd_accept(CorrectionMemory(num_buckets=2, ways=1), **kwargs)


def test_engine_integration_exact_then_rescue():
    """Plugged into the speculative engine: lambda=inf is HF greedy; the compiled csd step rescues."""
    from torch._dynamo.utils import counters

    from csd_compile.speculative import generate
    from tests.conftest import make_tiny_llama

    target = make_tiny_llama(0)
    ids = torch.tensor([[5, 9, 17, 5, 9, 17, 40, 5, 9, 17, 41, 5, 9]])
    ref = target.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    kw = dict(draft="ngram", num_draft_tokens=4, max_new_tokens=30, eos_token_id=[], return_stats=True)
    mem = CorrectionMemory(num_buckets=64, ways=4)
    out, exact = generate(target, ids, compile_backend=None, acceptance=make_csd_accept(mem, lambda_=float("inf")), **kw)
    assert torch.equal(out, ref)
    assert int(mem.counts.sum()) > 0  # counted even when rescue is off
    mem = CorrectionMemory(num_buckets=64, ways=4)
    counters.clear()
    _, csd = generate(target, ids, compile_backend="csd", acceptance=make_csd_accept(mem, lambda_=0, tau=1e-4), **kw)
    assert sum(counters["graph_break"].values()) == 0
    assert csd["mean_accepted"] > exact["mean_accepted"] and int(mem.counts.sum()) > 0


def _accept_table_case(compiled: bool, **kwargs):
    """``make_csd_accept(mem, tau=0.01, **kwargs)`` on :func:`_table_case`, eager or compiled:
    ``(tokens, num_accepted, memory)``."""
    draft, logits, mem = _table_case()
    accept = make_csd_accept(mem, tau=0.01, **kwargs)
    if compiled:
        accept = torch.compile(accept, fullgraph=True)
    with torch.no_grad():
        tokens, n = accept(draft, logits)
    return tokens.tolist(), n.tolist(), mem


@pytest.mark.parametrize("protected", [[2], [5]])  # the draft side, the target side of the pair (2 -> 5)
@pytest.mark.parametrize("compiled", [False, True])
def test_protected_tokens_are_never_rescued_nor_counted(protected, compiled):
    tokens, n, mem = _accept_table_case(compiled, protected=protected)
    assert tokens == [
        [1, 2, 3, 7],  # an exact match of a protected token is still accepted
        [1, 5, -1, -1],  # the rescue of (2 -> 5) from test_exact_table is refused: t* corrects
        [5, -1, -1, -1],
        [4, 3, -1, -1],  # unprotected pairs are counted as before
    ]
    assert n == [3, 1, 0, 1]
    c = lambda d, t: int(mem.count(torch.tensor(d), torch.tensor(t)))  # noqa: E731
    assert (c(2, 5), c(6, 3)) == (6, 1)  # the seeded count of the protected pair did not grow


def test_protected_tokens_of_the_real_tokenizer(smollm2):
    from csd_compile.speculative.memory import protected_tokens

    _, tok = smollm2
    ids = protected_tokens(tok)
    assert tok.eos_token_id in ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert "```" in pieces and all("``" in p or i in tok.all_special_ids for p, i in zip(pieces, ids))
    fence = tok("```python\nprint(1)\n```")["input_ids"]
    assert any(i in ids for i in fence)


@pytest.mark.parametrize("compiled", [False, True])
def test_rescue_across_token_kinds_is_refused(compiled):
    """kinds: the pair (2 -> 5) of test_exact_table is rescued when both tokens are of one kind,
    refused (and not counted) when they differ; exact matches and same-kind pairs are unaffected."""
    same = torch.zeros(8, dtype=torch.int8)
    other = same.clone()
    other[5] = 2
    results = []
    for kinds in (same, other):
        tokens, n, m = _accept_table_case(compiled, kinds=kinds)
        results.append((tokens, n, int(m.count(torch.tensor(2), torch.tensor(5)))))
    assert results[0] == ([[1, 2, 3, 7], [1, 2, 3, 4], [5, -1, -1, -1], [4, 3, -1, -1]], [3, 3, 0, 1], 8)
    assert results[1] == ([[1, 2, 3, 7], [1, 5, -1, -1], [5, -1, -1, -1], [4, 3, -1, -1]], [3, 1, 0, 1], 6)
    draft, logits, mem = _table_case()
    with pytest.raises(ValueError, match="kinds has 7 entries"):
        make_csd_accept(mem, kinds=torch.zeros(7, dtype=torch.int8))(draft, logits)


def test_token_kinds_of_the_real_tokenizer(smollm2):
    from csd_compile.speculative.memory import TOKEN_KINDS, token_kinds

    _, tok = smollm2
    kinds = token_kinds(tok, vocab_size=len(tok) + 3)
    assert kinds.shape == (len(tok) + 3,) and kinds.dtype == torch.int8
    kind = lambda text: TOKEN_KINDS[int(kinds[tok(text)["input_ids"][0]])]  # noqa: E731
    assert (kind(" code"), kind(" function"), kind("def")) == ("word", "word", "word")
    assert (kind("#"), kind(" \"\"\""), kind(",")) == ("punctuation", "punctuation", "punctuation")
    assert (kind("7"), kind("\n"), kind("_")) == ("number", "whitespace", "punctuation")
    others = (kinds[: len(tok)] == 4).nonzero().flatten()[:50].tolist()
    assert others and all(not t.strip().isalpha() and not t.strip().isdigit() and t.strip()
                          for t in tok.batch_decode([[i] for i in others]))
    assert kinds[-3:].tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="smaller than"):
        token_kinds(tok, vocab_size=10)
