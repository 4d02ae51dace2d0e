"""``bits="auto"`` end to end on tiny GGUF models written with GGUFWriter: the loader ties each
weight to its tensor and type, eager ``quantize_`` and ``backend="csd"`` run each at its own
rung (the LM head included), and bad files and unsuitable models fail clearly."""

import warnings

import numpy as np
import pytest
import torch

from csd_compile import CSDFallbackWarning, load_model
from csd_compile.config import OptionError
from csd_compile.quant import quantize_
from csd_compile.quant.gguf import AutoBitsWarning, choose, file_grid
from csd_compile.quant.linear import QLinear
from tests.conftest import make_tiny_llama
from tests.gguf_files import T, write_tiny_llama

EXACT = {"attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.Q8_0, "attn_output": T.Q4_1, "ffn_gate": T.Q4_0,
         "ffn_up": T.F16, "ffn_down": T.Q4_K, "token_embd": T.Q8_0}
MIXED = {"attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.Q8_0, "attn_output": T.Q5_0, "ffn_gate": T.F16,
         "ffn_up": T.F32, "ffn_down.0": T.Q4_K, "ffn_down.1": T.Q6_K, "token_embd": T.Q8_0}
IDS = torch.tensor([[5, 70, 71, 72, 256, 30, 31, 9, 100, 44, 200, 3]])


def _load(tmp_path, types, dtype="fp32", **kw):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, types, **kw)
    return load_model(path, dtype=dtype, cache_dir=tmp_path / "cache")[0]


def _kinds(model):
    return {n: (c.kind, c.bits, c.why) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            for c in [choose(m.weight)]}


def test_loader_reports_types_and_ties_each_weight(tmp_path, capsys):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, MIXED)
    model, _ = load_model(path, dtype="fp32", cache_dir=tmp_path / "cache", verbose=True)
    assert ("tiny.gguf: read 20 tensors (F32 7, Q8_0 3, Q4_0 2, Q4_1 2, Q5_0 2, F16 2, Q4_K 1, Q6_K 1)"
            in capsys.readouterr().err)
    kinds = _kinds(model)
    assert kinds["model.layers.0.self_attn.q_proj"] == ("exact", 4, "Q4_0")  # rows permuted by transformers
    assert kinds["model.layers.1.self_attn.k_proj"] == ("exact", 4, "Q4_1")
    assert kinds["model.layers.0.self_attn.v_proj"] == ("exact", 8, "Q8_0")
    assert kinds["model.layers.0.mlp.down_proj"] == ("exact", 4, "Q4_K")
    assert kinds["model.layers.1.mlp.down_proj"] == ("approx", 8, "Q6_K")
    assert kinds["model.layers.0.self_attn.o_proj"] == ("approx", 8, "Q5_0")
    assert kinds["model.layers.0.mlp.gate_proj"] == ("dense", None, "F16")
    assert kinds["model.layers.0.mlp.up_proj"] == ("dense", None, "F32")
    assert kinds["lm_head"] == ("exact", 8, "Q8_0")  # tied: the embedding's Q8_0 table
    # a second load (from the cache) ties its new weights just the same
    again, _ = load_model(path, dtype="bf16", cache_dir=tmp_path / "cache")
    assert _kinds(again)["model.layers.0.self_attn.q_proj"] == ("exact", 4, "Q4_0")


def test_eager_quantize_auto_keeps_the_file_weights(tmp_path):
    model = _load(tmp_path, EXACT)
    ref = model(IDS).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutoBitsWarning)  # nothing approximated: silent
        quantize_(model, bits="auto")
    head = model.lm_head
    assert isinstance(head, QLinear) and int(head.bits) == 8 and head.group_size == 32
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # F16 in the file: dense
    assert {int(m.bits) for m in model.modules() if isinstance(m, QLinear)} == {4, 8}
    # the embedding still reads its dense table, the same values as the quantized head
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    out = model(IDS).logits
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_compiled_auto_matches_eager_fp32_with_the_head_quantized(tmp_path):
    model = _load(tmp_path, EXACT)
    with torch.inference_mode():
        ref = model(IDS).logits
        compiled = torch.compile(model, backend="csd", options={"bits": "auto"}, fullgraph=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", AutoBitsWarning)
            warnings.simplefilter("error", CSDFallbackWarning)
            out = compiled(IDS).logits
            step = compiled(IDS[:, :1]).logits  # the decode-sized path (M=1) of the same copies
    from csd_compile.quant.linear import quantized_linears

    plan = quantized_linears(model)
    assert len(plan) == 2 * 6 + 1  # every linear but the F16 up_proj, plus the head
    assert sorted({int(b) for _, b in plan}) == [4, 8]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(step, model(IDS[:, :1]).logits, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_auto_reports_what_it_approximated(tmp_path):
    model = _load(tmp_path, MIXED)
    with pytest.warns(AutoBitsWarning, match=r"the file's own grid: .*Q4_K 1 at 4 bits.*; approximated at 8 bits: "
                                             r"Q5_0 2, Q6_K 1 \(e\.g\. .*o_proj\); left dense: F16 2, F32 2"):
        quantize_(model, bits="auto")
    assert int(model.model.layers[1].mlp.down_proj.bits) == 8


def test_untied_f16_head_stays_dense_and_opting_out_keeps_a_q8_head_dense(tmp_path):
    model = _load(tmp_path, dict(EXACT, output=T.F16), tied=False)
    quantize_(model, bits="auto")
    assert type(model.lm_head) is torch.nn.Linear
    (tmp_path / "b").mkdir()
    model = _load(tmp_path / "b", dict(EXACT, output=T.Q8_0), tied=False)
    quantize_(model, bits="auto", quantize_lm_head=False)
    assert type(model.lm_head) is torch.nn.Linear


def test_a_weight_changed_after_loading_is_not_taken_from_the_file(tmp_path):
    model = _load(tmp_path, EXACT)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    c = choose(model.model.layers[0].self_attn.q_proj.weight)
    assert c.kind == "approx" and "no longer equals the file's tensor blk.0.attn_q.weight" in c.why
    # changed after a first choice too: the choice is made again, not kept
    w = model.model.layers[0].self_attn.k_proj.weight
    first = choose(w)
    assert first.kind == "exact" and choose(w) is first  # kept while unchanged
    with torch.no_grad():
        w[1, 2] += 0.5
    assert choose(w).kind == "approx"
    # new data swapped in (no version bump): made again as well, from the file when it holds the file's values
    v = model.model.layers[0].self_attn.v_proj.weight
    assert choose(v).kind == "exact"
    original = v.data
    v.data = original * 2
    assert choose(v).kind == "approx"
    v.data = original.clone()
    assert choose(v).kind == "exact"


def test_file_grid_checks_again_a_weight_that_counts_no_changes(tmp_path):
    model = _load(tmp_path, EXACT)  # q_proj is Q4_0: file_grid applies at group 32
    with torch.inference_mode():
        w = model.model.layers[0].self_attn.q_proj.weight.clone()  # an inference tensor: no version counter
        assert file_grid(w, 32) is not None
        w[3, 5] += 0.5  # in place, same storage, nothing counted
        assert file_grid(w, 32) is None
    tracked = model.model.layers[1].self_attn.q_proj.weight
    assert file_grid(tracked, 32) is not None
    with torch.no_grad():
        tracked[3, 5] += 0.5  # counted: the choice is made again, and checked then
    assert file_grid(tracked, 32) is None


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_copies_of_a_loaded_model_keep_the_file_grid(tmp_path, dtype):
    """copy.deepcopy and load_state_dict make new Parameters with the same values: bits="auto" on
    the copy takes every weight from the file as on the original, with the same logits."""
    import copy

    model = _load(tmp_path, EXACT, dtype=dtype)
    deep = copy.deepcopy(model)
    loaded = copy.deepcopy(model)  # its own buffers (rotary tables) as the model's; random weights, then the model's
    with torch.no_grad():
        for p in loaded.parameters():
            p.normal_(0, 0.05)
    assert _kinds(loaded) != _kinds(model)
    loaded.load_state_dict(model.state_dict())
    kinds = _kinds(model)
    assert {k for k, _, _ in kinds.values()} == {"exact", "dense"}
    assert _kinds(deep) == kinds and _kinds(loaded) == kinds
    outs = []
    for m in (model, deep, loaded):
        with warnings.catch_warnings():
            warnings.simplefilter("error", AutoBitsWarning)  # nothing approximated or unknown: silent
            quantize_(m, bits="auto")
        with torch.inference_mode():
            outs.append(m(IDS).logits)
    assert outs[0].abs().max() > 0.1
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_a_copy_with_other_values_is_not_taken_from_the_file(tmp_path):
    import copy

    model = _load(tmp_path, EXACT)
    rng = np.random.default_rng(5)
    for how in ("scaled", "one value"):
        deep = copy.deepcopy(model)
        w = deep.model.layers[0].self_attn.q_proj.weight
        with torch.no_grad():
            if how == "scaled":
                w.mul_(1.25)
            else:  # one weight anywhere (sampled by the fingerprint or not): the whole weight is checked
                i, j = int(rng.integers(w.shape[0])), int(rng.integers(w.shape[1]))
                w[i, j] += 0.5
        c = choose(w)
        assert c.kind in ("approx", "unknown"), (how, c)
        assert choose(model.model.layers[0].self_attn.q_proj.weight).kind == "exact"  # the original is untouched
    for i in range(model.model.layers[1].self_attn.k_proj.in_features):  # every column of one row in turn: never exact
        deep = copy.deepcopy(model)
        w = deep.model.layers[1].self_attn.k_proj.weight
        with torch.no_grad():
            w[0, i] += 0.25
        assert choose(w).kind != "exact", i


def test_auto_on_a_model_not_loaded_from_gguf_is_a_clear_error():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=r"none of the 15 weight linears was loaded from one.*bits=4 or 8"):
        quantize_(model, bits="auto")
    compiled = torch.compile(model, backend="csd", options={"bits": "auto"})
    with torch.inference_mode(), pytest.raises(OptionError, match="none of the 15 weight linears was loaded"):
        compiled(IDS % 128)
    assert all(type(m) is not QLinear for m in model.modules())


def test_auto_option_checks():
    from csd_compile.config import CSDConfig

    cfg = CSDConfig.from_options({"bits": "auto"})
    assert (cfg.group_size, cfg.quantize_lm_head) == (32, True)
    assert CSDConfig.from_options({"bits": 4}).quantize_lm_head is None  # the head as its file stores it
    assert CSDConfig.from_options({}).quantize_lm_head is False
    with pytest.raises(OptionError, match=r"'group_size'=64 does not go with bits='auto'.*blocks of 32"):
        CSDConfig.from_options({"bits": "auto", "group_size": 64})
    with pytest.raises(OptionError, match=r"'bits'='autox' is not supported; use None, 'dynamic', 'auto'"):
        CSDConfig.from_options({"bits": "autox"})


def test_gguf_of_an_architecture_transformers_cannot_load(tmp_path):
    path = tmp_path / "odd.gguf"
    write_tiny_llama(path, EXACT, arch="rwkv9")
    with pytest.raises(ValueError, match=r"odd.gguf holds a 'rwkv9' model, an architecture transformers cannot "
                                         r"load from GGUF; it can load \[.*'llama'"):
        load_model(path, cache_dir=tmp_path / "cache")


def test_gguf_with_an_unknown_tensor_type(tmp_path):
    path = tmp_path / "new.gguf"
    write_tiny_llama(path, EXACT)
    data = bytearray(path.read_bytes())
    name = b"blk.1.attn_v.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == T.Q8_0
    data[type_at:type_at + 4] = (77).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"new.gguf: tensor 'blk.1.attn_v.weight' has GGUF tensor type 77, which "
                                         r"is unknown; known types are F32 \(0\)"):
        load_model(path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_bf16_load_still_reads_the_file_grid(tmp_path):
    model = _load(tmp_path, EXACT, dtype="bf16")
    kinds = _kinds(model)
    assert kinds["model.layers.0.mlp.down_proj"] == ("exact", 4, "Q4_K")
    assert kinds["lm_head"] == ("exact", 8, "Q8_0")
    assert np.isfinite(model(IDS).logits.detach().float().numpy()).all()
