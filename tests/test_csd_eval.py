"""Pure helpers of benchmarks/csd_eval.py: code extraction, program building, the pass@1 sandbox, categories."""

import torch
import pytest

from benchmarks.csd_scoring import build_program, divergent_pairs, extract_code, mean_loglik, token_category
from benchmarks.sandbox import run_sandboxed

PROBLEM = {
    "task_id": "T/0",
    "prompt": "import math\n\ndef area(r):\n    \"\"\"Area of a circle of radius r.\"\"\"\n",
    "test": "def check(f):\n    assert abs(f(3.0) - 9 * math.pi) < 1e-9\n",
    "entry_point": "area",
}


def test_extract_code_variants():
    assert extract_code("Sure!\n```python\nx = 1\n```\nbye") == "x = 1\n"
    assert extract_code("```\ny = 2\n```") == "y = 2\n"
    assert extract_code("text\n```python\nz = 3\nw = 4") == "z = 3\nw = 4"  # cut by max_new_tokens
    assert extract_code("    return 1\n") == "    return 1\n"
    with pytest.raises(TypeError):
        extract_code(None)


def test_pass_and_fail_in_sandbox():
    good = "```python\ndef area(r):\n    return math.pi * r * r\n```"
    body_only = "    return math.pi * r ** 2\n"
    wrong = "```python\ndef area(r):\n    return 2 * math.pi * r\n```"
    assert run_sandboxed(build_program(PROBLEM, good))["passed"]
    assert run_sandboxed(build_program(PROBLEM, body_only))["passed"]
    res = run_sandboxed(build_program(PROBLEM, wrong))
    assert not res["passed"] and "AssertionError" in res["stderr"]


def test_sandbox_timeout_network_and_cwd():
    res = run_sandboxed("while True:\n    pass\n", timeout=1.0)
    assert res["timeout"] and not res["passed"]
    net = run_sandboxed("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert not net["passed"] and "Network is unreachable" in net["stderr"]
    # the program runs in a fresh scratch folder holding only itself and the trusted wrapper
    probe = run_sandboxed("import os, sys\nassert sorted(os.listdir('.')) == ['prog.py', 'wrapper.py'], os.listdir('.')\n"
                          "assert sys.flags.isolated\n")
    assert probe["passed"], probe["stderr"]


def test_sandbox_bad_input():
    with pytest.raises(ValueError, match="timeout"):
        run_sandboxed("pass", timeout=0)
    with pytest.raises(TypeError):
        run_sandboxed(b"pass")
    with pytest.raises(ValueError, match="entry_point"):
        build_program({"prompt": "", "test": ""}, "x")


@pytest.mark.parametrize("a,b,cat", [
    (" the", "the", "whitespace"), (",", ".", "punctuation"), ("\n", " return", "formatting"), ("\n", "  ", "whitespace"), ("```", "def", "formatting"),
    (" big", " large", "synonym"), ("1", "x2", "other"), ("\n", "```", "formatting"), (")", " ]", "punctuation"),
])
def test_token_category(a, b, cat):
    assert token_category(a, b) == cat


def test_loglik_and_pairs():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, generator=g), torch.randn(3, generator=g)
    assert mean_loglik([a, b]) == pytest.approx(float(torch.cat([a, b]).mean()), rel=1e-6)
    with pytest.raises(ValueError):
        mean_loglik([torch.empty(0)])
    em = torch.randint(0, 4, (50,), generator=g)
    am = torch.randint(0, 4, (50,), generator=g)
    c = divergent_pairs(em, am)
    assert sum(c.values()) == int((em != am).sum())
    assert all(x != t for x, t in c)


def test_left_pad():
    from benchmarks.csd_eval import _left_pad

    ids = torch.randint(5, 50, (7,), generator=torch.Generator().manual_seed(3))
    padded, mask = _left_pad(ids, 10, 0)
    assert padded.shape == mask.shape == (1, 10)
    assert torch.equal(padded[0, 3:], ids) and (padded[0, :3] == 0).all()
    assert mask[0].tolist() == [0] * 3 + [1] * 7


def test_canonical_humaneval_solutions_pass_and_stubs_fail():
    from csd_compile.data import _spread, humaneval_problems

    for p in _spread(humaneval_problems(), 3):
        fenced = "Here:\n```python\n" + p["prompt"] + p["canonical_solution"] + "```\n"
        assert run_sandboxed(build_program(p, fenced))["passed"], p["task_id"]
        assert run_sandboxed(build_program(p, p["canonical_solution"]))["passed"], p["task_id"]
        assert not run_sandboxed(build_program(p, "    return None\n"))["passed"], p["task_id"]


def test_summary_splits_the_speedup_into_tokens_per_step_and_step_time():
    import random
    from argparse import Namespace
    from collections import Counter

    from benchmarks.csd_eval import _markdown, _summarise

    rng = random.Random(5)

    def rows(tokens_per_step, ms_per_step):
        out = []
        for i in range(4):
            steps = rng.randint(20, 40)
            new = 1 + round(steps * tokens_per_step * rng.uniform(0.9, 1.1))
            prefill = rng.uniform(0.1, 0.3)
            inside = prefill + steps * ms_per_step * rng.uniform(0.9, 1.1) / 1000  # generate's own timer
            seconds = inside + rng.uniform(0.001, 0.01)  # the bench's wall clock around the call
            out.append({"task_id": f"T/{i}", "passed": i % 2 == 0, "timeout": False, "mean_accepted": tokens_per_step - 1,
                        "tok_s": new / seconds, "new_tokens": new, "steps": steps, "seconds": seconds,
                        "generate_seconds": inside, "prefill_seconds": prefill, "logp": torch.randn(new, generator=torch.Generator().manual_seed(i)),
                        "cost": rng.uniform(0, 3), "pairs": Counter({(1, 2): i}), "reply": "x", "stderr": ""})
        return out

    data = {"exact": rows(4.0, 90.0), "csd": rows(5.0, 95.0)}

    class Tok:
        def decode(self, ids):
            return " w" + str(ids[0])

    class Memory:
        def num_pairs(self):
            return 3

    settings = Namespace(problems=4, max_new_tokens=64, seed_prompts=2, seed_tokens=8, lambda_=2.0, tau=0.01,
                         num_draft_tokens=6, draft_bits=4)
    res = _summarise(settings, data, Tok(), Memory(), 10, 1)
    for mode, rs in data.items():
        m = res["modes"][mode]
        steps = sum(r["steps"] for r in rs)
        decode_s = sum(r["generate_seconds"] - r["prefill_seconds"] for r in rs)
        assert m["tokens_per_step"] == pytest.approx(sum(r["new_tokens"] - 1 for r in rs) / steps)
        assert m["ms_per_step"] == pytest.approx(1000 * decode_s / steps)
        assert m["rescue_cost_per_token"] == pytest.approx(sum(r["cost"] for r in rs) / m["new_tokens"])
    r = res["csd_vs_exact"]
    assert r["decode_speedup"] == pytest.approx(r["tokens_per_step_ratio"] / r["ms_per_step_ratio"])
    whole = {m: sum(x["new_tokens"] for x in rs) / sum(x["seconds"] for x in rs) for m, rs in data.items()}
    assert r["speedup_all_calls"] == pytest.approx(whole["csd"] / whole["exact"])
    assert 1.1 < r["tokens_per_step_ratio"] < 1.4  # 5 vs 4 tokens per step, +-10% jitter
    e, c = res["modes"]["exact"], res["modes"]["csd"]
    assert r["rescue_cost_rel"] == pytest.approx(
        (c["rescue_cost_per_token"] - e["rescue_cost_per_token"]) / abs(e["mean_loglik_per_token"]))
    assert "tokens/step" in _markdown(res) and "rescue cost" in _markdown(res)


def test_too_many_seed_prompts_is_an_error_before_any_work(tmp_path):
    from benchmarks.csd_eval import main

    out = tmp_path / "never"
    with pytest.raises(SystemExit, match=r"--seed-prompts=500 with --problems=40: only \d+ held-out"):
        main(["--problems", "40", "--seed-prompts", "500", "--out", str(out)])
    assert not out.exists()


def test_small_run_times_both_modes_with_the_bench_timing(tmp_path):
    """Two problems, eager step: both modes are timed by the bench's wall clock (each record's
    seconds cover generate's own timer), scored and written; the median tok/s is the records'."""
    import statistics

    from benchmarks.csd_eval import main
    from benchmarks.sandbox import isolation_unavailable

    args = ["--problems", "2", "--max-new-tokens", "12", "--seed-prompts", "2", "--seed-tokens", "6",
            "--num-draft-tokens", "3", "--backend", "none", "--out", str(tmp_path)]
    res = main(args + (["--unsafe-exec"] if isolation_unavailable() else []))
    for mode in ("exact", "csd"):
        m = res["modes"][mode]
        per = m["per_problem"]
        assert len(per) == 2 and m["problems"] == 2
        for r in per:
            assert r["seconds"] >= r["generate_seconds"] > r["prefill_seconds"] > 0
            assert r["tok_s"] == pytest.approx(r["new_tokens"] / r["seconds"])
        assert m["tok_s_median"] == pytest.approx(statistics.median(r["tok_s"] for r in per))
    assert (tmp_path / "csd_eval.md").read_text().count("| exact |") == 1
