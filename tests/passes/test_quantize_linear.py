import copy
import warnings

import pytest
import torch
from torch import fx
from torch._dynamo.utils import counters

from csd_compile.backend import CSDFallbackWarning
from csd_compile.config import CSDConfig
from csd_compile.passes.quantize_linear import quantize_linear
from csd_compile.quant import fake_quantize, quantized_linears, set_bits
from tests.conftest import make_tiny_llama


def _capture(model, *args, **kwargs):
    """Dynamo's torch-level graph and example inputs, as the csd backend receives them."""
    got = {}

    def backend(gm, example_inputs):
        got["gm"], got["ex"] = gm, list(example_inputs)
        return gm

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    return got["gm"], got["ex"]


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _weight_linears(gm):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear
               and n.args[1].op == "placeholder")


def _fake_quantized_copy(model, bits, skip=("lm_head",)):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and name not in skip:
                mod.weight.copy_(fake_quantize(mod.weight.float(), bits, 64).to(mod.weight.dtype))
    return ref


@pytest.mark.parametrize("quantize_lm_head", [False, True])
def test_pass_replaces_weight_linears_and_keeps_lm_head(quantize_lm_head):
    # intermediate == vocab: the head rule must not mistake the MLP for the LM head
    model = make_tiny_llama(seed=1)
    ids = torch.randint(0, 128, (1, 6))
    gm, ex = _capture(model, ids, use_cache=False)
    assert _weight_linears(gm) == 15
    cfg = CSDConfig(bits=4, quantize_lm_head=quantize_lm_head)
    out = quantize_linear(gm, ex, cfg)
    assert _count(out, torch.ops.csd.qlinear.default) == (15 if quantize_lm_head else 14)
    assert _weight_linears(out) == (0 if quantize_lm_head else 1)
    key = "val" if any("val" in n.meta for n in out.graph.nodes) else "example_value"  # Dynamo's name
    for n in out.graph.nodes:
        if n.target is torch.ops.csd.qlinear.default:
            assert n.meta[key].shape[-1] == n.args[1].meta[key].shape[1]  # [.., N] from qdata [2, N, K/2]
            assert n.args[4].meta[key].dim() == 0
    graph_before = str(out.graph)
    again = quantize_linear(out, ex, cfg)  # idempotent
    assert str(again.graph) == graph_before
    with torch.no_grad():
        y = out(*ex)[0]
        r = _fake_quantized_copy(model, 4, skip=() if quantize_lm_head else ("lm_head",))(ids, use_cache=False).logits
    torch.testing.assert_close(y, r, rtol=1e-4, atol=1e-4)


def test_pass_without_bits_is_identity_and_keeps_bias():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(96, 64)
            self.fc = torch.nn.Linear(64, 64)
            self.odd = torch.nn.Linear(64, 33)  # odd out_features: left alone
            self.head = torch.nn.Linear(33, 96, bias=False)

        def forward(self, ids):
            return self.head(self.odd(torch.relu(self.fc(self.emb(ids)))))

    net = Net().eval()
    ids = torch.randint(0, 96, (2, 3))
    gm, ex = _capture(net, ids)
    assert quantize_linear(gm, ex, CSDConfig()) is gm and _weight_linears(gm) == 3
    out = quantize_linear(gm, ex, CSDConfig(bits=8, group_size=32))
    assert _count(out, torch.ops.csd.qlinear.default) == 1 and _weight_linears(out) == 2
    with torch.no_grad():
        torch.testing.assert_close(out(*ex)[0], net(ids), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_csd_backend_matches_reference_and_set_bits_never_recompiles(dtype):
    model = make_tiny_llama(seed=2, dtype=dtype)
    ids = torch.randint(0, 128, (1, 7))
    ref4 = _fake_quantized_copy(model, 4)
    ref2 = _fake_quantized_copy(model, 2)
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CSDFallbackWarning)
        step = torch.compile(model, backend="csd", options={"bits": 4, "group_size": 64}, fullgraph=True)
        with torch.no_grad():
            y = step(ids).logits
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(y, ref4(ids).logits, rtol=tol, atol=tol)
            assert len(quantized_linears(model)) == 14
            set_bits(model, 2)
            torch.testing.assert_close(step(ids).logits, ref2(ids).logits, rtol=tol, atol=tol)
            for i in range(20):
                plan = torch.tensor([(2, 3, 4, 8)[(i + j) % 4] for j in range(14)])
                set_bits(model, plan)
                step(ids)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0


def test_set_bits_errors():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="no quantized linears"):
        set_bits(model, 4)
    from csd_compile.quant import quantize_

    quantize_(model, bits=4)
    with pytest.raises(ValueError, match="bits"):
        set_bits(model, 5)
    with pytest.raises(ValueError, match=r"must be \[14\]"):
        set_bits(model, [4] * 13)
    with pytest.raises(TypeError, match="integer"):
        set_bits(model, torch.full((14,), 4.0))
    set_bits(model, torch.tensor([8, 2] * 7))
    assert [int(b) for _, b in quantized_linears(model)] == [8, 2] * 7


def test_recompiling_with_other_bits_runs_at_those_bits():
    """The same model compiled at bits=4, then (after a Dynamo reset) at bits=8, runs at 8 bits:
    its logits equal those of a fresh copy compiled at 8 bits, not the 4-bit ones; one warning
    says the width is shared with the graphs compiled before."""
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    model = make_tiny_llama(seed=4)
    with torch.no_grad():
        full = model(ids).logits

        def run(m, bits):
            return torch.compile(m, backend="csd", options={"bits": bits, "group_size": 32}, fullgraph=True)(ids).logits

        y4 = run(model, 4)
        torch._dynamo.reset()
        with pytest.warns(UserWarning, match="bits=8 now also applies to the graphs compiled earlier"):
            y8 = run(model, 8)
        torch._dynamo.reset()
        fresh8 = run(make_tiny_llama(seed=4), 8)
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same options again: nothing changes, nothing to say
            again8 = run(model, 8)

    def rel(y):
        return ((y - full).norm() / full.norm()).item()

    assert torch.equal(y8, fresh8) and torch.equal(again8, fresh8)
    assert rel(y8) < rel(y4) / 4, (rel(y8), rel(y4))
