"""The split itself, in one process (no process group: each rank's shard is built from a TPInfo):
shards put back together give the full weights, the MLP and attention projections' partial outputs
sum to the full ones, and every shape that cannot be split is a clear error."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.config import OptionError
from csd_compile.parallel import (RowParallelLinear, TPInfo, check_group_size, check_same_sharding, check_split,
                                   plan_shards, shard_model)
from tests.conftest import make_tiny_llama, tiny_llama_config


def _shards(model, world):
    return [shard_model(model, TPInfo(r, world, None, "gloo")) for r in range(world)]


@st.composite
def _shapes(draw):
    kv = draw(st.integers(1, 5))
    groups = draw(st.integers(1, 3))
    world = draw(st.integers(1, kv))
    head_dim = draw(st.sampled_from([4, 8]))
    inter = draw(st.integers(world, 40))
    return dict(num_key_value_heads=kv, num_attention_heads=kv * groups, head_dim=head_dim, hidden_size=kv * groups * head_dim,
                intermediate_size=inter, num_hidden_layers=1, vocab_size=32), world


@settings(max_examples=25, deadline=None)
@given(_shapes(), st.integers(0, 2**16))
def test_shards_reassemble_and_partial_sums_match(shape, seed):
    overrides, world = shape
    model = make_tiny_llama(seed, **overrides)
    shards = _shards(model, world)
    layer = model.model.layers[0]
    locals_ = [s.model.layers[0] for s in shards]
    for name in ("q_proj", "k_proj", "v_proj"):
        full = getattr(layer.self_attn, name).weight
        assert torch.equal(torch.cat([getattr(s.self_attn, name).weight for s in locals_]), full)
    for name in ("gate_proj", "up_proj"):
        assert torch.equal(torch.cat([getattr(s.mlp, name).weight for s in locals_]), getattr(layer.mlp, name).weight)
    assert torch.equal(torch.cat([s.self_attn.o_proj.weight for s in locals_], dim=1), layer.self_attn.o_proj.weight)
    assert all(isinstance(s.mlp.down_proj, RowParallelLinear) for s in locals_)
    # the MLP: the row-parallel partial sums add up to the full output (the all-reduce's job)
    x = torch.randn(3, overrides["hidden_size"], generator=torch.Generator().manual_seed(seed))
    parts = [F.linear(F.silu(s.mlp.gate_proj(x)) * s.mlp.up_proj(x), s.mlp.down_proj.weight) for s in locals_]
    torch.testing.assert_close(sum(parts), layer.mlp(x), rtol=1e-5, atol=1e-6)
    # per-rank configs: whole KV groups, query heads follow their KV heads, nothing lost
    cfgs = [s.config for s in shards]
    assert sum(c.num_key_value_heads for c in cfgs) == overrides["num_key_value_heads"]
    assert sum(c.num_attention_heads for c in cfgs) == overrides["num_attention_heads"]
    assert all(c.num_key_value_heads >= 1 for c in cfgs)
    assert sum(c.intermediate_size for c in cfgs) == overrides["intermediate_size"]
    assert model.config.num_key_value_heads == overrides["num_key_value_heads"]  # the input is left alone


def test_embedded_model_shape_at_tp2_is_uneven_by_kv_group():
    cfg = tiny_llama_config(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
    plan = plan_shards(cfg, 2)
    assert plan.kv_heads == ((0, 2), (2, 3))
    assert plan.intermediate == ((0, 768), (768, 1536))
    assert plan.row_parallel_widths(0) == {"o_proj": 384, "down_proj": 768}
    assert plan.row_parallel_widths(1) == {"o_proj": 192, "down_proj": 768}
    check_group_size(cfg, 2, 64)
    with pytest.raises(ValueError, match=r"group_size=128 .* rank 1's o_proj shard has 192 input features.*fit: \[32, 64\]"):
        check_group_size(cfg, 2, 128)


def test_check_split_resolves_the_group_size_as_the_backend_does(tmp_path):
    # 3 heads of 32 features per rank: o_proj shards of 96 input features fit groups of 32, not 64
    cfg = tiny_llama_config(hidden_size=192, num_attention_heads=6, num_key_value_heads=2, intermediate_size=256)
    assert plan_shards(cfg, 2).row_parallel_widths(0)["o_proj"] == 96
    check_split(cfg, 2, None)  # no quantization: nothing to fit
    check_split(cfg, 2, {"bits": "auto"})  # group 32, the GGUF blocks
    check_split(cfg, 2, {"bits": 4, "group_size": 32})
    with pytest.raises(ValueError, match=r"group_size=64 does not fit .* 96 input features.*fit: \[32\]"):
        check_split(cfg, 2, {"bits": 4})  # group 64 when not given
    table = tmp_path / "table.json"
    table.write_text("{}")  # the option's own check wants a file; the split is refused before it is read
    with pytest.raises(ValueError, match="bits='dynamic' is not supported with --tp yet"):
        check_split(cfg, 2, {"bits": "dynamic", "calibration": str(table)})
    with pytest.raises(ValueError, match="over 3 ranks cannot shard 2 KV heads"):
        check_split(cfg, 3, {"bits": "auto"})
    with pytest.raises(OptionError, match="group_size"):
        check_split(cfg, 2, {"bits": "auto", "group_size": 64})  # the options themselves checked first


def test_world_larger_than_kv_heads_is_an_error():
    cfg = tiny_llama_config(num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"over 3 ranks cannot shard 2 KV heads .* use at most 2 ranks"):
        plan_shards(cfg, 3)
    with pytest.raises(ValueError, match=r"world size 0"):
        plan_shards(cfg, 0)


def test_draft_that_cannot_be_sharded_the_same_way():
    target = make_tiny_llama(0)
    draft = make_tiny_llama(1, num_attention_heads=2, num_key_value_heads=1)
    info = TPInfo(0, 2, None, "gloo")
    sharded = shard_model(target, info)
    with pytest.raises(ValueError, match="over 2 ranks cannot shard 1 KV heads"):
        shard_model(draft, info)
    with pytest.raises(ValueError, match="target model is sharded .* but the draft is not"):
        check_same_sharding(sharded, draft)
    from csd_compile import generate

    with pytest.raises(ValueError, match="draft is not"):
        generate(sharded, torch.tensor([[3, 4, 5]]), draft=draft, max_new_tokens=2, compile_backend=None)


def test_model_without_a_plan_and_double_sharding():
    model = make_tiny_llama(0)
    info = TPInfo(0, 2, None, "gloo")
    sharded = shard_model(model, info)
    with pytest.raises(ValueError, match="already sharded"):
        shard_model(sharded, info)
    model.config.base_model_tp_plan = None
    with pytest.raises(ValueError, match="has no tensor-parallel plan"):
        shard_model(model, info)
