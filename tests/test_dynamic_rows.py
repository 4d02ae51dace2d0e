"""benchmarks/dynamic_rows.py: the frontier's rows are timed together with the bench's timing."""

import functools

import pytest


def test_rows_without_a_table_time_together_and_score(monkeypatch):
    import benchmarks.dynamic_rows as dr
    from csd_compile import load_model

    model, tok = load_model("smollm2-135m-instruct", dtype="bf16")
    monkeypatch.setattr(dr, "perplexity", functools.partial(dr.perplexity, context=4, tokens=6, offsets=(1000,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = dr.frontier(model, tok, None, ["def add(a, b):", "The sky is"], 6, 6.0)
    assert [r["name"] for r in res] == ["full", "static8", "static4"]
    for r in res:
        assert r["tok_s"] > 0 and len(r["ids"]) == 2 and all(0 < len(x) <= 6 for x in r["ids"])
        assert r["ppl"] > 1 and 0 <= r["agreement"] <= 1
    assert res[0]["agreement"] == 1.0 and res[1]["avg_bits"] == 8.0 and res[2]["avg_bits"] == 4.0
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())  # the model passed in is untouched
    with pytest.raises(ValueError, match="unknown rows"):
        dr.frontier(model, tok, None, ["x"], 2, 6.0, rows=["dynamic"])
