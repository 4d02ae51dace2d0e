"""The architecture matrix: tiny random models of several Hugging Face families through every path.

For each family (2 layers, small hidden, built from its transformers config, no weights to
download): ``backend="csd"`` compiles the forward ``fullgraph=True`` and matches eager (unquantized:
within fp32 rounding, since the decode-attention rewrite computes the same softmax in another
order; 4 and 8 bits: against the eager ``QLinear`` path at the same bits), and the speculative
engine with the n-gram and self drafts reproduces the model's own greedy decoding (fp32), sliding
windows included (the engine's masks carry them: Mistral and Gemma 3 decoded wrong text past the
window before).
"""

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import csd_compile
from csd_compile import CSDFallbackWarning, quantize_

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def _config(family):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**COMMON), tf.LlamaForCausalLM
    if family == "qwen2":
        return tf.Qwen2Config(**COMMON), tf.Qwen2ForCausalLM
    if family == "qwen3":  # q/k norms
        return tf.Qwen3Config(**COMMON, head_dim=16), tf.Qwen3ForCausalLM
    if family == "mistral":  # sliding window
        return tf.MistralConfig(**COMMON, sliding_window=8), tf.MistralForCausalLM
    if family == "gemma3":  # sliding and global layers, scaled embeddings, query_pre_attn_scalar
        cfg = tf.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                  layer_types=["sliding_attention", "full_attention"])
        return cfg, tf.Gemma3ForCausalLM
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        kw = dict(COMMON, pad_token_id=0)
        return tf.Phi3Config(**kw), tf.Phi3ForCausalLM
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3"]


def _model(family, seed=0):
    cfg, cls = _config(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # random weights of a realistic scale (some inits are zero or tiny)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [None, 4, 8])
def test_backend_matches_eager(family, bits):
    model = _model(family)
    ids = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    options = {} if bits is None else {"bits": bits, "group_size": 32}
    counters.clear()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", CSDFallbackWarning)  # the passes handle the family: no fallback
        got = torch.compile(model, backend="csd", options=options, fullgraph=True)(ids).logits
    with torch.no_grad():
        ref_model = model if bits is None else quantize_(_model(family), bits=bits, group_size=32)
        ref = ref_model(ids).logits
    assert counters["stats"]["unique_graphs"] == 1
    assert _rel(got, ref) < (1e-5 if bits is None else 1e-4), _rel(got, ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("draft", ["ngram", "self"])
def test_speculative_decoding_equals_plain_greedy(family, draft):
    model = _model(family, seed=2)
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([ids, ids[:, :6]], dim=1)  # a repeat, so the n-gram draft proposes
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    out, stats = csd_compile.generate(model, ids, draft=draft, max_new_tokens=20, compile_backend=None,
                                      eos_token_id=[], return_stats=True)
    assert torch.equal(out, ref), (out, ref)
    assert stats["new_tokens"] == 20


def test_a_family_the_passes_cannot_handle_falls_back_with_one_warning(monkeypatch):
    """Any pass failure on a family's graph: one CSDFallbackWarning and plain Inductor's result."""
    import csd_compile.passes.quantize_linear as ql

    def broken(gm, example_inputs, cfg):
        raise NotImplementedError("a layer this pass does not know")

    monkeypatch.setattr(ql, "quantize_linear", broken)
    model = _model("gemma3")
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(model, backend="csd", options={"bits": 4}, fullgraph=True)(ids).logits
        ref = model(ids).logits
    ours = [w for w in caught if issubclass(w.category, CSDFallbackWarning)]
    assert len(ours) == 1 and "a layer this pass does not know" in str(ours[0].message)
    assert _rel(got, ref) < 1e-5
