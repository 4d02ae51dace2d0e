"""Prompt lookup on the host: the longest suffix n-gram with an earlier occurrence, most recent first."""

from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.speculative.drafts import NgramDraft


def brute_force(seq, K, max_n, min_n):
    for n in range(max_n, min_n - 1, -1):
        if n > len(seq) - 1:
            continue
        tail = seq[-n:]
        starts = [j for j in range(len(seq) - n) if seq[j:j + n] == tail]
        if starts:
            j = max(starts)
            return seq[j + n:j + n + K]
    return []


@settings(max_examples=300, deadline=None)
@given(seq=st.lists(st.integers(0, 5), min_size=0, max_size=40), K=st.integers(1, 8),
       max_n=st.integers(1, 4), min_n=st.integers(1, 4))
def test_lookup_matches_its_definition(seq, K, max_n, min_n):
    d = NgramDraft(K, vocab=6, max_ngram=max_n, min_ngram=min_n)
    got = d.lookup(seq)
    assert got == brute_force(seq, K, max_n, min_n)
    assert len(got) <= K


def test_lookup_examples():
    d = NgramDraft(3, vocab=100)  # n-grams of 3, then 2 tokens
    assert d.lookup([1, 2, 3, 4, 5, 1, 2, 3]) == [4, 5, 1]  # the 3-gram 1 2 3 occurred before
    assert d.lookup([7, 2, 3, 9, 2, 3, 8, 2, 3]) == [8, 2, 3]  # most recent occurrence of 2 3
    assert d.lookup([1, 2, 3, 4]) == []  # nothing repeats
    assert d.lookup([5, 5]) == []  # a 1-gram match is below min_ngram=2
    assert NgramDraft(3, vocab=100, min_ngram=1).lookup([5, 6, 5]) == [6, 5]
