"""The CSD sampling rescue rule does what its docstring says (csd_compile/speculative/csd_sampling.py)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.stats import chisquare

from csd_compile.speculative.acceptance import sample_accept
from csd_compile.speculative.csd_sampling import csd_sample_accept, make_csd_sample_accept, sampling_rescue_law
from csd_compile.speculative.memory import CorrectionMemory


def _probs(g, *shape):
    return torch.softmax(torch.randn(*shape, generator=g) * 2, dim=-1)


def _frequent(mem, d, t, n):
    mem.record(torch.full((n,), d), torch.full((n,), t))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), K=st.integers(1, 5), V=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_lambda_inf_is_sample_accept_bit_for_bit(B, K, V, seed):
    g = torch.Generator().manual_seed(seed)
    q = _probs(g, B, K, V)
    p = _probs(g, B, K + 1, V)
    d = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, K)
    mem = CorrectionMemory(64, 4)
    for a in range(V):
        for b in range(V):
            _frequent(mem, a, b, 1) if a != b else None
    mem.counts.fill_(100)  # every pair frequent: lambda=inf must still ignore them
    before = mem.counts.clone()
    torch.manual_seed(seed)
    ref = sample_accept(d, q, p)
    torch.manual_seed(seed)
    got = csd_sample_accept(d, q, p, mem.keys, mem.counts, lambda_=float("inf"), tau=0.01)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    # an empty memory with lambda >= 1 is also lossless
    empty = CorrectionMemory(64, 4)
    torch.manual_seed(seed)
    got2 = csd_sample_accept(d, q, p, empty.keys, empty.counts, lambda_=1, tau=0.01, update=False)
    assert torch.equal(ref[0], got2[0]) and torch.equal(ref[1], got2[1])
    assert mem.counts.sum() >= before.sum()


def _first_token_freqs(q, p, mem, lam, tau, n):
    """Empirical law of the first emitted token over ``n`` independent rows (x ~ q drawn per row)."""
    V = p.shape[-1]
    torch.manual_seed(0)
    x = torch.multinomial(q[0, 0].expand(n, V), 1)  # [n, 1]
    qq, pp = q.expand(n, -1, -1), p.expand(n, -1, -1)
    tokens, _ = csd_sample_accept(x, qq, pp, mem.keys, mem.counts, lambda_=lam, tau=tau, update=False)
    return torch.bincount(tokens[:, 0], minlength=V).double()


@pytest.mark.parametrize("lam", [float("inf"), 3.0])
def test_chi_square_law(lam):
    V, n = 6, 20000
    g = torch.Generator().manual_seed(1)
    p = _probs(g, 1, 2, V)
    q = _probs(g, 1, 1, V)
    t = int(p[0, 0].argmax())
    mem = CorrectionMemory(64, 4)
    # make (x, t*) frequent for every x with q(x) > p(x) and a ratio that clears tau=0.05
    tau = 0.05
    rescuable = torch.zeros(V, dtype=torch.bool)
    for x in range(V):
        if x != t and q[0, 0, x] > p[0, 0, x]:
            _frequent(mem, x, t, 5)
            rescuable[x] = bool(p[0, 0, x] >= tau * p[0, 0, t])
    if math.isinf(lam):
        rescuable[:] = False
    else:
        assert rescuable.any(), "construction must have a rescuable draft"
    freqs = _first_token_freqs(q, p, mem, lam, tau, n)
    law = sampling_rescue_law(p[0, 0], q[0, 0], rescuable)
    if math.isinf(lam):
        assert torch.allclose(law, p[0, 0].double())
    keep = law > 1e-12
    assert freqs[~keep].sum() == 0
    exp = law[keep] * n
    res = chisquare(freqs[keep].numpy(), (exp * freqs[keep].sum() / exp.sum()).numpy())
    assert res.pvalue > 1e-4, (freqs, law * n)


def test_rescue_only_when_ratio_clears_tau():
    # deterministic draft x=1 (one-hot q); target top is 0; p(1)/p(0) = 0.2
    p = torch.tensor([[[0.5, 0.1, 0.4], [0.3, 0.3, 0.4]]])
    q = torch.tensor([[[0.0, 1.0, 0.0]]])
    d = torch.tensor([[1]])
    mem = CorrectionMemory(64, 4, lambda_=2)
    _frequent(mem, 1, 0, 2)  # count 2, +1 this occurrence = 3 > 2: frequent
    accept_lo = make_csd_sample_accept(mem, tau=0.19, update=False)
    accept_hi = make_csd_sample_accept(mem, tau=0.21, update=False)
    n_lo = sum(int(accept_lo(d, q, p)[1]) for _ in range(200))
    n_hi = sum(int(accept_hi(d, q, p)[1]) for _ in range(200))
    assert n_lo == 200  # always rescued: a one-hot draft's x is always emitted
    assert 0 < n_hi < 60  # lossless only: accepted with prob p/q = 0.1
    # not frequent enough: count 1 (+1 = 2, not > 2): lossless
    mem2 = CorrectionMemory(64, 4, lambda_=2)
    _frequent(mem2, 1, 0, 1)
    n_rare = sum(int(make_csd_sample_accept(mem2, tau=0.01, update=False)(d, q, p)[1]) for _ in range(200))
    assert n_rare < 60


def test_counts_update_as_documented():
    # K=3, one-hot drafts; position 0 rejected-then-rescued (frequent), position 1 rejected (not frequent,
    # stop), position 2 never reached; a match with t* is not counted.
    V = 5
    p = torch.full((1, 4, V), 0.01)
    p[0, 0, 0], p[0, 0, 1] = 0.9, 0.06  # t*=0, draft 1: p/q = 0.06 (u < 0.06 accepts losslessly)
    p[0, 1, 2], p[0, 1, 3] = 0.9, 0.06  # t*=2, draft 3
    p[0, 2, 4] = 0.96
    p[0, 3, 0] = 0.96
    p = p / p.sum(-1, keepdim=True)
    d = torch.tensor([[1, 3, 0]])
    q = torch.nn.functional.one_hot(d, V).double()
    mem = CorrectionMemory(64, 4, lambda_=3)
    _frequent(mem, 1, 0, 3)
    seen_stop = False
    for seed in range(30):
        torch.manual_seed(seed)
        m = CorrectionMemory(64, 4, lambda_=3)
        m.keys.copy_(mem.keys), m.counts.copy_(mem.counts)
        torch.manual_seed(seed)
        u = torch.rand(1, 3, dtype=torch.float64)
        torch.manual_seed(seed)
        tokens, n = csd_sample_accept(d, q, p, m.keys, m.counts, lambda_=3, tau=0.01)
        lossless = (u[0] < torch.tensor([p[0, 0, 1], p[0, 1, 3], p[0, 2, 0]]).double())
        # position 0: rescued whenever rejected, counted only when rejected
        assert int(m.count(1, 0)) == 3 + int(not lossless[0])
        assert tokens[0, 0] == 1 and n >= 1
        if not lossless[1]:  # (3, 2) was seen 0 times: 0 + 1 > 3 is false, stop, counted once
            seen_stop = True
            assert int(n) == 1 and int(m.count(3, 2)) == 1
            assert int(m.count(0, 4)) == 0  # position 2 not reached
        else:
            assert int(m.count(3, 2)) == 0
    assert seen_stop
    # update=False never changes the memory
    m = CorrectionMemory(64, 4, lambda_=3)
    csd_sample_accept(d, q, p, m.keys, m.counts, lambda_=3, tau=0.01, update=False)
    assert int(m.num_pairs()) == 0


@pytest.mark.parametrize("lam,tau", [(-1, 0.01), (6, 0.0), (6, 1.5), (True, 0.01), (6, "x")])
def test_bad_lambda_tau(lam, tau):
    mem = CorrectionMemory(16, 2)
    with pytest.raises(ValueError):
        make_csd_sample_accept(mem, tau=tau, lambda_=lam)


def test_bad_shapes():
    mem = CorrectionMemory(16, 2)
    with pytest.raises(ValueError, match="target_probs"):
        csd_sample_accept(torch.zeros(1, 2, dtype=torch.long), torch.rand(1, 2, 4), torch.rand(1, 2, 4), mem.keys, mem.counts)
    with pytest.raises(TypeError, match="int64"):
        csd_sample_accept(torch.zeros(1, 2), torch.rand(1, 2, 4), torch.rand(1, 3, 4), mem.keys, mem.counts)
