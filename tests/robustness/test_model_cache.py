"""The converted-model cache names every kind of damage (so the load rebuilds the copy, see
tests/models/test_cache_heal.py for the rebuild itself) and removes temp folders of dead processes."""

import json
import os

import pytest

from csd_compile.models import loader


def _cached_copy(folder):
    """A cache entry as the loader writes it: files plus the record of their sizes, mtimes and hashes."""
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(4096) + b"\x01")  # random, non-zero
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    files = {p.name: loader._file_record(p) for p in sorted(folder.iterdir())}
    (folder / loader._MARKER).write_text(json.dumps({"source": "m.gguf", "version": loader._CACHE_VERSION,
                                                     "files": files}))
    return folder


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def _append(path):
    with open(path, "ab") as f:
        f.write(b"x")


DAMAGE = [
    ("bytes changed, same size", lambda d: _flip(d / "model.safetensors"), r"model.safetensors was modified \(its sha256"),
    ("truncated weights", lambda d: os.truncate(d / "model.safetensors", 100), "model.safetensors has 100 bytes, 4097"),
    ("grown weights", lambda d: _append(d / "model.safetensors"), "has 4098 bytes, 4097 were written"),
    ("missing tokenizer", lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    ("missing record", lambda d: (d / loader._MARKER).unlink(), "record is missing or unreadable"),
    ("junk record", lambda d: (d / loader._MARKER).write_bytes(b"\xff\x00junk"), "record is missing or unreadable"),
    ("record not a dict", lambda d: (d / loader._MARKER).write_text("[1, 2]"), "record is missing or unreadable"),
    ("older record", lambda d: (d / loader._MARKER).write_text('{"version": 1}'), "written by an older version"),
    ("empty file list", lambda d: (d / loader._MARKER).write_text(
        json.dumps({"version": loader._CACHE_VERSION, "files": {}})), "written by an older version"),
]


@pytest.mark.parametrize("damage, phrase", [c[1:] for c in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_damage_is_named(tmp_path, damage, phrase):
    import re

    folder = _cached_copy(tmp_path / "entry")
    assert loader._cache_damage(folder) is None  # whole as written
    damage(folder)
    why = loader._cache_damage(folder)
    assert why is not None and re.search(phrase, why), why


def test_a_touched_but_unchanged_file_stays_whole(tmp_path):
    folder = _cached_copy(tmp_path / "entry")
    os.utime(folder / "model.safetensors", ns=(0, 10**18))
    assert loader._cache_damage(folder) is None
    record = json.loads((folder / loader._MARKER).read_text())
    assert record["files"]["model.safetensors"]["mtime_ns"] == 10**18  # re-recorded: hashed once


@pytest.mark.parametrize("name, removed", [
    ("m-0123.tmp999999999", True),   # its process is gone
    (f"m-0123.tmp{os.getpid()}", False),  # ours: a conversion in progress
    ("m-0123.tmpabc", False),  # not a pid suffix: not ours to judge
    ("m-0123", False),  # a cache entry, not a temp folder
])
def test_temp_folders_of_dead_processes_are_removed(tmp_path, name, removed):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"partial")
    loader._remove_stale_temps(tmp_path)
    assert folder.exists() is not removed
