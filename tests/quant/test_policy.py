"""Policy: lowering order, budget -> plan, entropy buckets, the on-device policy and its hook."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.quant import quantize_
from csd_compile.quant.linear import QLinear, quantized_linears
from csd_compile.quant.policy import (
    DynamicPrecisionPolicy,
    bucket_plans,
    check_avg_bits,
    enable_dynamic_precision,
    lowering_order,
    next_token_entropy,
    plan_for_budget,
    weighted_average,
)
from csd_compile.quant.table import PrecisionTable, TableError, model_fingerprint, quantizable_linears
from tests.conftest import make_tiny_llama

LADDER = (2, 3, 4, 8)


def random_table(seed, n_layers, ladder=LADDER):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n_layers, generator=g) * 3  # per-layer sensitivity
    # KL falls with bits (roughly 4x per bit), noisy
    kl = [[float(b * 4.0 ** (-(r - ladder[0])) * (0.5 + torch.rand((), generator=g))) for r in ladder] for b in base]
    numels = [int(x) for x in torch.randint(1, 5, (n_layers,), generator=g) * 4096]
    q = sorted((torch.rand(17, generator=g) * 5).tolist())
    return PrecisionTable("f" * 16, ladder, tuple(f"l{i}" for i in range(n_layers)), tuple(numels),
                          tuple(tuple(r) for r in kl), tuple(q), {"group_size": 64})


def random_v2_table(seed, n_layers, nb, factors=None, ladder=LADDER):
    """A version-2 table: bucket ``b``'s KL is the layer's KL times a random (or given) factor."""
    t = random_table(seed, n_layers, ladder)
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for row in t.kl:
        f = factors if factors is not None else (0.2 + 2 * torch.rand(nb, generator=g)).tolist()
        rows.append(tuple(tuple(v * f[b] for b in range(nb)) for v in row))
    edges = tuple(sorted((torch.rand(nb - 1, generator=g) * 4).tolist()))
    return PrecisionTable(t.fingerprint, ladder, t.names, t.numels, t.kl, t.entropy_quantiles, t.settings,
                          kl_by_entropy=tuple(rows), entropy_edges=edges)


def table_for(model, seed=0, version=1):
    """A random table for ``model``'s layers: version 1 (one KL per rung) or 2 (per entropy bucket too)."""
    layers = quantizable_linears(model)
    t = random_table(seed, len(layers)) if version == 1 else random_v2_table(seed, len(layers), 4)
    return dataclasses.replace(t, fingerprint=model_fingerprint(model), names=tuple(n for n, _ in layers),
                               numels=tuple(m.weight.numel() for _, m in layers))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), budgets=st.lists(st.floats(2.0, 8.0), min_size=2, max_size=6))
def test_plans_are_monotone_in_the_budget_and_within_it(seed, n, budgets):
    table = random_table(seed, n)
    steps = lowering_order(table)
    assert len(steps) == n * (len(LADDER) - 1)
    prev = None
    for b in sorted(budgets, reverse=True):
        plan = plan_for_budget(table, b, steps)
        assert all(x in LADDER for x in plan)
        assert weighted_average(table, plan) <= b + 1e-9
        if prev is not None:
            assert all(x <= y for x, y in zip(plan, prev))
        prev = plan


def test_least_sensitive_layer_is_lowered_first():
    kl = ((9.0, 3.0, 1.0, 0.1), (0.9, 0.3, 0.1, 0.01), (90.0, 30.0, 10.0, 1.0))
    t = PrecisionTable("f" * 16, LADDER, ("a", "b", "c"), (100, 100, 100), kl, (0.0, 1.0), {})
    assert plan_for_budget(t, 8.0) == [8, 8, 8]
    assert plan_for_budget(t, 7.0) == [8, 4, 8]  # one step: b (least sensitive) to 4 bits
    assert plan_for_budget(t, 5.0) == [4, 3, 8]
    assert plan_for_budget(t, 2.0) == [2, 2, 2]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 12), avg=st.floats(2.5, 7.5),
       nb=st.sampled_from([2, 4, 8]), spread=st.floats(0.0, 2.0))
def test_bucket_plans_rise_with_entropy_and_average_the_budget(seed, n, avg, nb, spread):
    table = random_table(seed, n)
    plans, edges = bucket_plans(table, avg, nb, spread)
    assert len(plans) == nb and len(edges) == nb - 1 and edges == sorted(edges)
    for lo, hi in zip(plans, plans[1:]):  # higher entropy bucket -> every layer >= bits
        assert all(a <= b for a, b in zip(lo, hi))
    mean = sum(weighted_average(table, p) for p in plans) / nb
    assert mean <= avg + 1e-6
    # the budget is used: within one layer-step of it (steps are at most 6 bits of one layer)
    assert mean >= avg - max(table.numels) * 6 / sum(table.numels) - 1e-6


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), nb=st.sampled_from([1, 2, 4, 8]),
       budgets=st.lists(st.floats(2.0, 8.0), min_size=2, max_size=5))
def test_priced_plans_are_monotone_in_the_budget_and_within_it(seed, n, nb, budgets):
    table = random_v2_table(seed, n, nb)
    prev = None
    for avg in sorted(budgets, reverse=True):
        plans, edges = bucket_plans(table, avg)
        assert len(plans) == nb and edges == list(table.entropy_edges)
        assert all(x in LADDER for p in plans for x in p)
        assert sum(weighted_average(table, p) for p in plans) / nb <= avg + 1e-9
        if prev is not None:  # a smaller budget never raises a layer's bits in any bucket
            assert all(a <= b for p, q in zip(plans, prev) for a, b in zip(p, q))
        prev = plans


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 12), avg=st.floats(2.5, 7.5))
def test_priced_plans_give_more_bits_to_buckets_where_lowering_costs_more(seed, n, avg):
    """Bucket b's KL is the layer's KL times c_b, c rising with b: one lowering order, scaled prices,
    so at one price threshold a costlier bucket takes a prefix of a cheaper one's steps."""
    factors = [0.25, 0.5, 1.0, 2.0]
    plans, _ = bucket_plans(random_v2_table(seed, n, 4, factors), avg)
    for lo, hi in zip(plans, plans[1:]):
        assert all(a <= b for a, b in zip(lo, hi))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), avg=st.floats(2.0, 8.0))
def test_no_entropy_signal_gives_one_static_plan(seed, n, avg):
    """Equal KL in every bucket: every bucket gets the same plan, the lowering order of the table's
    mean KL cut at the common price (at least as many steps as ``plan_for_budget`` takes)."""
    table = random_v2_table(seed, n, 4, factors=[1.0] * 4)
    plans, _ = bucket_plans(table, avg)
    assert all(p == plans[0] for p in plans)
    assert weighted_average(table, plans[0]) <= avg + 1e-9
    assert all(a <= b for a, b in zip(plans[0], plan_for_budget(table, avg)))


def test_priced_plans_by_hand():
    """Two layers of 100 weights, ladder (4, 8); KL at 4 bits: layer a 1.0 in bucket 0, 9.0 in
    bucket 1; layer b 3.0 in both. Prices (KL per weight-bit): a 1/400 and 9/400, b 3/400."""
    kl = ((5.0, 0.0), (3.0, 0.0))
    by = (((1.0, 9.0), (0.0, 0.0)), ((3.0, 3.0), (0.0, 0.0)))
    t = PrecisionTable("f" * 16, (4, 8), ("a", "b"), (100, 100), kl, (0.0, 1.0), {},
                       kl_by_entropy=by, entropy_edges=(0.5,))
    assert bucket_plans(t, 8.0)[0] == [[8, 8], [8, 8]]
    assert bucket_plans(t, 7.0)[0] == [[4, 8], [8, 8]]  # the cheapest step of all: a in bucket 0
    # 6 bits is not met at threshold 1/400 (mean 7): the next price, 3/400, lowers b in both buckets (mean 5)
    assert bucket_plans(t, 6.0)[0] == [[4, 4], [8, 4]]
    assert bucket_plans(t, 5.0)[0] == [[4, 4], [8, 4]]
    assert bucket_plans(t, 4.5)[0] == [[4, 4], [4, 4]]  # a in the uncertain bucket goes last
    with pytest.raises(ValueError, match="num_buckets=4 differs"):
        bucket_plans(t, 6.0, num_buckets=4)
    assert len(bucket_plans(t, 6.0, num_buckets=4, spread=1.0)[0]) == 4  # an explicit spread: the spread rule


def test_avg_bits_outside_the_ladder():
    table = random_table(0, 4)
    for bad in (1.5, 8.5, float("nan"), "5", True):
        with pytest.raises(ValueError, match="avg_bits"):
            bucket_plans(table, bad)
    assert check_avg_bits(5, LADDER) == 5.0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), t=st.integers(1, 4), scale=st.floats(0.1, 20.0))
def test_policy_picks_the_bucket_of_the_entropy(seed, b, t, scale):
    table = random_table(seed, 6)
    policy = DynamicPrecisionPolicy.from_table(table, 5.0, num_buckets=4)
    logits = torch.randn(b, t, 32, generator=torch.Generator().manual_seed(seed)) * scale
    plan = policy(logits)
    p = torch.softmax(logits[:, -1].double(), -1)
    h = float((-(p * p.log()).sum(-1)).max())
    bucket = sum(h > e for e in policy.edges.tolist())
    assert plan.tolist() == policy.plans[bucket].tolist()
    assert float(policy.entropy) == pytest.approx(h, rel=1e-4, abs=1e-5)
    assert float(next_token_entropy(logits[:, -1]).max()) == pytest.approx(h, rel=1e-4, abs=1e-5)


def test_confident_tokens_get_fewer_bits():
    table = random_table(3, 8)
    policy = DynamicPrecisionPolicy.from_table(table, 4.0, num_buckets=8, spread=2.0)
    peaked = torch.full((1, 1, 1000), -30.0)
    peaked[..., 7] = 30.0
    flat = torch.randn(1, 1, 1000) * 0.01
    low = policy(peaked).clone()
    high = policy(flat).clone()
    assert (low <= high).all() and low.sum() < high.sum()


def test_enable_dynamic_precision_drives_every_qlinear():
    model = make_tiny_llama(seed=4)
    table = table_for(model)
    policy = enable_dynamic_precision(model, table, 4.0, num_buckets=4, spread=2.0)
    assert sum(isinstance(m, QLinear) for m in model.modules()) == 14
    assert not isinstance(model.lm_head, QLinear)
    g = torch.Generator().manual_seed(0)
    seen = set()
    with torch.no_grad():
        for scale in (0.0, 1.0, 50.0):
            model.lm_head.weight.mul_(0).add_(torch.randn(model.lm_head.weight.shape, generator=g) * scale)
            out = model(torch.randint(0, 128, (1, 5), generator=g)).logits
            h = next_token_entropy(out).max()
            expect = policy.plans[torch.bucketize(h, policy.edges)]
            bits = torch.stack([b for _, b in quantized_linears(model)])
            assert torch.equal(bits, expect) and torch.equal(policy.plan, expect)
            seen.add(tuple(expect.tolist()))
    assert len(seen) >= 2  # a flat and a peaked output chose different plans
    policy.remove()


def test_enable_dynamic_precision_refuses_another_models_table():
    table = table_for(make_tiny_llama(seed=5))
    with pytest.raises(TableError, match="another model"):
        enable_dynamic_precision(make_tiny_llama(seed=6), table, 5.0)
    with pytest.raises(ValueError, match="avg_bits"):
        enable_dynamic_precision(make_tiny_llama(seed=5), table, 9.0)


def test_compiled_policy_changes_bits_without_recompiling():
    from torch._dynamo.testing import CompileCounter

    model = make_tiny_llama(seed=7)
    table = table_for(model)
    policy = enable_dynamic_precision(model, table, 4.0, num_buckets=4, spread=2.0)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    plans = set()
    with torch.no_grad():
        for scale in (0.0, 30.0, 0.0, 30.0):
            model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * scale)
            ids = torch.randint(0, 128, (1, 6), generator=g)
            out = compiled(input_ids=ids).logits
            expect = policy.plans[torch.bucketize(next_token_entropy(out).max(), policy.edges)]
            bits = torch.stack([b for _, b in quantized_linears(model)])
            assert torch.equal(bits, expect)
            plans.add(tuple(expect.tolist()))
    assert len(plans) == 2
    assert counter.frame_count == 1  # one graph, no recompiles for changing plans
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
