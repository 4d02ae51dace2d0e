"""Tensor parallel over 2 gloo ranks on CPU: greedy tokens identical to one process (fp32), for plain
decoding, bits 4 and 8, and the speculative engine (n-gram, self and CSD); one graph per phase per
rank, 0 recompiles; CSD's correction memory the same on every rank and in one process. The uneven
split runs everything compiled; the even one checks plain decoding and the self draft eagerly."""

import pytest

from tests.parallel._spawn import run_ranks
from tests.parallel._workers import decode_matrix, embedded_drafts


def _check_rank(res: dict, phases: list[str]) -> None:
    for name in phases:
        assert res[name] == res[f"{name}_ref"], name
    if "ngram" not in phases:
        return
    assert res["graphs"]["plain"] == 1  # HF's decode step
    assert res["graphs"]["plain_again"] == 0  # a second generation: no recompile
    assert res["plain_again"] == res["plain"]
    assert res["graphs"]["self"] == 1  # the draft-verify step
    assert res["graphs"]["ngram"] == 2  # the verify step and the no-proposal decode step
    assert res["graphs"]["bits4"] == 1
    assert res["graphs"]["bits8"] == 0  # bits switched on every rank at run time
    assert res["graphs"]["csd"] == 1


@pytest.mark.parametrize(
    "overrides, kv_heads, full",
    [
        # uneven: 3 KV heads over 2 ranks -> 2 + 1 (4 + 2 query heads of 32 dims)
        (dict(hidden_size=192, num_attention_heads=6, num_key_value_heads=3, head_dim=32), [2, 1], True),
        (dict(num_attention_heads=4, num_key_value_heads=2), [1, 1], False),  # even, eager
    ],
    ids=["uneven-6q-3kv", "even-4q-2kv"],
)
def test_tp2_tokens_match_one_process(overrides, kv_heads, full):
    results = run_ranks(decode_matrix, overrides, full)
    assert [r["kv_heads"] for r in results] == kv_heads
    phases = ["plain", "self"] + (["ngram", "bits4", "bits8", "csd"] if full else [])
    for res in results:
        _check_rank(res, phases)
    if full:
        assert results[0]["bits4"] != results[0]["bits8"] or results[0]["bits4"] != results[0]["plain"]
        assert results[0]["memory"] == results[1]["memory"] == results[0]["memory_ref"]
        assert results[0]["memory"][1] > 0  # the memory counted something


def test_embedded_model_tp2_plain_speculative_and_bits_match_one_process():
    results = run_ranks(embedded_drafts)
    assert [r["heads"] for r in results] == [[6, 2], [3, 1]]  # uneven: whole KV groups per rank
    for res in results:
        assert res["plain"] == res["ngram"] == res["self"] == res["ref"]
        assert res["ngram_accepted"] > 0 and res["self_accepted"] > 0
        assert res["bits8"] == res["bits8_ref"] and res["bits4"] == res["bits4_ref"]
        assert res["bits4"] != res["ref"]  # 4 bits changed the output: the quantized path ran
        # every rank's 30 x 7 sliced linears still name their Q4_1 tensor (so group 32 takes its
        # grid), and the replicated head its Q8_0 one
        assert res["g32_sources"] == ["Q4_1"] * 210 + ["Q8_0"]
        assert res["g32"] == res["g32_ref"]
    assert results[0]["self_accepted"] == results[1]["self_accepted"]  # the same acceptance on every rank
