"""The converted-model cache heals itself: a damaged or partial copy is detected and rebuilt."""

import json
import os
import warnings

import pytest
import torch

from csd_compile.models import loader


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    model, _ = loader.load_model("smollm2-135m-instruct", dtype="fp32", cache_dir=cache)
    (target,) = [p for p in cache.iterdir() if p.is_dir()]
    ref = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    return cache, target, ref


def test_a_copy_with_changed_bytes_is_rebuilt_with_one_warning(converted):
    cache, target, ref = converted
    meta = json.loads((target / "csd_compile.json").read_text())
    assert meta["version"] == 2 and "model.safetensors" in meta["files"]
    weights = target / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # same size, different bytes, in the middle of the tensors
        f.seek(size // 2)
        chunk = f.read(4096)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.warns(UserWarning, match=r"damaged \(model.safetensors was modified"):
        model, _ = loader.load_model("smollm2-135m-instruct", dtype="fp32", cache_dir=cache)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, ref)
    assert loader._cache_damage(target) is None  # the rebuilt copy is whole


def test_damage_is_named(converted, tmp_path):
    import shutil

    _, target, _ = converted
    copy = tmp_path / "copy"
    shutil.copytree(target, copy)
    assert loader._cache_damage(copy) is None
    os.utime(copy / "config.json")  # touched, same contents: still whole (and re-recorded)
    assert loader._cache_damage(copy) is None
    with open(copy / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert "model.safetensors has 1000 bytes" in loader._cache_damage(copy)
    (copy / "tokenizer.json").unlink()
    (copy / "model.safetensors").unlink()
    assert "is missing" in loader._cache_damage(copy)
    (copy / "csd_compile.json").write_text('{"source": "x", "version": 1}')
    assert "older version" in loader._cache_damage(copy)
    (copy / "csd_compile.json").write_bytes(b"\x00garbage")
    assert "missing or unreadable" in loader._cache_damage(copy)


def test_temp_folders_of_dead_processes_are_removed(converted):
    cache, _, _ = converted
    dead = cache / "SmolLM2-135M-Instruct.Q4_1-0000.tmp999999999"  # no such process
    mine = cache / f"other.tmp{os.getpid()}"
    for d in (dead, mine):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole copy loads without a word
        loader.load_model("smollm2-135m-instruct", dtype="bf16", cache_dir=cache)
    assert not dead.exists() and mine.exists()
