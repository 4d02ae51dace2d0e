"""The LM head under static ``bits`` by default (``quantize_lm_head=None``): a head its GGUF file
stores in a type the nested format holds exactly (Q8_0, Q4_x) runs on that grid, at its own rung,
outside ``set_bits`` and bit plans; any other head stays dense; ``True``/``False`` still choose."""

import pytest
import torch
import torch.nn.functional as F

from csd_compile import load_model
from csd_compile.config import CSDConfig
from csd_compile.passes.quantize_linear import quantize_linear
from csd_compile.quant import quantize_, quantized_linears, set_bits
from csd_compile.quant.linear import QLinear
from tests.conftest import make_tiny_llama
from tests.gguf_files import T, write_tiny_llama
from tests.passes.test_quantize_linear import _capture, _count, _weight_linears

TYPES = {"attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.Q8_0, "attn_output": T.Q4_1, "ffn_gate": T.Q4_0,
         "ffn_up": T.F16, "ffn_down": T.Q4_K, "token_embd": T.Q8_0}
IDS = torch.tensor([[5, 70, 71, 72, 256, 30, 31, 9, 100, 44, 200, 3]])


def _load(tmp_path, types=TYPES, name="tiny", **kw):
    path = tmp_path / f"{name}.gguf"
    write_tiny_llama(path, types, **kw)
    return load_model(path, dtype="fp32", cache_dir=tmp_path / f"cache-{name}")[0]


@pytest.mark.parametrize("head_type, tied, rung", [(T.Q8_0, True, 8), (T.Q8_0, False, 8), (T.Q4_1, False, 4),
                                                   (T.Q4_0, False, 4)])
@pytest.mark.parametrize("group_size", [32, 64])
def test_eager_static_bits_keep_a_stored_head_on_its_file_grid(tmp_path, head_type, tied, rung, group_size):
    model = _load(tmp_path, dict(TYPES, token_embd=head_type if tied else T.Q8_0, output=head_type), tied=tied)
    weight = model.lm_head.weight.detach().clone()
    quantize_(model, bits=4, group_size=group_size)
    head = model.lm_head
    assert isinstance(head, QLinear) and int(head.bits) == rung and head.group_size == 32 and not head.in_plan
    h = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
    ref = F.linear(h, weight)
    torch.testing.assert_close(head(h), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())  # the file's values
    names = [n for n, _ in quantized_linears(model)]
    assert "lm_head" not in names and len(names) == 14
    set_bits(model, 2)  # the plan's linears move, the head keeps the file's rung
    assert int(head.bits) == rung and all(int(b) == 2 for _, b in quantized_linears(model))


def test_the_options_still_choose_and_other_heads_stay_dense(tmp_path):
    model = _load(tmp_path)
    quantize_(model, bits=4, group_size=32, quantize_lm_head=False)
    assert type(model.lm_head) is torch.nn.Linear
    model = _load(tmp_path, name="opt-in")
    quantize_(model, bits=4, group_size=32, quantize_lm_head=True)  # at the linears' rung, in the plan
    assert isinstance(model.lm_head, QLinear) and int(model.lm_head.bits) == 4 and model.lm_head.in_plan
    assert len(quantized_linears(model)) == 15
    for name, out in (("q5_1", T.Q5_1), ("f16", T.F16), ("q5_0", T.Q5_0)):  # no exact grid: dense, not approximated
        model = _load(tmp_path, dict(TYPES, output=out), name=name, tied=False)
        quantize_(model, bits=4, group_size=32)
        assert type(model.lm_head) is torch.nn.Linear
    model = _load(tmp_path, name="changed")
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # no longer the file's tensor
    quantize_(model, bits=8)
    assert type(model.lm_head) is torch.nn.Linear
    model = make_tiny_llama()  # not from a GGUF file
    quantize_(model, bits=4)
    assert type(model.lm_head) is torch.nn.Linear
    with pytest.raises(TypeError, match="quantize_lm_head must be a bool or None, got str"):
        quantize_(make_tiny_llama(), bits=4, quantize_lm_head="file")


def test_pass_runs_a_stored_head_quantized_and_an_opted_out_one_dense(tmp_path):
    model = _load(tmp_path)
    gm, ex = _capture(model, IDS, use_cache=False)
    out = quantize_linear(gm, ex, CSDConfig(bits=4, group_size=32))
    assert _count(out, torch.ops.csd.qlinear.default) == 15 and _weight_linears(out) == 0
    gm, ex = _capture(model, IDS, use_cache=False)
    out = quantize_linear(gm, ex, CSDConfig(bits=4, group_size=32, quantize_lm_head=False))
    assert _count(out, torch.ops.csd.qlinear.default) == 14 and _weight_linears(out) == 1
    table = tmp_path / "table.json"  # the dynamic policy drives only its table's layers: a dense head
    table.write_text("{}")  # the option checks that the file exists; the pass does not read it
    assert CSDConfig(bits="dynamic", calibration=str(table)).quantize_lm_head is False


@pytest.mark.parametrize("bits", [4, 8])
def test_compiled_static_bits_match_eager_and_set_bits_leaves_the_head(tmp_path, bits):
    compiled_model, eager = _load(tmp_path, name="a"), _load(tmp_path, name="b")  # same file, two loads
    quantize_(eager, bits=bits, group_size=32)
    compiled = torch.compile(compiled_model, backend="csd", options={"bits": bits, "group_size": 32})
    with torch.inference_mode():
        out, ref = compiled(IDS).logits, eager(IDS).logits
        assert ref.abs().max() > 0.1
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        assert len(quantized_linears(compiled_model)) == len(quantized_linears(eager)) == 14
        set_bits(compiled_model, 2)
        set_bits(eager, 2)
        out2, ref2 = compiled(IDS).logits, eager(IDS).logits
    assert not torch.allclose(out2, out)  # the linears did move to 2 bits
    torch.testing.assert_close(out2, ref2, rtol=1e-4, atol=1e-4 * ref2.abs().max().item())


def test_self_draft_keeps_the_targets_stored_head(tmp_path):
    from csd_compile.speculative.drafts import make_self_draft

    target = quantize_(_load(tmp_path), bits=8, group_size=32)
    draft = make_self_draft(target, bits=4, group_size=32)
    assert draft.lm_head is target.lm_head and int(draft.lm_head.bits) == 8
    assert int(draft.model.layers[0].self_attn.q_proj.bits) == 4
    opted = make_self_draft(target, bits=4, group_size=32, quantize_lm_head=True)
    assert int(opted.lm_head.bits) == 4 and opted.lm_head.qdata is target.lm_head.qdata
