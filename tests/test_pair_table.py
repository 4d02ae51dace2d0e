"""pair_table: the one update rule, on tensors (masked) and on host arrays (scalar), agree."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile import pair_table
from csd_compile.pair_table import EMPTY, record_masked_, record_scalar_, table_lookup, table_record_


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    S=st.integers(1, 4), W=st.sampled_from([1, 2, 4]),
    ops=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.booleans()), max_size=40),
)
def test_masked_and_scalar_rule_agree(S, W, ops):
    k1, c1 = torch.full((S, W), EMPTY, dtype=torch.int64), torch.zeros((S, W), dtype=torch.int32)
    k2, c2 = k1.clone(), c1.clone()
    for d, t, on in ops:
        before = int(table_lookup(k1, c1, torch.tensor(d), torch.tensor(t)))
        got1 = int(record_masked_(k1, c1, torch.tensor(d), torch.tensor(t), torch.tensor(on)))
        got2 = record_scalar_(k2.numpy(), c2.numpy(), d, t, on)
        assert got1 == got2
        if not on:
            assert got1 == before  # off: a read, nothing written
        assert torch.equal(k1, k2) and torch.equal(c1, c2)


def test_record_is_the_always_on_case_and_saturates():
    keys, counts = torch.full((1, 1), EMPTY, dtype=torch.int64), torch.zeros((1, 1), dtype=torch.int32)
    d, t = torch.tensor(3), torch.tensor(7)
    assert int(table_record_(keys, counts, d, t)) == 1
    counts.fill_(pair_table.COUNT_MAX)
    assert int(table_record_(keys, counts, d, t)) == pair_table.COUNT_MAX
    assert int(keys[0, 0]) == 3 * pair_table.KEY_STRIDE + 7
    assert int(pair_table.bucket_of(3, 7, 5)) == ((3 * pair_table.H1) ^ (7 * pair_table.H2)) % 5
