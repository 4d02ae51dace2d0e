"""Calibration: KL sensitivity table, its file format and the errors on bad input."""

import json

import pytest
import torch

from csd_compile.quant import calibrate as cal
from csd_compile.quant.calibrate import calibrate, calibration_text
from csd_compile.quant.table import PrecisionTable, TableError, model_fingerprint, quantizable_linears
from tests.conftest import make_tiny_llama


def char_tokenizer(text):
    return {"input_ids": [ord(c) % 128 for c in text]}


TEXT = calibration_text()[:3000]


@pytest.fixture(scope="module")
def table_and_model():
    model = make_tiny_llama(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = calibrate(model, char_tokenizer, TEXT, window=16, num_windows=3, progress=False)
    return table, model, before


def test_table_covers_every_quantizable_linear_and_rung(table_and_model):
    table, model, _ = table_and_model
    names = [n for n, _ in quantizable_linears(model)]
    assert list(table.names) == names and len(names) == 14  # 7 per block, LM head excluded
    assert "lm_head" not in names
    assert table.ladder == (2, 3, 4, 8)
    kl = torch.tensor(table.kl)
    assert (kl >= 0).all() and torch.isfinite(kl).all()
    # lower precision hurts more, on average over layers
    assert kl[:, 0].mean() > kl[:, 2].mean() > kl[:, 3].mean()
    assert table.fingerprint == model_fingerprint(model)
    assert table.settings["window"] == 16 and table.settings["num_windows"] == 3


def test_weights_restored(table_and_model):
    _, model, before = table_and_model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_replay_matches_full_forwards(table_and_model, monkeypatch):
    table, model, _ = table_and_model
    monkeypatch.setattr(cal, "_blocks", lambda m: None)  # run every variant in full
    full = calibrate(model, char_tokenizer, TEXT, window=16, num_windows=3, progress=False)
    torch.testing.assert_close(torch.tensor(full.kl), torch.tensor(table.kl), rtol=1e-3, atol=1e-6)


def test_kl_matches_direct_computation(table_and_model):
    table, model, _ = table_and_model
    from csd_compile.quant.nested import fake_quantize

    i, r = 5, 1  # one layer, 3 bits
    name = table.names[i]
    lin = dict(model.named_modules())[name]
    batch = cal._windows(torch.tensor(char_tokenizer(TEXT)["input_ids"]), 16, 3)
    with torch.no_grad():
        ref = torch.log_softmax(model(batch).logits.float(), -1)
        saved = lin.weight.clone()
        lin.weight.copy_(fake_quantize(saved, 3, 64))
        low = torch.log_softmax(model(batch).logits.float(), -1)
        lin.weight.copy_(saved)
    expect = torch.nn.functional.kl_div(low, ref, log_target=True, reduction="none").sum(-1).mean()
    assert table.kl[i][r] == pytest.approx(float(expect), rel=1e-3)


def test_identity_quantizer_gives_zero_kl():
    model = make_tiny_llama(seed=2)
    t = calibrate(model, char_tokenizer, TEXT, ladder=(4, 8), window=8, num_windows=2, progress=False,
                  fake_quantize=lambda w, b, g: w.clone())
    assert max(max(r) for r in t.kl) < 1e-6


def test_save_load_roundtrip(tmp_path, table_and_model):
    table, model, _ = table_and_model
    path = tmp_path / "t.json"
    table.save(path)
    loaded = PrecisionTable.load(path, model)
    assert loaded == table and loaded.kl_by_entropy is not None
    assert json.loads(path.read_text())["version"] == 2


def test_kl_by_entropy_splits_the_positions_into_equally_likely_buckets(table_and_model):
    table, model, _ = table_and_model
    assert table.num_entropy_buckets == 4 and list(table.entropy_edges) == sorted(table.entropy_edges)
    by = torch.tensor(table.kl_by_entropy)  # [L, R, NB]
    assert by.shape == (len(table.names), len(table.ladder), 4) and (by >= 0).all()
    # 48 positions, 12 per bucket: the mean of the bucket means is the overall mean
    torch.testing.assert_close(by.mean(-1), torch.tensor(table.kl), rtol=1e-5, atol=1e-7)  # both clamped at 0
    # against a direct computation for one layer and rung, bucketing by the reference entropy
    from csd_compile.quant.nested import fake_quantize

    i, r = 3, 0
    lin = dict(model.named_modules())[table.names[i]]
    batch = cal._windows(torch.tensor(char_tokenizer(TEXT)["input_ids"]), 16, 3)
    with torch.no_grad():
        ref = torch.log_softmax(model(batch).logits.float(), -1)
        saved = lin.weight.clone()
        lin.weight.copy_(fake_quantize(saved, table.ladder[r], 64))
        low = torch.log_softmax(model(batch).logits.float(), -1)
        lin.weight.copy_(saved)
    kl = torch.nn.functional.kl_div(low, ref, log_target=True, reduction="none").sum(-1).flatten()
    h = -(ref.exp() * ref).sum(-1).flatten()
    order = h.argsort()
    for b in range(4):
        assert table.kl_by_entropy[i][r][b] == pytest.approx(float(kl[order[12 * b:12 * (b + 1)]].mean()), rel=1e-3)


def test_version_1_table_still_loads(tmp_path, table_and_model):
    table, model, _ = table_and_model
    doc = table.to_json()
    doc["version"] = 1
    del doc["entropy_edges"]
    for layer in doc["layers"]:
        del layer["kl_by_entropy"]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(doc))
    old = PrecisionTable.load(path, model)
    assert old.kl == table.kl and old.kl_by_entropy is None and old.num_entropy_buckets is None


def test_too_few_positions_for_the_entropy_buckets():
    with pytest.raises(ValueError, match="entropy_buckets=8"):
        calibrate(make_tiny_llama(), char_tokenizer, TEXT, window=4, num_windows=2, entropy_buckets=8, progress=False)


def test_table_from_another_model_is_refused(tmp_path, table_and_model):
    table, _, _ = table_and_model
    path = tmp_path / "t.json"
    table.save(path)
    other = make_tiny_llama(seed=3)
    with pytest.raises(TableError, match="another model"):
        PrecisionTable.load(path, other)
    wider = make_tiny_llama(seed=1, intermediate_size=256)
    with pytest.raises(TableError, match="csd-compile calibrate"):
        table.check_model(wider)


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"hello": 1}),
    json.dumps({"format": "csd-precision-table", "version": 99}),
    json.dumps({"format": "csd-precision-table", "version": 1, "fingerprint": "x", "ladder": [2, 8]}),
    json.dumps({"format": "csd-precision-table", "version": 1, "fingerprint": "x", "ladder": [8, 2],
                "layers": [{"name": "a", "numel": 4, "kl": [1.0, 0.0]}], "entropy_quantiles": [0.0, 1.0]}),
    json.dumps({"format": "csd-precision-table", "version": 1, "fingerprint": "x", "ladder": [2, 8],
                "layers": [{"name": "a", "numel": 4, "kl": [1.0]}], "entropy_quantiles": [0.0, 1.0]}),
    # version 2 without its per-entropy KL, or with the wrong number of buckets
    json.dumps({"format": "csd-precision-table", "version": 2, "fingerprint": "x", "ladder": [2, 8],
                "layers": [{"name": "a", "numel": 4, "kl": [1.0, 0.0]}], "entropy_quantiles": [0.0, 1.0]}),
    json.dumps({"format": "csd-precision-table", "version": 2, "fingerprint": "x", "ladder": [2, 8],
                "layers": [{"name": "a", "numel": 4, "kl": [1.0, 0.0], "kl_by_entropy": [[1.0], [0.0]]}],
                "entropy_quantiles": [0.0, 1.0], "entropy_edges": [0.5]}),
])
def test_corrupt_table_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TableError, match="table"):
        PrecisionTable.load(path)


def test_missing_table_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="csd-compile calibrate"):
        PrecisionTable.load(tmp_path / "nope.json")


def test_text_shorter_than_one_window():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="shorter than one window"):
        calibrate(model, char_tokenizer, "too short", window=32, progress=False)


@pytest.mark.parametrize("kw", [dict(ladder=(4, 5)), dict(ladder=()), dict(group_size=48), dict(window=0),
                                dict(num_windows=-1), dict(entropy_buckets=0), dict(entropy_buckets=True)])
def test_bad_settings(kw):
    with pytest.raises(ValueError):
        calibrate(make_tiny_llama(), char_tokenizer, TEXT, progress=False, **kw)


def test_already_quantized_model_is_refused():
    from csd_compile.quant import quantize_

    model = quantize_(make_tiny_llama(), bits=8)
    with pytest.raises(TypeError, match="unquantized"):
        calibrate(model, char_tokenizer, TEXT, progress=False)


def test_britannica_text_is_shipped():
    text = calibration_text("britannica")
    assert len(text) > 100_000 and "Shakespeare" in text[:500] and "###" not in text
    with pytest.raises(ValueError, match="britannica"):
        calibration_text("no-such-text")


def test_positions_scores_the_last_tokens_only(table_and_model):
    table, model, _ = table_and_model
    t = calibrate(model, char_tokenizer, TEXT, ladder=(2,), window=16, num_windows=3, positions=4, entropy_buckets=2,
                  progress=False)
    assert t.settings["positions"] == 4 and len(t.kl) == len(table.kl)
    assert all(r[0] > 0 for r in t.kl)
    with pytest.raises(ValueError, match="positions"):
        calibrate(model, char_tokenizer, TEXT, window=16, positions=17, progress=False)


def test_fingerprint_is_dtype_and_quantization_invariant():
    from csd_compile.quant import quantize_
    from csd_compile.quant.table import weights_fingerprint

    fp = model_fingerprint(make_tiny_llama(seed=8))
    assert model_fingerprint(make_tiny_llama(seed=8, dtype=torch.bfloat16)) == fp
    assert model_fingerprint(quantize_(make_tiny_llama(seed=8), bits=4)) == fp
    m = make_tiny_llama(seed=8)
    assert weights_fingerprint([(n, l.weight) for n, l in quantizable_linears(m)]) == fp
    assert model_fingerprint(make_tiny_llama(seed=9)) != fp
