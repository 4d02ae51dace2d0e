"""The embedded model is a GGUF Q4_1 file (blocks of 32, w = d * q + m): at group_size 32 the
nested format's 4-bit rung is the file's own grid, so ``bits=4, group_size=32`` runs its weights."""

import warnings

import torch

from csd_compile import CSDFallbackWarning, load_model
from csd_compile.models.hf_generate import compile_config, encode_prompt
from csd_compile.quant.nested import dequantize, quantize

PROMPT = "Name three primary colours and say why they are called primary."


def _linears(model):
    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def test_4bit_rung_at_group_32_is_the_embedded_checkpoint():
    model, _ = load_model(dtype="fp32")
    linears = _linears(model)
    assert len(linears) == 7 * model.config.num_hidden_layers
    for name, mod in linears:
        w = mod.weight.detach()
        err = (dequantize(*quantize(w, 32), 4) - w).abs().max()
        assert err <= 1e-6 * w.abs().max(), (name, float(err))
    # a group that straddles two Q4_1 blocks has no such grid: 64 is an ordinary lossy 4-bit format
    w = linears[0][1].weight.detach()
    assert (dequantize(*quantize(w, 64), 4) - w).abs().max() > 1e-2 * w.abs().max()


def test_compiled_4bit_group_32_decodes_what_eager_fp32_decodes():
    model, tok = load_model(dtype="fp32")
    ids = encode_prompt(tok, PROMPT, chat=True)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24, pad_token_id=tok.eos_token_id)
    before = [m.weight.detach().double().sum().item() for _, m in _linears(model)]
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error", CSDFallbackWarning)  # the 4-bit pass must run, not plain Inductor
        eager = model.generate(ids, **kw)
        compiled = model.generate(ids, cache_implementation="static",
                                  compile_config=compile_config({"bits": 4, "group_size": 32}), **kw)
    assert eager.shape[1] > ids.shape[1] + 10
    assert torch.equal(compiled, eager)
    # the user's weights are untouched
    assert [m.weight.detach().double().sum().item() for _, m in _linears(model)] == before


def test_compiled_auto_fp32_logits_are_the_file_weights_lm_head_included():
    """bits="auto": the Q4_1 linears at 4 bits and the Q8_0 head (tied to the embedding) at 8 bits,
    both on the file's own grids: the same logits as the dequantized weights in eager fp32."""
    from csd_compile.quant.gguf import AutoBitsWarning
    from csd_compile.quant.linear import quantized_linears

    model, tok = load_model(dtype="fp32")
    ids = encode_prompt(tok, PROMPT, chat=True)[:, -12:]  # one compile; M <= 16: the decode/verify kernel
    with torch.inference_mode():
        eager = model(ids).logits
        compiled = torch.compile(model, backend="csd", options={"bits": "auto"}, fullgraph=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CSDFallbackWarning)
            warnings.simplefilter("error", AutoBitsWarning)  # every weight on its own grid: nothing to report
            out = compiled(ids).logits
    plan = quantized_linears(model)
    assert len(plan) == 7 * model.config.num_hidden_layers + 1  # the head is quantized too
    assert sorted(int(b) for _, b in plan).count(8) == 1
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied, dense
    tol = 1e-5 * eager.abs().max().item()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=tol)
