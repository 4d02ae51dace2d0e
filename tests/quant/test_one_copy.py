"""One quantized copy per weight: the compile pass, the self draft and set_bits share it."""

import torch

from csd_compile.kernels.qlinear import qlinear_ref
from csd_compile.quant import QLinear, quantize_, quantized_linears, set_bits
from csd_compile.quant.registry import lookup_quantized
from csd_compile.speculative.drafts import make_self_draft
from tests.conftest import make_tiny_llama


def _qlinears(model):
    return [m for m in model.modules() if isinstance(m, QLinear)]


def test_self_draft_views_the_compiled_targets_copy():
    model = make_tiny_llama(seed=5)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.compile(model, backend="csd", options={"bits": 8, "group_size": 32}, fullgraph=True)(ids)
    base = [q for lin in model.modules() if isinstance(lin, torch.nn.Linear) for q in lookup_quantized(lin.weight)]
    assert len(base) == 14  # 2 layers x 7 linears; the LM head stays unquantized
    draft = make_self_draft(model, bits=4, group_size=32)
    views = _qlinears(draft)
    assert len(views) == 14
    for b, v in zip(base, views):
        for name in ("qdata", "scale", "zero"):  # the same storage: nothing was copied
            assert getattr(v, name).data_ptr() == getattr(b, name).data_ptr()
        assert int(v.bits) == 4 and int(b.bits) == 8
    set_bits(model, 2)  # the target's width; the draft keeps its own
    assert all(int(b.bits) == 2 for b in base) and all(int(v.bits) == 4 for v in views)
    assert [int(t) for _, t in quantized_linears(model)] == [2] * 14
    assert quantized_linears(draft) and all(int(t) == 4 for _, t in quantized_linears(draft))


def test_a_drafts_copy_is_not_the_targets_quantized_linear():
    model = make_tiny_llama(seed=6)
    make_self_draft(model, bits=4, group_size=32)
    assert quantized_linears(model) == []  # the unquantized target has no quantized linears


def test_self_draft_of_a_quantize_d_target_runs_at_the_draft_bits():
    model = quantize_(make_tiny_llama(seed=7), bits=8, group_size=32)
    draft = make_self_draft(model, bits=3, group_size=32)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    for t, d in zip(_qlinears(model), _qlinears(draft)):
        assert d.qdata.data_ptr() == t.qdata.data_ptr() and d.bias is t.bias
        assert int(t.bits) == 8 and int(d.bits) == 3
        if d.in_features == 64:
            torch.testing.assert_close(d(x), qlinear_ref(x, d.qdata, d.scale, d.zero, torch.tensor(3))
                                       + (0 if d.bias is None else d.bias), rtol=1e-5, atol=1e-5)


def test_a_copy_made_under_inference_mode_serves_a_later_compile():
    """The bench and users decode under ``torch.inference_mode``. A self draft built there over a
    target compiled at 8 bits must not leave inference tensors in the shared copy that the compile
    (which traces outside inference mode) writes to: before, the quantize pass failed, the step fell
    back to plain Inductor and the "8-bit" target ran unquantized. Now the speculative output is the
    8-bit model's own greedy decoding."""
    import warnings

    import csd_compile

    model = make_tiny_llama(seed=8)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    options = {"bits": 8, "group_size": 32, "quantize_lm_head": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error", csd_compile.CSDFallbackWarning)
        with torch.inference_mode():
            out = csd_compile.generate(model, ids, draft="self", draft_bits=4, max_new_tokens=8, compile_options=options)
    base = [q for lin in model.modules() if isinstance(lin, torch.nn.Linear) for q in lookup_quantized(lin.weight)]
    assert len(base) == 15 and all(int(q.bits) == 8 for q in base)  # 14 linears and the LM head
    reference = quantize_(make_tiny_llama(seed=8), bits=8, group_size=32, quantize_lm_head=True)
    with torch.no_grad():
        greedy = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                    pad_token_id=0)
    assert out.tolist() == greedy.tolist()
