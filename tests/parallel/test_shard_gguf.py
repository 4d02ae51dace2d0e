"""A tensor-parallel shard of a model loaded from a GGUF file keeps the file's grid, in one process
(each rank's shard built from a TPInfo): at ``bits=4, group_size=32`` and with ``bits="auto"`` every
rank's quantized slice is the same numbers as the single-process copy's slice of the same weight;
a slice that cuts the file's blocks of 32 is quantized from the weight, and says why."""

import numpy as np
import pytest
import torch

from csd_compile import load_model
from csd_compile.parallel import TPInfo, shard_model
from csd_compile.quant import QLinear, dequantize
from csd_compile.quant.gguf import (auto_bits, choose, exact_bits, register_slice, source_of, stored_exactly,
                                    uses_file_grid)
from tests.gguf_files import T, write_tiny_llama

# one type per projection (Q4_K needs rows of 256: only down_proj has them)
_TYPES = {"attn_q": T.Q4_1, "attn_k": T.Q4_0, "attn_v": T.Q8_0, "attn_output": T.Q4_1, "ffn_gate": T.Q4_0,
          "ffn_up": T.Q4_1, "ffn_down": T.Q4_K}
_ROW = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split by rows; o_proj / down_proj by columns


def _linears(model):
    for layer in model.model.layers:
        for mod in (layer.self_attn, layer.mlp):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                if hasattr(mod, name):
                    yield name, getattr(mod, name).weight


def _decoded(nw, bits):
    return dequantize(nw.qdata, nw.scale, nw.zero, bits)


def _joined(pieces: list, name: str):
    """The ranks' pieces put back together in rank order (rows or columns, as the weight was split)."""
    return torch.cat(pieces, dim=0 if name in _ROW else 1)


@pytest.mark.parametrize("shape", [dict(hidden=64, heads=4, kv_heads=2), dict(hidden=192, heads=6, kv_heads=3)],
                         ids=["even", "uneven-3kv"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_rank_quantizes_its_slice_on_the_files_grid(tmp_path, shape, dtype):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, _TYPES, seed=3, **shape)
    full, _ = load_model(path, dtype=dtype, cache_dir=tmp_path / "cache")
    shards = [shard_model(full, TPInfo(r, 2, None, "gloo")) for r in range(2)]
    with torch.no_grad():
        for (name, w), *parts in zip(_linears(full), *(_linears(s) for s in shards)):
            parts = [p for _, p in parts]
            kind = source_of(w).type
            assert all(source_of(p).type == kind for p in parts)
            # bits="auto": each slice on the file's grid, at the type's rung
            whole = choose(w)
            assert whole.kind == "exact"
            sliced = [choose(p) for p in parts]
            assert [c.kind for c in sliced] == ["exact", "exact"], [c.why for c in sliced]
            assert all(c.bits == whole.bits == auto_bits(p) for c, p in zip(sliced, parts))
            assert torch.equal(_joined([_decoded(c.nested, c.bits) for c in sliced], name),
                               _decoded(whole.nested, whole.bits))
            # static bits 4 at group 32: the file's grid for the Q4 types (fp16 scales where they hold)
            if uses_file_grid(w, 32):
                q_full = QLinear(w, None, bits=4, group_size=32)
                q_parts = [QLinear(p, None, bits=4, group_size=32) for p in parts]
                assert all(uses_file_grid(p, 32) for p in parts)
                assert torch.equal(_joined([dequantize(q.qdata, q.scale, q.zero, 4) for q in q_parts], name),
                                   dequantize(q_full.qdata, q_full.scale, q_full.zero, 4))
                assert [q.scale_zero.dtype for q in q_parts] == [q_full.scale_zero.dtype] * 2


def test_a_shard_that_cuts_the_files_blocks_is_quantized_from_the_weight(tmp_path):
    """ffn 96 over 2 ranks: down_proj's columns 0..48 and 48..96 cut a block of 32 in two."""
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, {"ffn_down": T.Q4_1}, ffn=96, seed=5)
    full, _ = load_model(path, dtype="fp32", cache_dir=tmp_path / "cache")
    for rank in range(2):
        down = shard_model(full, TPInfo(rank, 2, None, "gloo")).model.layers[0].mlp.down_proj.weight
        src = source_of(down)
        assert src.cols == (48 * rank, 48 * rank + 48) and not src.whole_blocks
        assert exact_bits(down) is None and not uses_file_grid(down, 32) and stored_exactly(down) is None
        c = choose(down)
        assert c.kind == "dense" and f"columns {48 * rank}..{48 * rank + 48}" in c.why  # 48 columns: no groups of 32
        assert auto_bits(down) is None  # the byte count's answer is choose()'s
    # the file's blocks still hold where the slice is on them: the gate rows
    gate = shard_model(full, TPInfo(1, 2, None, "gloo")).model.layers[0].mlp.gate_proj.weight
    assert choose(gate).kind == "exact"


def test_slices_of_slices_index_the_files_rows_and_columns(tmp_path):
    """register_slice composes: rows of a permuted weight, then columns of that, pick the file's
    own rows and columns (checked against gguf's own dequantization of the file)."""
    import gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, {"attn_q": T.Q4_0}, hidden=128, heads=4, kv_heads=2, seed=7)
    full, _ = load_model(path, dtype="fp32", cache_dir=tmp_path / "cache")
    w = full.model.layers[1].self_attn.q_proj.weight
    src = source_of(w)
    assert src.rows is not None  # llama's q rows are permuted by transformers
    file_w = gguf.dequantize(src.raw_blocks(), T.Q4_0).reshape(src.shape)
    rows, cols = slice(40, 104), slice(32, 96)
    a = w[rows].clone()
    register_slice(a, w, rows=rows)
    b = a[:, cols].clone()
    register_slice(b, a, cols=cols)
    expect = torch.from_numpy(file_w[np.asarray(src.rows)[rows]][:, cols].copy())
    for t, ref in ((a, torch.from_numpy(file_w[np.asarray(src.rows)[rows]].copy())), (b, expect)):
        c = choose(t)
        assert c.kind == "exact" and torch.equal(_decoded(c.nested, 4), ref)
    # columns 16..48: a width that fits groups of 32 but cuts the file's blocks: approximated at 8 bits
    cut = w[:, 16:48].clone()
    register_slice(cut, w, cols=slice(16, 48))
    c = choose(cut)
    assert c.kind == "approx" and c.bits == auto_bits(cut) == 8 and "cut its blocks" in c.why
    with torch.no_grad():
        b.mul_(1.25)  # changed since: no longer the file's slice
    fresh = b.clone()
    register_slice(fresh, b)
    assert choose(fresh).kind == "approx" and "no longer equals" in choose(fresh).why


def test_register_slice_ignores_weights_without_a_source():
    w = torch.randn(8, 64)
    a = w[2:6].clone()
    register_slice(a, w, rows=slice(2, 6))  # no source: nothing recorded, no error
    assert source_of(a) is None


@pytest.mark.parametrize("bad", [dict(rows=slice(None, None, 2)), dict(cols=slice(0, 32, -1)), dict(rows=[0, 1]),
                                 dict(cols=torch.arange(32)), dict(rows=3)])
def test_register_slice_refuses_what_is_not_a_contiguous_slice(bad):
    w = torch.randn(8, 64)
    (what, value), = bad.items()
    with pytest.raises(ValueError, match=f"(?s){what}=.* must be None or a contiguous slice"):
        register_slice(w.clone(), w, **bad)  # refused before looking for a source
