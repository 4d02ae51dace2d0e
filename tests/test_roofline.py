import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from csd_compile.bench.roofline import (GGUF_Q4_1, GGUF_Q8_0, Precision, measure_bandwidth, roofline_row,
                                        step_bytes)


def _config(**kw):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128)
    return LlamaConfig(**(base | kw))


def _by_hand(config, *, per_weight, group, per_group, dtype_bytes, head_per_weight, head_per_group, ctx):
    """Count every linear's weights from a real model instance and price them by hand."""
    model = LlamaForCausalLM(config)
    head = model.lm_head
    linears = lm_head = 0.0
    seen = {id(model.model.embed_tokens.weight)}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            n, k = module.weight.shape
            if module is head:
                lm_head = n * k * head_per_weight + n * (k // 32) * head_per_group
            elif k % group == 0:
                linears += n * k * per_weight + n * (k // group) * per_group
            else:  # the quantize pass leaves it alone: dense
                linears += n * k * dtype_bytes
            seen.add(id(module.weight))
    norms = sum(p.numel() for p in model.parameters() if id(p) not in seen) * dtype_bytes
    head_dim = config.hidden_size // config.num_attention_heads
    kv = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * ctx * dtype_bytes
    return {"linears": linears, "lm_head": lm_head, "kv_cache": kv, "embedding_row": config.hidden_size * dtype_bytes,
            "norms": norms}


@pytest.mark.parametrize("bits,per_weight", [(4, 0.5), (2, 0.5), (8, 1.0)])
def test_step_bytes_matches_a_hand_count_from_the_modules(bits, per_weight):
    config = _config()
    got = step_bytes(config, bits=bits, group_size=32, dtype="bf16", context_len=10.5)
    want = _by_hand(config, per_weight=per_weight, group=32, per_group=8, dtype_bytes=2, head_per_weight=2,
                    head_per_group=0, ctx=10.5)
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert got["total"] == pytest.approx(sum(want.values()))
    # 7 linears per layer (q, k, v, o, gate, up, down): 64x64 q/o, 32x64 k/v, 128x64 gate/up, 64x128 down
    weights = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)
    assert got["linears"] == weights * per_weight + weights / 32 * 8
    assert got["lm_head"] == 256 * 64 * 2


def test_step_bytes_from_the_model_equals_from_its_config_and_counts_unfit_linears_dense():
    config = _config(intermediate_size=96)  # down_proj: in_features 96 is no multiple of 64
    model = LlamaForCausalLM(config)
    got = step_bytes(model, bits=4, group_size=64, context_len=0)
    assert got == step_bytes(config, bits=4, group_size=64, context_len=0)
    want = _by_hand(config, per_weight=0.5, group=64, per_group=8, dtype_bytes=2, head_per_weight=2,
                    head_per_group=0, ctx=0)
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert got["kv_cache"] == 0


def test_step_bytes_fp32_quantized_head_and_gguf_formats():
    config = _config()
    dense = step_bytes(config, dtype="fp32", context_len=4)
    n_linear = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)
    assert dense["linears"] == 4 * n_linear and dense["lm_head"] == 4 * 256 * 64
    assert dense["kv_cache"] == 2 * 2 * 2 * 16 * 4 * 4
    q8 = step_bytes(config, bits=8, group_size=32, dtype="fp32", quantize_lm_head=True, context_len=4)
    assert q8["lm_head"] == 256 * 64 + 256 * 2 * 8
    gguf = step_bytes(config, dtype="fp32", weight_format=GGUF_Q4_1, head_format=GGUF_Q8_0, kv_dtype="fp16",
                      context_len=4)
    assert gguf["linears"] == n_linear * 0.5 + n_linear / 32 * 4
    assert gguf["lm_head"] == 256 * 64 + 256 * 2 * 2
    assert gguf["kv_cache"] == dense["kv_cache"] / 2


def test_step_bytes_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="bits=5"):
        step_bytes(_config(), bits=5)
    with pytest.raises(ValueError, match="group_size=48"):
        step_bytes(_config(), bits=4, group_size=48)
    with pytest.raises(ValueError, match="'fp8'"):
        step_bytes(_config(), dtype="fp8")
    with pytest.raises(ValueError, match="context_len=-1"):
        step_bytes(_config(), context_len=-1)
    with pytest.raises(ValueError, match="draft='maybe'"):
        Precision(draft="maybe")


def test_measure_bandwidth_is_a_positive_finite_rate():
    bw = measure_bandwidth(8 << 20, repeats=3)
    assert math.isfinite(bw["gb_s"]) and 0 < bw["gb_s"] <= bw["gb_s_best"]
    assert bw["bytes"] == 8 << 20 and bw["threads"] == torch.get_num_threads() and bw["repeats"] == 3
    with pytest.raises(ValueError, match="nbytes=10"):
        measure_bandwidth(10)


def test_roofline_row_plain_free_draft_and_model_draft():
    config = _config()
    plain = roofline_row(Precision(bits=4, group_size=32), config, context_len=8, gb_s=10.0, tok_s=100.0)
    total = step_bytes(config, bits=4, group_size=32, context_len=8)["total"]
    assert plain["bytes_per_token"] == total and plain["roofline_tok_s"] == pytest.approx(10e9 / total)
    assert plain["roofline_fraction"] == pytest.approx(100.0 / plain["roofline_tok_s"])
    assert plain["weights"] == "nested-int4-g32 (head bf16)"
    free = roofline_row(Precision(draft="free"), config, context_len=8, gb_s=10.0, tok_s=100.0,
                        tokens_per_target_forward=2.0)
    assert free["bytes_per_token"] == step_bytes(config, context_len=8)["total"] / 2
    model = roofline_row(Precision(draft="model"), config, context_len=8, gb_s=10.0, tok_s=100.0)
    assert model["roofline_tok_s"] is None and "not applicable" in model["roofline_note"]
    assert roofline_row(None, config, context_len=8, gb_s=10.0, tok_s=1.0)["roofline_fraction"] is None


def test_auto_counts_each_weight_at_its_gguf_type_head_included(tmp_path):
    """bits="auto": a Q4_0 / Q4_1 linear at 0.5 byte + 4 per 32 (the fp16 pair), a Q4_K one at 0.5 +
    8, a Q8_0 one (and the tied Q8_0 head) at 1 byte + 2 per 32 (its fp16 step), an approximated
    type at 8 bits + 8 per 32, an F16 one at the dtype."""
    import pytest

    from csd_compile import load_model
    from csd_compile.bench.roofline import Precision, nested_format, step_bytes
    from csd_compile.bench import SYSTEMS
    from tests.gguf_files import T, write_tiny_llama

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, {"attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.Q8_0, "attn_output": T.Q5_0,
                            "ffn_gate": T.F16, "ffn_up": T.Q4_0, "ffn_down": T.Q4_K, "token_embd": T.Q8_0})
    model, _ = load_model(path, dtype="bf16", cache_dir=tmp_path / "cache")
    q4, q4h, q8 = nested_format(4, 32), nested_format(4, 32, scale_bytes=4), nested_format(8, 32)
    q8s = nested_format(8, 32, scale_bytes=2)
    assert (q4h.bytes_per_group, q4.bytes_per_group, q4h.name) == (4.0, 8.0, "nested-int4-g32-fp16")
    assert (q8s.bytes_per_group, q8s.name) == (2.0, "nested-int8-g32-sym-fp16")
    with pytest.raises(ValueError, match="scale_bytes=3"):
        nested_format(8, 32, scale_bytes=3)
    layer = (q4h.nbytes(64, 64) + q4h.nbytes(32, 64) + q8s.nbytes(32, 64) + q8.nbytes(64, 64)  # q, k, v, o (Q5_0)
             + 2 * 256 * 64 + q4h.nbytes(256, 64) + q4.nbytes(64, 256))  # gate F16 (bf16), up, down (Q4_K)
    parts = step_bytes(model, bits="auto", dtype="bf16")
    assert parts["linears"] == 2 * layer
    assert parts["lm_head"] == q8s.nbytes(258, 64) == 258 * 64 * (1 + 2 / 32)
    assert Precision(bits="auto").step_bytes(model, 0.0) == parts
    assert Precision(bits="auto").label(model) == ("auto: nested-int4-g32-fp16 x6, nested-int8-g32-sym-fp16 x2, "
                                                   "nested-int8-g32 x2, bf16 x2, nested-int4-g32 x2 "
                                                   "(head nested-int8-g32-sym-fp16)")
    with pytest.raises(ValueError, match="pass the loaded model, not its config"):
        step_bytes(model.config, bits="auto")
    row = SYSTEMS["csd-auto"]
    assert row.precision == Precision(bits="auto") and not row.default


def test_static_bits_count_the_head_as_its_file_stores_it(tmp_path):
    """bits=4 (quantize_lm_head=None): a Q8_0 head at 1 byte + 2 per 32 (its file's grid, the fp16
    step alone), as the quantize pass runs it; a Q5_1 head (no exact grid), an opted-out head and a
    config's head at the dtype."""
    from csd_compile import load_model
    from csd_compile.bench.roofline import Precision, nested_format, step_bytes
    from tests.gguf_files import T, write_tiny_llama

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, {"token_embd": T.Q8_0})
    model, _ = load_model(path, dtype="bf16", cache_dir=tmp_path / "cache")
    q8 = nested_format(8, 32, scale_bytes=2)
    assert step_bytes(model, bits=4, group_size=32)["lm_head"] == q8.nbytes(258, 64)
    assert step_bytes(model, bits=4, group_size=32, quantize_lm_head=False)["lm_head"] == 258 * 64 * 2
    assert step_bytes(model.config, bits=4, group_size=32)["lm_head"] == 258 * 64 * 2
    assert step_bytes(model, bits=None)["lm_head"] == 258 * 64 * 2
    assert Precision(bits=4, group_size=32).label(model) == "nested-int4-g32 (head nested-int8-g32-sym-fp16)"
    assert Precision(bits=4, group_size=32, quantize_lm_head=False).label(model) == "nested-int4-g32 (head bf16)"
    # a Q4_1 linear at static bits: fp16 scales at group 32 (the file's grid), fp32 at group 64
    path = tmp_path / "q41.gguf"
    write_tiny_llama(path, {"attn_k": T.Q4_1})
    model, _ = load_model(path, dtype="bf16", cache_dir=tmp_path / "cache_q41")
    g32, g64 = step_bytes(model, bits=8, group_size=32), step_bytes(model, bits=8, group_size=64)
    plain = step_bytes(model.config, bits=8, group_size=32)  # shapes only: no file, fp32 scales everywhere
    assert plain["linears"] - g32["linears"] == 2 * 32 * (64 // 32) * 4.0  # 2 layers' k: [32, 64]
    assert g64["linears"] == step_bytes(model.config, bits=8, group_size=64)["linears"]
    assert Precision(bits=8, group_size=32).label(model).startswith("nested-int8-g32 x12, nested-int8-g32-fp16 x2 ")
    path = tmp_path / "q51.gguf"
    write_tiny_llama(path, {"output": T.Q5_1}, tied=False)
    model, _ = load_model(path, dtype="fp32", cache_dir=tmp_path / "cache2")
    assert step_bytes(model, bits=4, group_size=32, dtype="fp32")["lm_head"] == 258 * 64 * 4
    assert Precision(bits=4, dtype="fp32").label(model) == "nested-int4-g64 (head fp32)"
