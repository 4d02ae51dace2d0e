import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.config import CSDConfig
from csd_compile.kernels.attention import attention_ref
from csd_compile.passes.decode_attention import MAX_QUERIES, _SDPA_TARGETS, decode_attention


def _rewritten(fn, *args):
    """Run ``fn`` through Dynamo with a backend that applies the pass; return (output, graph)."""
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"] = decode_attention(gm, example_inputs, CSDConfig.from_options(None))
        return seen["gm"]

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, seen["gm"]


def _sdpa_count(gm):
    return sum(n.op == "call_function" and n.target in _SDPA_TARGETS for n in gm.graph.nodes)


def _op_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.csd.decode_attention.default]


@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(1, MAX_QUERIES),
    length=st.integers(1, 40),
    heads=st.sampled_from([(4, 4), (4, 2), (6, 2)]),
    mask_kind=st.sampled_from(["bool", "float", None]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_short_queries_become_math_attention_with_same_values(t, length, heads, mask_kind, dtype, seed):
    hq, hkv = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, t, 16, generator=g).to(dtype)
    k = torch.randn(2, hkv, length, 16, generator=g).to(dtype)
    v = torch.randn(2, hkv, length, 16, generator=g).to(dtype)
    mask = None
    if mask_kind is not None:
        visible = torch.rand(2, 1, t, length, generator=g) < 0.7
        visible[..., 0] = True  # every query sees at least one slot
        mask = visible if mask_kind == "bool" else torch.zeros(visible.shape).masked_fill(~visible, -1e9).to(dtype)

    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=hq != hkv)

    out, gm = _rewritten(fn, q, k, v, mask)
    assert _sdpa_count(gm) == 0 and len(_op_nodes(gm)) == 1
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask if mask is None or
                                              mask.dtype == torch.bool else mask.float(), scale=0.3,
                                              enable_gqa=hq != hkv)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    assert out.dtype == dtype


def test_long_queries_causal_and_dropout_keep_sdpa():
    q = torch.randn(1, 2, MAX_QUERIES + 1, 8)
    kv = torch.randn(1, 2, MAX_QUERIES + 1, 8)
    _, gm = _rewritten(lambda q, k: F.scaled_dot_product_attention(q, k, k), q, kv)
    assert _sdpa_count(gm) == 1
    q1 = torch.randn(1, 2, 3, 8)
    _, gm = _rewritten(lambda q, k: F.scaled_dot_product_attention(q, k, k, is_causal=True), q1, torch.randn(1, 2, 3, 8))
    assert _sdpa_count(gm) == 1


def test_attention_ref_matches_sdpa_eagerly():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 3, 2, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(attention_ref(q, k, v), F.scaled_dot_product_attention(q, k, v))


@torch.no_grad()
def test_tiny_llama_decode_step_has_no_sdpa_and_same_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    from csd_compile.speculative.cache import RowCache
    from csd_compile.speculative.drafts import model_forward

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    pad = torch.zeros(1, dtype=torch.long)
    prompt = torch.randint(0, 96, (1, 9))

    def prefilled_cache():
        cache = RowCache(cfg, 1, 32, dtype=torch.float32)
        model_forward(model, cache, prompt[:, :6], torch.zeros(1, dtype=torch.long), pad, 1)
        return cache

    eager_cache, cache = prefilled_cache(), prefilled_cache()
    eager = model_forward(model, eager_cache, prompt[:, 6:], torch.tensor([6]), pad, 3)
    out, gm = _rewritten(lambda ids, start: model_forward(model, cache, ids, start, pad, 3), prompt[:, 6:], torch.tensor([6]))
    assert _sdpa_count(gm) == 0 and len(_op_nodes(gm)) == 2  # the speculative engine's row cache
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def _val_shape(node):
    return tuple(node.meta["example_value"].shape)


@torch.no_grad()
def test_grouped_query_cache_reaches_the_op_unrepeated_and_tokens_match_eager():
    """HF repeats a grouped-query cache (expand + reshape) before SDPA; the op gets the cache itself,
    and a greedy decode over a static cache gives eager's tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from csd_compile.models.greedy import GreedyDecoder

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=600)
    model = LlamaForCausalLM(cfg).eval()
    seen = []

    def backend(gm, example_inputs):
        gm = decode_attention(gm, example_inputs, CSDConfig.from_options(None))
        seen.extend(_op_nodes(gm))
        return gm

    ids = torch.randint(0, 96, (1, 7))
    ref = GreedyDecoder(model, backend=None)(ids, max_new_tokens=24)
    from torch._dynamo import register_backend

    register_backend(backend, name="_decode_attention_only")
    out = GreedyDecoder(model, backend="_decode_attention_only")(ids, max_new_tokens=24)
    assert torch.equal(out, ref)
    assert len(seen) == 2  # one per layer
    for node in seen:
        q, k, v = node.args[:3]
        assert _val_shape(q)[1] == 6 and _val_shape(k)[1] == 2 and _val_shape(v)[1] == 2
        assert k.op == "placeholder" and v.op == "placeholder"  # the cache tensors themselves


@given(group=st.integers(1, 3), seed=st.integers(0, 2**16))
@settings(max_examples=6, deadline=None)
def test_repeat_interleave_of_the_cache_is_undone_too(group, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2 * group, 1, 8, generator=g)
    k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(2))
    mask = torch.arange(12).view(1, 1, 1, 12) < 7

    def fn(q, k, v, mask):
        kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

    out, gm = _rewritten(fn, q, k, v, mask)
    (node,) = _op_nodes(gm)
    assert node.args[1].op == "placeholder" and node.args[2].op == "placeholder"
    torch.testing.assert_close(out, fn(q, k, v, mask), rtol=1e-5, atol=1e-6)


def test_a_symbolic_cache_length_still_gets_the_op():
    """After a second cache size Dynamo recompiles the step with a symbolic length; the op takes it."""
    seen = []

    def backend(gm, example_inputs):
        gm = decode_attention(gm, example_inputs, CSDConfig.from_options(None))
        seen.append([isinstance(n.args[1].meta["example_value"].shape[2], torch.SymInt) for n in _op_nodes(gm)])
        return gm

    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for s in (16, 40, 64):
        q = torch.randn(1, 2, 1, 8, generator=g)
        k, v = (torch.randn(1, 2, s, 8, generator=g) for _ in range(2))
        mask = torch.arange(s).view(1, 1, 1, s) < s // 2
        torch.testing.assert_close(compiled(q, k, v, mask), fn(q, k, v, mask), rtol=1e-5, atol=1e-6)
    assert seen == [[False], [True]]  # static, then one symbolic graph serving 40 and 64
