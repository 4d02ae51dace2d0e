"""csd_compile.bench.timing: the one timing definition (warm-up, interleaved order, wall clock, medians)."""

import statistics
import time

import pytest
import torch

from csd_compile.bench.timing import measure, median_tok_s, timed_call, warm_up


def _fake(name, log, new_tokens, sleep_s):
    def run(ids):
        log.append((name, int(ids[0, 0])))
        time.sleep(sleep_s)
        return {"ids": torch.cat([ids, torch.randint(0, 100, (1, new_tokens))], 1), "extra": name}

    return run


def test_warm_up_then_every_input_through_every_runner_in_rotated_order():
    log = []
    inputs = [torch.full((1, 3 + i), i) for i in range(5)]
    runners = {n: _fake(n, log, k, 0.0) for n, k in (("a", 4), ("b", 7), ("c", 2))}
    m = measure(runners, inputs, warmup_input=torch.full((1, 2), 99), progress=None)
    assert log[:3] == [("a", 99), ("b", 99), ("c", 99)]  # warm-up first, on the warm-up input
    timed = log[3:]
    assert len(timed) == 15
    firsts = [timed[3 * i][0] for i in range(5)]
    assert firsts == ["a", "b", "c", "a", "b"]  # no runner always goes first
    for i in range(5):
        assert sorted(n for n, p in timed[3 * i:3 * i + 3]) == ["a", "b", "c"] and {p for _, p in timed[3 * i:3 * i + 3]} == {i}
    for n, k in (("a", 4), ("b", 7), ("c", 2)):
        recs = m.records[n]
        assert [r["prompt"] for r in recs] == list(range(5))
        assert all(r["new_tokens"] == k and r["tok_s"] == k / r["seconds"] and r["output"]["extra"] == n for r in recs)
        assert m.median_tok_s(n) == statistics.median(r["tok_s"] for r in recs)
    assert set(m.warmup_s) == {"a", "b", "c"}


def test_wall_clock_covers_the_runner_and_the_ratio_is_of_medians():
    rng = torch.Generator().manual_seed(3)
    sleeps = {"slow": 0.02, "fast": 0.005}
    n_tok = int(torch.randint(3, 9, (1,), generator=rng))
    m = measure({n: _fake(n, [], n_tok, s) for n, s in sleeps.items()}, [torch.ones(1, 4, dtype=torch.long)] * 3,
                warmup=False, progress=None)
    assert m.warmup_s == {}
    for n, s in sleeps.items():
        assert all(r["seconds"] >= s for r in m.records[n])
    assert m.ratio("fast", "slow") == m.median_tok_s("fast") / m.median_tok_s("slow") > 1


def test_runner_may_report_new_tokens_itself_and_on_record_sees_each_call():
    seen = []
    m = measure({"x": lambda ids: {"new_tokens": 5}}, [torch.zeros(1, 2)] * 2, progress=None,
                on_record=lambda n, r: seen.append((n, r["prompt"], r["new_tokens"])))
    assert seen == [("x", 0, 5), ("x", 1, 5)] and [r["new_tokens"] for r in m.records["x"]] == [5, 5]


def test_timed_call_runs_under_inference_mode_and_warm_up_times_each_runner():
    out, dt = timed_call(lambda ids: {"grad": torch.is_inference_mode_enabled()}, None)
    assert out == {"grad": True} and dt >= 0
    assert set(warm_up({"p": lambda i: {}, "q": lambda i: {}}, None)) == {"p", "q"}


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no runners"):
        measure({}, [torch.zeros(1, 1)], progress=None)
    with pytest.raises(ValueError, match="no inputs"):
        measure({"x": lambda i: {"new_tokens": 1}}, [], progress=None)
    with pytest.raises(KeyError, match="'ids'.*'new_tokens'"):
        measure({"x": lambda i: {"text": "?"}}, [torch.zeros(1, 1)], warmup=False, progress=None)
    with pytest.raises(ValueError, match="no records"):
        median_tok_s([])
