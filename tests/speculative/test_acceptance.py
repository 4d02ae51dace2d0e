"""Acceptance rules against a plain-Python reference, and the sampling rule against the target distribution."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.speculative.acceptance import greedy_accept, logits_to_probs, sample_accept


def _greedy_reference(drafts, logits):
    out, nums = [], []
    for d, lg in zip(drafts.tolist(), logits.argmax(-1).tolist()):
        n = 0
        while n < len(d) and d[n] == lg[n]:
            n += 1
        row = d[:n] + [lg[n]]
        out.append(row + [-1] * (len(d) + 1 - len(row)))
        nums.append(n)
    return torch.tensor(out), torch.tensor(nums)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 5), K=st.integers(1, 7), V=st.integers(2, 9), seed=st.integers(0, 10_000))
def test_greedy_accept_matches_reference(B, K, V, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K + 1, V, generator=g)
    target = logits.argmax(-1)
    # drafts that agree with the target for a random prefix, then random (possibly -1)
    drafts = torch.randint(-1, V, (B, K), generator=g)
    agree = torch.rand(B, K, generator=g) < 0.7
    drafts = torch.where(agree, target[:, :K], drafts)
    tokens, n = greedy_accept(drafts, logits)
    ref_tokens, ref_n = _greedy_reference(drafts, logits)
    assert torch.equal(n, ref_n)
    assert torch.equal(tokens, ref_tokens)


def test_greedy_accept_table():
    V = 5
    target = torch.tensor([[1, 2, 3, 4]])  # argmax per position
    logits = torch.nn.functional.one_hot(target, V).float() + 0.1 * torch.rand(1, 4, V)
    cases = {
        (1, 2, 3): ([1, 2, 3, 4], 3),  # all accepted + bonus
        (1, 0, 3): ([1, 2, -1, -1], 1),  # first mismatch at 1: recovered target token
        (0, 2, 3): ([1, -1, -1, -1], 0),
        (-1, 2, 3): ([1, -1, -1, -1], 0),  # "no proposal" is a rejection
    }
    for drafts, (tokens, n) in cases.items():
        t, num = greedy_accept(torch.tensor([drafts]), logits)
        assert t.tolist() == [tokens] and num.tolist() == [n]


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square at alpha ~ 1e-4 (cells with expected count < 5 merged)."""
    from scipy.stats import chi2

    n = counts.sum().item()
    exp = probs.double() * n
    small = exp < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([exp[~small], exp[small].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    return stat < chi2.ppf(1 - 1e-4, keep.sum().item() - 1)


@pytest.mark.parametrize("draft_kind", ["model", "onehot"])
def test_sample_accept_first_token_is_target_distributed(draft_kind):
    torch.manual_seed(0)
    B, K, V = 40_000, 3, 6
    p = torch.softmax(torch.randn(K + 1, V) * 1.5, -1).expand(B, K + 1, V)
    if draft_kind == "model":
        q = torch.softmax(torch.randn(K, V) * 1.5, -1).expand(B, K, V)
        drafts = torch.stack([torch.multinomial(q[0, i], B, replacement=True) for i in range(K)], dim=1)
    else:  # a deterministic proposer (n-gram): one-hot q, the same draft every time
        drafts = torch.full((B, K), 2)
        q = torch.nn.functional.one_hot(drafts, V).float()
    tokens, n = sample_accept(drafts, q, p)
    assert ((n >= 0) & (n <= K)).all()
    assert torch.equal(tokens[torch.arange(B), n] >= 0, torch.ones(B, dtype=torch.bool))
    first = tokens[:, 0]
    counts = torch.bincount(first, minlength=V)
    assert _chi2_ok(counts, p[0, 0])
    # the second token, given the first draft was accepted, follows p_1 (contexts are independent here)
    sec = tokens[n >= 1, 1]
    assert _chi2_ok(torch.bincount(sec, minlength=V), p[0, 1])


def test_sample_accept_is_seeded():
    B, K, V = 64, 4, 10
    p = torch.softmax(torch.randn(B, K + 1, V), -1)
    q = torch.softmax(torch.randn(B, K, V), -1)
    d = torch.randint(0, V, (B, K))
    torch.manual_seed(3)
    a = sample_accept(d, q, p)
    torch.manual_seed(3)
    b = sample_accept(d, q, p)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@settings(max_examples=30, deadline=None)
@given(V=st.integers(2, 50), top_p=st.floats(0.05, 1.0), temp=st.floats(0.1, 3.0), seed=st.integers(0, 1000))
def test_logits_to_probs_top_p(V, top_p, temp, seed):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(seed))
    probs = logits_to_probs(logits, temp, top_p)
    full = torch.softmax(logits / temp, -1)
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    for r in range(3):
        order = full[r].argsort(descending=True)
        kept = probs[r][order] > 0
        m = int(kept.sum())
        assert kept[:m].all()  # a prefix of the sorted tokens is kept
        assert full[r][order][: m - 1].sum() < top_p + 1e-6  # ... the smallest such prefix
        assert m == V or full[r][order][:m].sum() >= top_p - 1e-6
