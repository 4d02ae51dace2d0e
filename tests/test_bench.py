import json

from csd_compile.cli import main


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["bench", "--systems", "hf-bf16,hf-fp32", "--prompts", "2", "--max-new-tokens", "4", "--out", str(out),
                 "--bandwidth-mib", "16"]) == 0
    result = json.loads((out / "results.json").read_text())
    summary = result["summary"]
    assert set(summary) == {"hf-bf16", "hf-fp32"}
    assert summary["hf-bf16"]["ratio_vs_baseline"] == 1.0 and summary["hf-bf16"]["identical_to_baseline"] == 2
    assert summary["hf-fp32"]["median_tok_s"] > 0
    assert [p["source"] for p in result["prompts"]] == ["mt-bench", "humaneval"]
    assert all(len(recs) == 2 for recs in result["records"].values())
    assert (out / "results.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| hf-bf16 |" in table and "| hf-fp32 |" in table
    assert "| hf-bf16 |" in capsys.readouterr().out
    # the roofline: bandwidth measured in the run, bytes per token from the model's shapes
    bw = result["bandwidth"]
    assert bw["bytes"] == 16 << 20 and bw["gb_s"] > 0 and bw["threads"] == result["threads"]
    from csd_compile import load_model
    from csd_compile.bench.roofline import step_bytes

    model, _ = load_model(result["model"])
    for name, dtype in (("hf-bf16", "bf16"), ("hf-fp32", "fp32")):
        row = summary[name]
        context = sum(p["prompt_tokens"] + (r["new_tokens"] - 1) / 2
                      for p, r in zip(result["prompts"], result["records"][name])) / 2
        assert row["context_len"] == context
        assert row["step_bytes"] == step_bytes(model.config, dtype=dtype, context_len=context)
        assert row["bytes_per_token"] == row["step_bytes"]["total"]
        assert row["roofline_tok_s"] == bw["gb_s"] * 1e9 / row["bytes_per_token"]
        assert row["roofline_fraction"] == row["median_tok_s"] / row["roofline_tok_s"]
    assert summary["hf-fp32"]["step_bytes"]["linears"] == 2 * summary["hf-bf16"]["step_bytes"]["linears"]
    assert f"**{bw['gb_s']:.1f} GB/s**" in table
    r = summary["hf-bf16"]
    assert (f"| bf16 (head bf16) | {r['bytes_per_token'] / 1e6:.1f} | {r['roofline_tok_s']:.0f} "
            f"| {r['roofline_fraction']:.0%} |") in table


def test_a_row_is_compared_with_its_own_plain_decoding(tmp_path, monkeypatch):
    from csd_compile.bench import SYSTEMS, System  # importing the package registers the systems

    fp32 = SYSTEMS["hf-fp32"]
    monkeypatch.setitem(SYSTEMS, "fp32-again", System("fp32-again", "hf-fp32 once more", fp32.setup, plain="hf-fp32"))
    out = tmp_path / "res"
    assert main(["bench", "--systems", "hf-fp32,fp32-again", "--prompts", "2", "--max-new-tokens", "4",
                 "--out", str(out), "--bandwidth-mib", "16"]) == 0
    row = json.loads((out / "results.json").read_text())["summary"]["fp32-again"]
    assert row["plain"] == "hf-fp32" and row["identical_to_plain"] == 2 and row["ratio_vs_plain"] > 0
    assert "hf-fp32, 2/2 identical |" in (out / "results.md").read_text()
    assert row["roofline_tok_s"] is None and row["roofline_note"] == "no precision declared"  # none declared


def test_every_registered_system_declares_its_precision():
    from csd_compile.bench import SYSTEMS

    assert [n for n, s in SYSTEMS.items() if s.precision is None] == []
