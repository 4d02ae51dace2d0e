"""Every file loader turns damaged input into its own clear error: random bytes (hypothesis) and
structurally valid files with impossible values. The loaders: precision tables, correction memories,
GGUF models (and the context read from their metadata before loading), calibration texts, chat
templates."""

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from csd_compile import CorrectionMemory, MemoryFileError, load_model
from csd_compile.models.hf_generate import resolve_chat_template
from csd_compile.models.loader import context_length
from csd_compile.quant.calibrate import calibration_text
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
@example(blob=bytes(15) + b"\x01" + bytes(7) + b"\x80", magic=True)  # a count past ssize_t (OverflowError)
def test_random_bytes_as_a_gguf_model(tmp_path, blob, magic):
    path = tmp_path / "model.gguf"
    path.write_bytes((b"GGUF\x03\x00\x00\x00" if magic else b"") + blob)
    with pytest.raises(ValueError, match="model.gguf"):
        load_model(path, cache_dir=tmp_path / "cache")


@_SETTINGS
@given(blob=st.binary(max_size=512))
def test_random_bytes_as_a_calibration_text(tmp_path, blob):
    path = tmp_path / "text.txt"
    path.write_bytes(blob)
    try:
        text = calibration_text(str(path))
    except ValueError as e:
        assert "text.txt" in str(e)
    else:  # accepted only as the UTF-8 text it is, with words in it
        assert text == blob.decode("utf-8-sig") and any(c.isalnum() for c in text)


@_SETTINGS
@given(blob=st.binary(max_size=512))
def test_random_bytes_as_a_chat_template(tmp_path, blob):
    path = tmp_path / "template.jinja"
    path.write_bytes(blob)
    try:
        text = resolve_chat_template(str(path))
    except ValueError as e:
        assert "template.jinja" in str(e)
    else:
        assert text == blob.decode("utf-8") and ("{{" in text or "{%" in text)


@_SETTINGS
@given(blob=st.binary(max_size=256), magic=st.booleans(), count=st.integers(0, 2**64 - 1))
def test_random_bytes_as_gguf_metadata(tmp_path, blob, magic, count):
    """The context read before loading never raises and never reads past the file: a positive int or None."""
    path = tmp_path / "model.gguf"
    head = b"GGUF\x03\x00\x00\x00" + (1).to_bytes(8, "little") + count.to_bytes(8, "little") if magic else b""
    path.write_bytes(head + blob)
    value = context_length(path)
    assert value is None or (isinstance(value, int) and value > 0)


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


def _gguf_metadata(context: int) -> bytes:
    """A GGUF v3 header with strings, an array of strings, a u32 array and the context length."""
    def s(text):
        raw = text.encode()
        return len(raw).to_bytes(8, "little") + raw

    def kv(key, kind, payload):
        return s(key) + kind.to_bytes(4, "little") + payload

    items = [
        kv("general.architecture", 8, s("llama")),
        kv("tokenizer.ggml.tokens", 9, (8).to_bytes(4, "little") + (3).to_bytes(8, "little") + s("a") + s("bc") + s("")),
        kv("llama.block_count", 4, (30).to_bytes(4, "little")),
        kv("tokenizer.ggml.scores", 9, (6).to_bytes(4, "little") + (2).to_bytes(8, "little") + bytes(8)),
        kv("llama.context_length", 4, context.to_bytes(4, "little")),
    ]
    return b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + len(items).to_bytes(8, "little") + b"".join(items)


@pytest.mark.parametrize("context", [2048, 8192, 131072])
def test_gguf_context_is_read_and_a_cut_header_never_misreads(tmp_path, context):
    blob = _gguf_metadata(context)
    path = tmp_path / "m.gguf"
    path.write_bytes(blob)
    assert context_length(path) == context
    for cut in range(len(blob)):  # cut anywhere: the true value (when read before the cut) or None
        path.write_bytes(blob[:cut])
        assert context_length(path) in (None, context), cut
    path.write_bytes(blob[:-4] + (0).to_bytes(4, "little"))  # a context of 0 is no context
    assert context_length(path) is None
