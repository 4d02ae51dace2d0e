"""The ``group_qlinear`` pass: quantized linears on one input become one ``csd.qlinear_multi`` call,
each weight on its own copy and bit-width, so outputs, ``set_bits`` plans and the option behave as
with one call per linear."""

import random

import pytest
import torch

from csd_compile.config import CSDConfig, OptionError
from csd_compile.passes.group_qlinear import group_qlinear
from csd_compile.passes.quantize_linear import quantize_linear
from csd_compile.quant import quantized_linears, set_bits
from tests.conftest import make_tiny_llama
from tests.passes.test_quantize_linear import _capture, _count

MULTI = torch.ops.csd.qlinear_multi.default
SINGLE = torch.ops.csd.qlinear.default


def _grouped(model, ids, **options):
    gm, ex = _capture(model, ids, use_cache=False)
    cfg = CSDConfig(**{"bits": 4, "group_size": 32, **options})
    return group_qlinear(quantize_linear(gm, ex, cfg), ex, cfg), ex


def test_projections_on_one_input_become_one_call():
    model = make_tiny_llama(seed=2)
    ids = torch.randint(0, 128, (1, 5))
    gm, ex = _grouped(model, ids)
    layers = model.config.num_hidden_layers
    # per layer: q/k/v on the attention norm's output, gate/up on the MLP norm's; o and down alone
    assert _count(gm, MULTI) == 2 * layers
    assert _count(gm, SINGLE) == 2 * layers  # o_proj, down_proj (the head stays dense here)
    sizes = sorted(len(n.args[1]) for n in gm.graph.nodes if n.target is MULTI)
    assert sizes == [2] * layers + [3] * layers
    for node in gm.graph.nodes:
        if node.target is MULTI:
            assert not any(u.target is SINGLE for u in node.args[0].users)  # nothing left out on that input
    again = group_qlinear(gm, ex, CSDConfig(bits=4, group_size=32))  # idempotent: nothing left to group
    assert _count(again, MULTI) == 2 * layers


def test_off_keeps_one_call_per_linear_and_same_values():
    model = make_tiny_llama(seed=3)
    ids = torch.randint(0, 128, (1, 7))
    grouped, ex = _grouped(model, ids)
    torch._dynamo.reset()
    separate, ex2 = _grouped(model, ids, group_linears=False)
    assert _count(separate, MULTI) == 0 and _count(separate, SINGLE) == 14
    with torch.no_grad():
        a, b = grouped(*ex)[0], separate(*ex2)[0]
    assert a.abs().max() > 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_model_follows_per_linear_bit_plans(dtype):
    """A plan with a different width for q, k and v (one multi call) gives what the same plan gives
    one call per linear: every weight still reads its own ``bits``."""
    ids = torch.randint(0, 128, (1, 6))
    outs = {}
    for grouped in (True, False):
        torch._dynamo.reset()
        model = make_tiny_llama(seed=4, dtype=dtype)
        compiled = torch.compile(model, backend="csd",
                                 options={"bits": 8, "group_size": 32, "group_linears": grouped})
        with torch.no_grad():
            compiled(ids)
            n = len(quantized_linears(model))
            rng = random.Random(0)
            plan = [rng.choice([2, 3, 4, 8]) for _ in range(n)]
            set_bits(model, plan)
            outs[grouped] = compiled(ids).logits.float()
            set_bits(model, 8)
            eight = compiled(ids).logits.float()
        assert not torch.allclose(outs[grouped], eight)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outs[True], outs[False], rtol=tol, atol=tol)


def test_option_is_checked():
    assert CSDConfig().group_linears is True
    with pytest.raises(OptionError, match="option 'group_linears'='yes' has type str; expected bool"):
        CSDConfig.from_options({"group_linears": "yes"})


def test_a_model_quantized_before_compiling_is_grouped_too():
    """``quantize_`` swaps in ``QLinear`` modules, which call the C++ op themselves; the backend
    (no ``bits`` option) groups those calls as well, with the same logits as the eager model."""
    from csd_compile.kernels import native
    from csd_compile.quant import quantize_

    assert native.load()
    model = make_tiny_llama(seed=5)
    quantize_(model, bits=4, group_size=32)
    ids = torch.randint(0, 128, (1, 5))
    gm, ex = _capture(model, ids, use_cache=False)
    out = group_qlinear(gm, ex, CSDConfig())
    assert _count(out, MULTI) == 2 * model.config.num_hidden_layers
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        torch.testing.assert_close(out(*ex)[0], want, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        got = torch.compile(model, backend="csd")(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linears_inside_a_nested_region_are_grouped_in_its_subgraph():
    """Regional compilation (each decoder layer one ``nested_compile_region``): the region's one
    subgraph gets the multi calls, every call of the region uses them, same logits as ungrouped."""
    from csd_compile.models.regions import mark_decoder_regions

    ids = torch.randint(0, 128, (1, 6))
    logits = {}
    for grouped in (True, False):
        torch._dynamo.reset()
        model = mark_decoder_regions(make_tiny_llama(seed=6))
        gm, ex = _grouped(model, ids, group_linears=grouped)
        calls = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
        subs = {str(n.args[0].target) for n in calls}
        assert len(calls) == model.config.num_hidden_layers and len(subs) == 1
        sub = getattr(gm, subs.pop())
        assert _count(sub, MULTI) == (2 if grouped else 0)
        assert _count(sub, SINGLE) == (2 if grouped else 7)
        with torch.no_grad():
            logits[grouped] = gm(*ex)[0]
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
