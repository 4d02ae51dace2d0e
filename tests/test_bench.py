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
