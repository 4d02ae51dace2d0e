"""The architecture matrix: tiny random models of several Hugging Face families through every path.

For each family (2 layers, small hidden, built from its transformers config, no weights to download;
Gemma 3 also with soft-capped scores and logits, which HF runs on its eager attention):
``backend="csd"`` compiles the forward ``fullgraph=True`` and matches eager (unquantized: within fp32
rounding, since the decode-attention rewrite computes the same softmax in another order; 4 and 8
bits, and ``bits="dynamic"`` with a table calibrated on the family: against the eager ``QLinear`` path
at the same plan); the decode-attention rewrite fires on every SDPA family's decode step and leaves
eager attention alone, with the same logits either way; the speculative engine with the n-gram and
self drafts reproduces the model's own greedy decoding (fp32), sliding windows included. Also: fused
projections (Phi-3) quantize as their parts, linears whose shape does not fit the group stay dense
with one warning, regional compilation (``nested_compile_region``) is quantized inside the region,
and graphs the passes cannot handle (autograd through a quantized linear, linears in a ``torch.cond``
branch, a failing pass) fall back to plain Inductor with one ``CSDFallbackWarning``.
"""

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import csd_compile
from csd_compile import CSDFallbackWarning, quantize_

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def _config(family, layers=2, **overrides):
    import transformers as tf

    common = dict(COMMON, num_hidden_layers=layers) | overrides
    if family == "llama":
        return tf.LlamaConfig(**common), tf.LlamaForCausalLM
    if family == "qwen2":
        return tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    if family == "qwen3":  # q/k norms
        return tf.Qwen3Config(**{"head_dim": 16} | common), tf.Qwen3ForCausalLM
    if family == "mistral":  # sliding window
        return tf.MistralConfig(**common, sliding_window=8), tf.MistralForCausalLM
    if family in ("gemma3", "gemma3_softcap"):  # sliding and global layers, scaled embeddings, query_pre_attn_scalar
        kinds = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
        kw = dict(common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16, layer_types=kinds)
        if family == "gemma3_softcap":  # tanh soft-capping of scores and logits: HF's SDPA refuses it, eager attention
            kw |= dict(attn_logit_softcapping=5.0, final_logit_softcapping=5.0, attn_implementation="eager")
        return tf.Gemma3TextConfig(**kw), tf.Gemma3ForCausalLM
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**dict(common, pad_token_id=0, bos_token_id=1, eos_token_id=2)), tf.Phi3ForCausalLM
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "gemma3_softcap", "phi3"]
SDPA_FAMILIES = {"llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3"}  # the rest run HF's eager attention


def _model(family, seed=0, layers=2, **overrides):
    cfg, cls = _config(family, layers, **overrides)
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


def _passes_only(options, seen):
    """A backend running the csd passes (no Inductor) and recording the SDPA calls before and after."""
    from csd_compile.config import CSDConfig
    from csd_compile.passes import pre_aot_passes
    from csd_compile.passes.decode_attention import _SDPA_TARGETS

    cfg = CSDConfig.from_options(options)

    def backend(gm, example_inputs):
        seen["sdpa_before"] = sum(n.target in _SDPA_TARGETS for n in gm.graph.nodes)
        for _, fn in pre_aot_passes(cfg):
            gm = fn(gm, example_inputs, cfg)
        seen["sdpa_after"] = sum(n.target in _SDPA_TARGETS for n in gm.graph.nodes)
        seen["ops_after"] = sum(n.target is torch.ops.csd.decode_attention.default for n in gm.graph.nodes)
        return gm.forward

    return backend


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_attention_rewrites_each_family_exactly_or_leaves_it(family):
    """A decode step (one query over a static cache, past the sliding window): families on HF's SDPA
    get the rewrite, families on eager attention (soft-capped Gemma 3) keep theirs; logits equal
    eager's either way."""
    import copy

    from transformers import StaticCache

    model = _model(family, seed=5)
    ids = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(6))
    cache = StaticCache(config=model.config, max_cache_len=32)
    seen = {}
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)  # prefill, eager
        twin = copy.deepcopy(cache)
        ref = model(ids[:, -1:], cache=cache, use_cache=True, position_ids=torch.tensor([[12]])).logits
        compiled = torch.compile(model, backend=_passes_only({}, seen), fullgraph=True)
        got = compiled(ids[:, -1:], cache=twin, use_cache=True, position_ids=torch.tensor([[12]])).logits
    if family in SDPA_FAMILIES:
        assert seen == {"sdpa_before": 2, "sdpa_after": 0, "ops_after": 2}  # rewritten in both layers
    else:
        assert seen == {"sdpa_before": 0, "sdpa_after": 0, "ops_after": 0}  # nothing of ours: left as HF wrote it
    assert _rel(got, ref) < 1e-5, _rel(got, ref)


class _ByteTokenizer:
    """Just enough tokenizer for ``calibrate``: one id per character, inside the tiny vocabulary."""

    def __call__(self, text):
        return {"input_ids": [1 + ord(c) % 127 for c in text]}


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_precision_matches_qlinear_at_the_same_plan(family, tmp_path):
    """``bits="dynamic"``: a table calibrated on the family, compiled fullgraph; each call runs the plan the
    previous call's logits chose, and its logits equal the eager ``QLinear`` model set to that plan."""
    from csd_compile.quant import set_bits
    from csd_compile.quant.calibrate import calibrate
    from csd_compile.quant.linear import quantized_linears

    text = " ".join(f"w{i * 7919 % 613}" for i in range(200))  # any text: the KLs only rank the layers
    table = calibrate(_model(family), _ByteTokenizer(), text, group_size=32, window=16, num_windows=4,
                      entropy_buckets=2, progress=False)
    table.save(tmp_path / "table.json")
    model = _model(family)
    options = {"bits": "dynamic", "calibration": str(tmp_path / "table.json"), "avg_bits": 5.0, "group_size": 32}
    eager = quantize_(_model(family), bits=8, group_size=32)
    g = torch.Generator().manual_seed(8)
    counters.clear()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", CSDFallbackWarning)
        compiled = torch.compile(model, backend="csd", options=options, fullgraph=True)
        compiled(torch.randint(1, 128, (1, 12), generator=g))  # chooses the plan of the next call
        plan = [int(b) for _, b in quantized_linears(model)]
        assert len(plan) == len(table.names) and len(set(plan)) > 1, plan  # a mixed plan, one entry per layer
        set_bits(eager, plan)
        ids = torch.randint(1, 128, (1, 12), generator=g)
        got = compiled(ids).logits
        ref = eager(ids).logits
    assert counters["stats"]["unique_graphs"] == 1
    assert _rel(got, ref) < 1e-4, _rel(got, ref)


def test_a_graph_autograd_must_go_through_falls_back_with_one_warning():
    """Compiled for training (grad mode, weights requiring grad): ``csd.qlinear`` has no backward, so the
    quantize pass refuses the graph before changing anything and plain Inductor compiles it."""
    model = _model("qwen3", seed=9)
    ref_model = _model("qwen3", seed=9)
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(model, backend="csd", options={"bits": 4}, fullgraph=True)(ids).logits
    ours = [w for w in caught if issubclass(w.category, CSDFallbackWarning)]
    assert len(ours) == 1 and "require grad" in str(ours[0].message), [str(w.message) for w in ours]
    ref = ref_model(ids).logits
    assert _rel(got, ref) < 1e-5 and got.grad_fn is not None  # still differentiable
    assert not csd_compile.quant.linear.quantized_linears(model)  # nothing was quantized on the way


def test_linears_whose_shape_does_not_fit_the_group_stay_dense_with_one_warning():
    """head_dim 24 (o_proj in_features 4 x 24 = 96) and intermediate 96 against group size 64: those
    linears stay dense, named in one warning (once, however many graphs), the others are quantized."""
    from csd_compile.quant.linear import quantized_linears

    kw = dict(head_dim=24, intermediate_size=96)
    model = _model("qwen3", seed=12, **kw)
    ids = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(13))
    seen = {}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend=_passes_only({"bits": 4, "group_size": 64}, seen), fullgraph=True)
        got = compiled(ids).logits
        compiled(ids[:, :3])  # another graph (new shape) over the same weights: no second warning
    ours = [str(w.message) for w in caught if "left dense" in str(w.message)]
    assert len(ours) == 1, ours
    dense = [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.o_proj", "mlp.down_proj")]
    assert all(name in ours[0] for name in dense), ours[0]
    quantized = {name for name, _ in quantized_linears(model)}
    assert quantized == {f"model.layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_ names the same layers in its own warning
        ref = quantize_(_model("qwen3", seed=12, **kw), bits=4, group_size=64)(ids).logits
    assert _rel(got, ref.detach()) < 1e-4


def test_fused_projections_quantize_as_their_parts():
    """Phi-3 with q/k/v widths 96/24/24 and gate/up 80/80 (none a multiple of 64), group size 32: the
    one quantized copy of ``qkv_proj`` / ``gate_up_proj`` holds, at every rung, exactly the rows that
    quantizing q, k, v (gate, up) one by one gives, and the compiled model matches eager ``QLinear``s."""
    from csd_compile.quant.nested import dequantize, quantize
    from csd_compile.quant.registry import lookup_quantized

    kw = dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=2, intermediate_size=80)
    model = _model("phi3", seed=14, **kw)
    ids = torch.randint(1, 128, (1, 8), generator=torch.Generator().manual_seed(15))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", CSDFallbackWarning)
        got = torch.compile(model, backend="csd", options={"bits": 4, "group_size": 32}, fullgraph=True)(ids).logits
        ref = quantize_(_model("phi3", seed=14, **kw), bits=4, group_size=32)(ids).logits
    assert _rel(got, ref) < 1e-4
    layer = model.model.layers[1]
    for lin, widths in ((layer.self_attn.qkv_proj, (96, 24, 24)), (layer.mlp.gate_up_proj, (80, 80))):
        (fused,) = lookup_quantized(lin.weight)
        parts = [quantize(p, 32) for p in lin.weight.detach().split(widths)]
        for bits in (2, 3, 4, 8):
            whole = dequantize(fused.qdata, fused.scale, fused.zero, bits)
            one_by_one = torch.cat([dequantize(*p, bits) for p in parts])
            assert torch.equal(whole, one_by_one), (lin, bits)


def test_regional_compilation_quantizes_inside_the_region():
    """A model whose decoder layer is a ``torch.compiler.nested_compile_region`` (regional compilation:
    the layer is traced and compiled once, called per layer): the passes reach into the region, each
    call gets its own layer's quantized weights, and logits equal the eager ``QLinear`` model's."""
    from csd_compile.models.regions import mark_decoder_regions

    model = mark_decoder_regions(_model("llama", seed=16, layers=3))
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(17))
    seen = []

    def backend(gm, example_inputs):
        from csd_compile.backend import csd_backend

        calls = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
        seen.append((len(calls), len({n.args[1] for n in calls})))  # (calls, distinct regions)
        return csd_backend(gm, example_inputs, options={"bits": 4, "group_size": 32})

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", CSDFallbackWarning)
        got = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
        ref = quantize_(_model("llama", seed=16, layers=3), bits=4, group_size=32)(ids).logits
    assert seen == [(3, 1)]  # one graph, one region called three times
    assert len(csd_compile.quant.linear.quantized_linears(model)) == 3 * 7
    assert _rel(got, ref) < 1e-4, _rel(got, ref)


def test_linears_inside_another_higher_order_region_fall_back_with_one_warning():
    """Linears inside a ``torch.cond`` branch: their weights are the region's inputs, which the quantize
    pass does not rewrite outside ``nested_compile_region``; plain Inductor, one warning, same output."""

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda t: self.proj(t), lambda t: self.proj(t).neg(), (x,))

    torch.manual_seed(18)
    model = Branchy().eval()
    x = torch.randn(3, 64)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(model, backend="csd", options={"bits": 4}, fullgraph=True)(x)
        ref = model(x)
    ours = [str(w.message) for w in caught if issubclass(w.category, CSDFallbackWarning)]
    assert len(ours) == 1 and "higher-order op" in ours[0], ours
    assert _rel(got, ref) < 1e-5
