"""benchmarks/csd_frontier.py: its helpers, its argument checks and one small run on the embedded model."""

import json

import pytest
import torch

from benchmarks.csd_scoring import rescue_cost
from benchmarks.csd_frontier import _parse, main, pick_tau


def test_rescue_cost_is_the_likelihood_given_up_where_the_text_leaves_the_argmax():
    g = torch.Generator().manual_seed(3)
    logp = torch.log_softmax(torch.randn(40, 50, generator=g), -1)
    top, amax = logp.max(-1)
    emitted = amax.clone()
    assert rescue_cost(top, logp.gather(-1, emitted[:, None])[:, 0]) == 0.0
    off = torch.randperm(40, generator=g)[:7]
    emitted[off] = (amax[off] + 1 + torch.randint(0, 48, (7,), generator=g)) % 50  # never the argmax
    e_logp = logp.gather(-1, emitted[:, None])[:, 0]
    expected = sum(float(top[i] - logp[i, emitted[i]]) for i in off.tolist())
    assert rescue_cost(top, e_logp) == pytest.approx(expected, rel=1e-5)
    assert expected > 0
    with pytest.raises(ValueError, match="shapes differ"):
        rescue_cost(top, e_logp[:-1])


def test_pick_tau_takes_the_longest_acceptance_whose_rescue_cost_fits_the_budget():
    # the log-likelihood change is noise here (it may even rise with more rescues): it must not decide
    rows = {
        "tau=0.01": {"accepted_ratio": 1.20, "rescue_cost_rel": 0.14, "loglik_rel_change": +0.05},
        "tau=0.1": {"accepted_ratio": 1.10, "rescue_cost_rel": 0.05, "loglik_rel_change": +0.10},
        "tau=0.3": {"accepted_ratio": 1.04, "rescue_cost_rel": 0.015, "loglik_rel_change": -0.09},
        "tau=0.9": {"accepted_ratio": 1.01, "rescue_cost_rel": 0.001, "loglik_rel_change": -0.07},
    }
    assert pick_tau(rows, 0.02) == "tau=0.3"
    assert pick_tau(rows, 0.05) == "tau=0.1"
    assert pick_tau(rows, 1.0) == "tau=0.01"
    assert pick_tau({k: rows[k] for k in ("tau=0.01", "tau=0.1")}, 0.02) is None
    with pytest.raises(ValueError, match="budget=-0.1"):
        pick_tau(rows, -0.1)


@pytest.mark.parametrize("argv, message", [
    (["--taus", "0,0.5"], "must be distinct values in"),
    (["--taus", "0.1,1.5"], "must be distinct values in"),
    (["--taus", "0.1,0.1"], "must be distinct values in"),
    (["--taus", "a,b"], "comma-separated numbers"),
    (["--budget", "-1"], "--budget=-1.0 must be >= 0"),
    (["--prompts", "0"], "--prompts=0 must be >= 1"),
    (["--lambda", "-2"], "--lambda=-2 must be distinct finite values >= 0"),
    (["--lambda", "2,inf"], "--lambda=2,inf must be distinct finite values >= 0"),
    (["--lambda", "2,2"], "--lambda=2,2 must be distinct finite values >= 0"),
    (["--lambda", "two"], "--lambda='two' must be comma-separated numbers"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        _parse(argv + ["--out", "x"])
    assert message in capsys.readouterr().err


def test_too_many_prompts_is_an_error_before_any_work(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match=r"--seed-prompts=170 with --problems=32: only \d+ held-out"):
        main(["--seed-prompts", "170", "--prompts", "16", "--out", str(out)])
    assert not out.exists()


def test_small_sweep_on_the_embedded_model(tmp_path):
    """At tau = 1 the gate admits a draft token only when its logit ties the target's top one. Whether
    bf16 logits tie on these prompts depends on the CPU's GEMM kernels (they do on some), so the
    texts may part; but a tie costs the fp32 target next to nothing, so the tau = 1 row's rescue cost
    stays at exact's noise floor, where tau = 0.01 may pay more. Every row's figures stay in range
    and the files are written."""
    res = main(["--prompts", "2", "--max-new-tokens", "24", "--seed-prompts", "2", "--seed-tokens", "8",
                "--lambda", "0", "--taus", "1,0.01", "--num-draft-tokens", "3", "--out", str(tmp_path)])
    exact, tie, loose = res["modes"]["exact"], res["modes"]["tau=1"], res["modes"]["tau=0.01"]
    assert abs(tie["rescue_cost_per_token"] - exact["rescue_cost_per_token"]) < 0.02
    assert loose["rescue_cost_per_token"] >= 0
    assert exact["accepted_ratio"] == 1.0 and exact["loglik_rel_change"] == 0.0
    for m in (exact, tie, loose):
        assert 0 < m["new_tokens"] <= 2 * 24
        assert m["rescue_cost_per_token"] >= 0
        assert 0 <= m["mean_accepted"] <= 3
    assert json.loads((tmp_path / "csd_frontier.json").read_text())["modes"].keys() == res["modes"].keys()
    assert "tau=0.01" in (tmp_path / "csd_frontier.md").read_text()


def test_lambda_grid_sweeps_every_pair_from_one_seeding(tmp_path):
    """Several lambdas sweep every (lambda, tau) pair from one seeding (a 2-bit draft, so that a few
    seeding tokens disagree): each row is labelled with both, the seeded-frequent counts fall as
    lambda rises, and tau = 1 still decodes what exact acceptance decodes at every lambda."""
    res = main(["--prompts", "2", "--max-new-tokens", "16", "--seed-prompts", "2", "--seed-tokens", "8",
                "--lambda", "0,3", "--taus", "1,0.01", "--num-draft-tokens", "3", "--draft-bits", "2", "--out", str(tmp_path)])
    assert list(res["modes"]) == ["exact", "lambda=0 tau=1", "lambda=0 tau=0.01", "lambda=3 tau=1", "lambda=3 tau=0.01"]
    assert (res["modes"]["lambda=3 tau=0.01"]["lambda"], res["modes"]["lambda=3 tau=0.01"]["tau"]) == (3.0, 0.01)
    freq = res["memory"]["seeded_frequent_pairs"]
    assert 0 < freq["0"] <= res["memory"]["seeded_pairs_recorded"] and freq["0"] >= freq["3"]
    for lam in ("0", "3"):
        row, exact = res["modes"][f"lambda={lam} tau=1"], res["modes"]["exact"]
        assert row["new_tokens"] == exact["new_tokens"]
        assert row["mean_accepted"] == pytest.approx(exact["mean_accepted"])
        assert row["mean_loglik_per_token"] == pytest.approx(exact["mean_loglik_per_token"])
    md = (tmp_path / "csd_frontier.md").read_text()
    assert "| lambda=0 tau=0.01 |" in md and "above lambda: 0: " in md
