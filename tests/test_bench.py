import json

from csd_compile.cli import main


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["bench", "--systems", "hf-bf16,hf-fp32", "--prompts", "2", "--max-new-tokens", "4", "--out", str(out)]) == 0
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


def test_a_row_is_compared_with_its_own_plain_decoding(tmp_path, monkeypatch):
    from csd_compile.bench import SYSTEMS, System  # importing the package registers the systems

    fp32 = SYSTEMS["hf-fp32"]
    monkeypatch.setitem(SYSTEMS, "fp32-again", System("fp32-again", "hf-fp32 once more", fp32.setup, plain="hf-fp32"))
    out = tmp_path / "res"
    assert main(["bench", "--systems", "hf-fp32,fp32-again", "--prompts", "2", "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["summary"]["fp32-again"]
    assert row["plain"] == "hf-fp32" and row["identical_to_plain"] == 2 and row["ratio_vs_plain"] > 0
    assert "hf-fp32, 2/2 identical |" in (out / "results.md").read_text()
