"""benchmarks.self_draft_layers: bad arguments refused before the model loads; a short real run."""

import json

import pytest

from benchmarks import self_draft_layers


@pytest.mark.parametrize("argv, match", [
    (["--tokens", "8"], "--tokens must be in 16..4096, got 8"),
    (["--max-skip", "0"], "--max-skip must be in 1..8, got 0"),
    (["--max-skip", "9"], "--max-skip must be in 1..8, got 9"),
])
def test_bad_arguments_exit_with_a_message(argv, match, capsys, monkeypatch):
    monkeypatch.setattr("csd_compile.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit):
        self_draft_layers.main(argv)
    assert match in capsys.readouterr().err


def test_short_run_measures_every_layer_and_writes_its_file(tmp_path):
    result = self_draft_layers.main(["--tokens", "24", "--max-skip", "2", "--out", str(tmp_path)])
    layers = result["layers"]
    assert layers > 2 and sorted(result["single"]) == list(range(layers))
    rows = [result["every_layer"], *result["single"].values(), *(r["agreement"] for r in result["best_together"].values())]
    assert all(set(r) == {"britannica", "humaneval"} and all(0.0 <= v <= 1.0 for v in r.values()) for r in rows)
    # the pair skipped together holds the best single layer, and the 4-bit draft agrees somewhere
    best = max(result["single"], key=lambda i: sum(result["single"][i].values()))
    assert best in result["best_together"][2]["layers"] and len(result["best_together"][2]["layers"]) == 2
    assert sum(result["every_layer"].values()) > 0
    saved = json.loads((tmp_path / "self_draft_layers.json").read_text())
    assert saved["layers"] == layers and len(saved["single"]) == layers
