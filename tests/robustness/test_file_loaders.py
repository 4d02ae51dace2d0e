"""Every file loader turns damaged input into its own clear error: random bytes (hypothesis) and
structurally valid files with impossible values."""

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csd_compile import CorrectionMemory, MemoryFileError, load_model
from csd_compile.quant.table import PrecisionTable, TableError

_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(blob=st.binary(max_size=512))
def test_random_bytes_as_a_precision_table(tmp_path, blob):
    path = tmp_path / "t.json"
    path.write_bytes(blob)
    with pytest.raises(TableError, match="t.json"):
        PrecisionTable.load(path)


@_SETTINGS
@given(blob=st.binary(max_size=512))
def test_random_bytes_as_a_correction_memory(tmp_path, blob):
    path = tmp_path / "m.ocm"
    path.write_bytes(blob)
    with pytest.raises(MemoryFileError, match="m.ocm"):
        CorrectionMemory.load(path, fingerprint="f" * 64)


@_SETTINGS
@given(blob=st.binary(max_size=256), magic=st.booleans())
def test_random_bytes_as_a_gguf_model(tmp_path, blob, magic):
    path = tmp_path / "model.gguf"
    path.write_bytes((b"GGUF\x03\x00\x00\x00" if magic else b"") + blob)
    with pytest.raises(ValueError, match="model.gguf"):
        load_model(path, cache_dir=tmp_path / "cache")


def _table_doc():
    layers = [{"name": f"l{i}", "numel": 4096, "kl": [0.5, 0.2, 0.1, 0.01]} for i in range(3)]
    return {"format": "csd-precision-table", "version": 1, "fingerprint": "abc", "ladder": [2, 3, 4, 8],
            "layers": layers, "entropy_quantiles": [0.0, 1.0, 2.0], "settings": {"group_size": 64}}


@pytest.mark.parametrize("edit, phrase", [
    (lambda d: d["layers"][0].update(kl=[-0.5, 0.2, 0.1, 0.0]), "KL values in"),
    (lambda d: d["layers"][1].update(kl=[1e308, 0.2, 0.1, 0.0]), "KL values in"),
    (lambda d: d["layers"][1].update(kl=[math.nan, 0.2, 0.1, 0.0]), "KL values in"),
    (lambda d: d["layers"][2].update(numel=-5), "numel of 'l2' must be a positive int"),
    (lambda d: d["layers"][2].update(numel=0), "numel of 'l2' must be a positive int"),
    (lambda d: d["layers"][2].update(name="l0"), "names must be distinct"),
    (lambda d: d["settings"].update(group_size=48), "group_size=48"),
    (lambda d: d.update(ladder=[4, 2, 3, 8]), "increasing rungs"),
])
def test_precision_table_with_impossible_values(tmp_path, edit, phrase):
    doc = _table_doc()
    PrecisionTable.from_json(json.loads(json.dumps(doc)))  # the untouched document is fine
    edit(doc)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(TableError, match=phrase):
        PrecisionTable.load(path)


@pytest.mark.parametrize("edit, phrase", [
    (lambda k, c, u, e: c.__setitem__(u, 2**30 + 1), r"counts outside \[0, 1073741824\]"),
    (lambda k, c, u, e: c.__setitem__(u, -3), "counts outside"),
    (lambda k, c, u, e: c.__setitem__(e, 7), "count without a pair"),
    (lambda k, c, u, e: k.__setitem__(u, 2**62), "keys outside the token-id range"),
    (lambda k, c, u, e: k.__setitem__(u, k[u] + 1), "outside their bucket"),
])
def test_memory_file_with_impossible_values(tmp_path, edit, phrase):
    mem = CorrectionMemory(num_buckets=16, ways=4, fingerprint="f" * 64)
    g = torch.Generator().manual_seed(0)
    mem.record(torch.randint(0, 1000, (20,), generator=g), torch.randint(0, 1000, (20,), generator=g))
    mem.save(tmp_path / "ok.ocm")
    CorrectionMemory.load(tmp_path / "ok.ocm", fingerprint="f" * 64)  # the untouched file is fine
    keys, counts = mem.keys.clone(), mem.counts.clone()
    used = tuple(int(i) for i in (keys != -1).nonzero()[0])
    empty = tuple(int(i) for i in (keys == -1).nonzero()[0])
    edit(keys, counts, used, empty)
    blob = mem.state_dict()
    blob["keys"], blob["counts"] = keys, counts
    torch.save(blob, tmp_path / "bad.ocm")
    with pytest.raises(MemoryFileError, match=phrase):
        CorrectionMemory.load(tmp_path / "bad.ocm", fingerprint="f" * 64)
