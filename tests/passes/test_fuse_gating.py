"""fuse_gating: plain-torch acceptance -> one csd.gate node; ops gone, numerics kept."""

import math

import pytest
import torch
import torch._inductor.config
from torch._dynamo.utils import counters
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

from csd_compile.kernels.gate import csd_accept_torch, exact_accept_torch
from csd_compile.passes.fuse_gating import FuseGatingPass, fuse_gating
from csd_compile.speculative.acceptance import greedy_accept
from csd_compile.speculative.memory import CorrectionMemory

LAMBDA, LOG_TAU = 1.0, math.log(0.05)
PLAIN_OPS = {"aten.argmax.default", "aten.cumprod.default", "aten.gather.default", "aten.where.self"}


def _inputs(dtype=torch.float32, seed=0, B=3, K=5, V=40):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, K + 1, V, generator=g) * 0.5).to(dtype)
    top = logits.argmax(-1)[:, :K]
    draft = torch.where(torch.rand(B, K, generator=g) < 0.5, top, torch.randint(0, 6, (B, K), generator=g))
    mem = CorrectionMemory(num_buckets=64, ways=4)
    # every (small draft, any target) pair seen twice: many rescue candidates
    d = torch.arange(6).repeat_interleave(V).repeat(2)
    t = torch.arange(V).repeat(6).repeat(2)
    mem.record(d, t)
    return draft, logits, mem


def _csd(d, z, k, c):
    return csd_accept_torch(d, z, k, c, LAMBDA, LOG_TAU)


def _aten_graph(fn, *args):
    return make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args)


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["csd", "greedy", "exact"])
def test_pass_replaces_plain_ops_with_one_gate(which, dtype):
    draft, logits, mem = _inputs(dtype)
    fn, args = {
        "csd": (_csd, (draft, logits, mem.keys, mem.counts)),
        "greedy": (greedy_accept, (draft, logits)),
        "exact": (exact_accept_torch, (draft, logits)),
    }[which]
    expected = fn(*args)
    gm = _aten_graph(fn, *args)
    assert PLAIN_OPS & set(_targets(gm))
    assert fuse_gating(gm.graph, cpu_walk=False) == 1
    gm.graph.lint()
    gm.recompile()
    targets = _targets(gm)
    assert targets.count("csd.gate.default") == 1
    assert not PLAIN_OPS & set(targets), targets
    (gate,) = [n for n in gm.graph.nodes if str(n.target) == "csd.gate.default"]
    if which == "csd":
        assert gate.args[4:] == (LAMBDA, LOG_TAU, False)  # the graph's own constants, carried over
    got = gm(*args)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("which", ["csd", "greedy"])
def test_pass_cpu_lowering(which):
    draft, logits, mem = _inputs(torch.bfloat16, seed=2)
    fn = _csd if which == "csd" else (lambda d, z, k, c: greedy_accept(d, z))
    args = (draft, logits, mem.keys, mem.counts)
    gm = _aten_graph(fn, *args)
    assert fuse_gating(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    targets = _targets(gm)
    assert targets.count("csd.gate_walk.default") == 1 and targets.count("aten.argmax.default") == 1
    gone = {"aten.cumprod.default", "aten.where.self", "aten.bitwise_xor.Tensor", "aten.index.Tensor", "aten.cat.default"}
    assert not gone & set(targets), targets
    got, expected = gm(*args), fn(*args)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_rescues_happen_in_the_fused_case():
    draft, logits, mem = _inputs()
    _, n_csd = _csd(draft, logits, mem.keys, mem.counts)
    _, n_exact = greedy_accept(draft, logits)
    assert (n_csd >= n_exact).all() and (n_csd > n_exact).any()


def test_different_graph_is_left_alone():
    def shifted(d, z):  # compares drafts with the *next* position's argmax: not an acceptance rule
        t = z.argmax(-1)
        n = (d == t[:, 1:]).long().cumprod(-1).sum(-1)
        return t, n

    draft, logits, _ = _inputs()
    gm = _aten_graph(shifted, draft, logits)
    assert fuse_gating(gm.graph) == 0
    assert "csd.gate.default" not in _targets(gm)


@pytest.mark.parametrize("which", ["csd", "greedy"])
@torch._inductor.config.patch(fx_graph_cache=False)  # the pass must run, not a cache hit
def test_backend_fuses_when_asked(which):
    draft, logits, mem = _inputs(torch.bfloat16, seed=1)
    fn = _csd if which == "csd" else (lambda d, z, k, c: greedy_accept(d, z))
    expected = fn(draft, logits, mem.keys, mem.counts)
    counters.clear()
    compiled = torch.compile(fn, backend="csd", options={"fuse_gating": True}, fullgraph=True)
    with torch.no_grad():
        got, (code, *_) = run_and_get_code(compiled, draft, logits, mem.keys, mem.counts)
    assert counters["inductor"]["pattern_matcher_count"] >= 1
    # CPU lowering: one opaque walk, the argmax in Inductor's C++ kernel, the plain tail gone
    assert "torch.ops.csd.gate_walk.default(" in code and "cumprod" not in code
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_backend_leaves_acceptance_alone_by_default():
    draft, logits, _ = _inputs()
    compiled = torch.compile(greedy_accept, backend="csd", options={}, fullgraph=True)
    with torch.no_grad():
        got, (code, *_) = run_and_get_code(compiled, draft, logits)
    assert "csd.gate" not in code
    expected = greedy_accept(draft, logits)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_uuid_is_stable_hash():
    a, b = FuseGatingPass().uuid(), FuseGatingPass().uuid()
    assert a == b and isinstance(a, str) and len(a) == 64
