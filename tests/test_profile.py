import json

from csd_compile.bench.profile import BUCKETS, bucket_of
from csd_compile.cli import main

VOCAB = 49152


def test_events_go_to_their_buckets():
    assert bucket_of("csd::qlinear_cpu_native", [[1, 1, 576], [2, 576, 288]], VOCAB) == "quantized matmuls"
    assert bucket_of("aten::mm", [[1, 576], [576, VOCAB]], VOCAB) == "LM head"
    assert bucket_of("csd::qlinear", [[1, 576], [2, VOCAB, 288]], VOCAB) == "LM head"
    assert bucket_of("aten::mm", [[1, 576], [576, 1536]], VOCAB) == "dense matmuls"
    assert bucket_of("aten::_scaled_dot_product_flash_attention_for_cpu", [], VOCAB) == "attention"
    assert bucket_of("graph_0_cpp_fused__softmax__to_copy_bmm_3", [], VOCAB) == "attention"
    assert bucket_of("graph_0_cpp_fused_mul_silu_5", [], VOCAB) == "norms/rotary/elementwise"
    assert bucket_of("aten::argmax", [[1, VOCAB]], VOCAB) == "norms/rotary/elementwise"
    assert bucket_of("## Call CompiledFxGraph abc", [], VOCAB) == "other"


def test_profile_writes_its_table_json_and_stacked_bars(tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", "--systems", "hf-bf16", "--steps", "2", "--out", str(out)]) == 0
    result = json.loads((out / "profile.json").read_text())
    row = result["systems"]["hf-bf16"]
    assert row["forwards"] == 2 and row["new_tokens"] == 3
    ms = row["buckets_ms"]
    assert list(ms) == list(BUCKETS) and all(v >= 0 for v in ms.values())
    assert ms["dense matmuls"] > 0 and ms["LM head"] > 0 and ms["attention"] > 0 and ms["quantized matmuls"] == 0
    assert sum(ms.values()) >= row["ms_per_forward_profiled"] * 0.999  # "other" closes the sum to the wall time
    assert row["ms_per_token"] > 0
    table = (out / "profile.md").read_text()
    assert "| hf-bf16 |" in table and "| quantized matmuls | dense matmuls | LM head |" in table
    assert (out / "profile.png").stat().st_size > 1000
    assert "| hf-bf16 |" in capsys.readouterr().out
