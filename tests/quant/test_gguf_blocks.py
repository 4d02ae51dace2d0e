"""``bits="auto"`` at the format level: a GGUF block type's own grid, read from its raw blocks,
decodes (and multiplies, in every CPU kernel) to what the gguf package's dequantization gives."""

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.kernels.qlinear import qlinear_ref
from csd_compile.models.gguf_file import read_header
from csd_compile.quant.gguf import EXACT_BITS, GGUFSource, grid_from_blocks
from csd_compile.quant.nested import dequantize, pack_codes
from tests.gguf_files import T, add_tensor, random_blocks

EPS = torch.finfo(torch.float32).eps


def _group_max(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    return w.reshape(n, k // 32, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(n, k)


def _nested(raw, name, k):
    q8, s, z, bits = grid_from_blocks(raw, name, k)
    return pack_codes(torch.from_numpy(q8), torch.from_numpy(s), torch.from_numpy(z)), bits


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(EXACT_BITS)), n_half=st.integers(1, 40), blocks=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_the_rung_decodes_to_the_gguf_dequantization(name, n_half, blocks, seed):
    qtype = T[name]
    per = gguf.GGML_QUANT_SIZES[qtype][0]
    n, k = 2 * n_half, per * blocks * (1 if per == 256 else 2)
    raw = random_blocks(np.random.default_rng(seed), qtype, n, k)
    ref = torch.from_numpy(gguf.dequantize(raw, qtype).reshape(n, k).copy())
    nw, bits = _nested(raw, name, k)
    assert bits == EXACT_BITS[name]
    got = dequantize(*nw, bits)
    if name in ("Q8_0", "Q4_0", "Q4_1"):
        assert torch.equal(got, ref)  # d * q (+ m) exactly, as gguf computes it in fp32
    else:  # Q4_K: z + 7.5 s rounds once in fp32
        assert ((got - ref).abs() <= 4 * EPS * _group_max(ref)).all()
    assert got.abs().max() > 0


@pytest.mark.parametrize("name", sorted(EXACT_BITS))
@pytest.mark.parametrize("m", [1, 3, 16, 24])  # decode, verify and prefill paths of the kernels
def test_every_cpu_kernel_multiplies_by_the_file_weights(name, m):
    from csd_compile.kernels import native

    qtype = T[name]
    n, k = 96, 256
    rng = np.random.default_rng(m)
    raw = random_blocks(rng, qtype, n, k)
    w = torch.from_numpy(gguf.dequantize(raw, qtype).reshape(n, k).copy())
    nw, bits = _nested(raw, name, k)
    x = torch.randn(m, k)
    want = F.linear(x.double(), w.double()).float()
    scale = (x.abs() @ w.abs().T).clamp_min(1e-3)  # fp32 rounding of the factored group sums
    b = torch.tensor(bits, dtype=torch.int32)
    outs = {"ref": qlinear_ref(x, *nw, b), "cpu": torch.ops.csd.qlinear_cpu(x, *nw, b)}
    if native.load():
        outs["native"] = torch.ops.csd.qlinear_cpu_native(x, *nw, b)
    for path, y in outs.items():
        assert ((y - want).abs() <= 256 * EPS * scale).all(), (path, float(((y - want).abs() / scale).max()))


def test_a_gguf_file_reads_back_through_its_header(tmp_path):
    """Every type the format holds, written by GGUFWriter: the header's offsets find each tensor's
    blocks, and their grid decodes to what gguf's own reader and dequantization give."""
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    shapes = {}
    for i, name in enumerate(["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q6_K", "F16", "F32"]):
        shapes[f"t{i}.{name}"] = (2 * (i + 3), 256)
        add_tensor(w, rng, f"t{i}.{name}", *shapes[f"t{i}.{name}"], T[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = read_header(path)
    assert header.architecture == "llama" and header.version == 3
    assert header.type_counts() == {name: 1 for name in ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q6_K", "F16", "F32"]}
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for info in header.tensors:
        assert info.dims == shapes[info.name][::-1]
        if info.type not in EXACT_BITS:
            continue
        n, k = shapes[info.name]
        src = GGUFSource(str(path), info.name, info.type, (n, k), info.offset)
        assert np.array_equal(src.raw_blocks(), reader[info.name].data)
        ref = torch.from_numpy(gguf.dequantize(reader[info.name].data, T[info.type]).reshape(n, k).copy())
        nw, bits = _nested(src.raw_blocks(), info.type, k)
        assert ((dequantize(*nw, bits) - ref).abs() <= 4 * EPS * _group_max(ref)).all(), info.name


def test_grid_from_blocks_rejects_what_it_cannot_hold():
    with pytest.raises(ValueError, match=r"'Q6_K' has no exact grid; exact types are \['Q4_0', 'Q4_1', 'Q4_K', 'Q8_0'\]"):
        grid_from_blocks(np.zeros((2, 210), np.uint8), "Q6_K", 256)
    with pytest.raises(ValueError, match=r"Q8_0 blocks of shape \(2, 34\) do not hold rows of 64 weights"):
        grid_from_blocks(np.zeros((2, 34), np.uint8), "Q8_0", 64)
