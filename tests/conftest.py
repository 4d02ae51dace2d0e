import pytest
import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_tiny_llama(seed: int = 0, dtype=torch.float32, **overrides):
    """A 2-layer random Llama (hidden 64, vocab 128) in eval mode, deterministic per seed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype).eval()
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # reset() drops compiled code but not the global counters tests read (unique_graphs, ...)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model (bf16) and tokenizer, loaded once per test session."""
    from csd_compile import load_model

    return load_model("smollm2-135m-instruct", dtype="bf16")


_CUDA_TESTS = __import__("pathlib").Path(__file__).resolve().parent / "cuda"


def pytest_ignore_collect(collection_path, config):
    """tests/cuda needs a CUDA device (``make gpu-check`` runs it there); elsewhere it is not collected."""
    if not torch.cuda.is_available() and collection_path.resolve().is_relative_to(_CUDA_TESTS):
        return True
    return None
