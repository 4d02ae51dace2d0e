"""On a CUDA device, not interpreted: the Triton qlinear, gate and attention kernels against their references on
many shapes, and the backend end to end on the embedded model. Run by ``make gpu-check``."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csd_compile.kernels.attention import attention_ref
from csd_compile.kernels.gate import gate_ref, gate_triton
from csd_compile.kernels.qlinear import qlinear_multi, qlinear_ref, qlinear_triton
from csd_compile.quant.nested import quantize

DEV = "cuda"


@settings(max_examples=60, deadline=None)
@given(n=st.sampled_from([16, 34, 64, 130, 576, 1536]), group=st.sampled_from([32, 64, 128]),
       groups=st.integers(1, 12), m=st.sampled_from([1, 2, 5, 16, 17, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_qlinear_triton_on_cuda_matches_reference(n, group, groups, m, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    nw = quantize(torch.randn(n, group * groups, generator=g) * 0.1, group)
    x = torch.randn(m, group * groups, generator=g).to(dtype)
    q = [t.to(DEV) for t in nw]
    for bits in (2, 3, 4, 8):
        b = torch.tensor(bits, dtype=torch.int32)
        r = qlinear_ref(x, *nw, b).float()
        y = qlinear_triton(x.to(DEV), *q, b.to(DEV)).float().cpu()
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        assert ((y - r).norm() / r.norm()).item() < tol


@settings(max_examples=20, deadline=None)
@given(ns=st.lists(st.sampled_from([16, 64, 130, 576]), min_size=1, max_size=3), m=st.sampled_from([1, 5, 17]),
       bits=st.lists(st.sampled_from([2, 3, 4, 8]), min_size=3, max_size=3), seed=st.integers(0, 2**16))
def test_qlinear_multi_on_cuda_is_each_weights_product(ns, m, bits, seed):
    g = torch.Generator().manual_seed(seed)
    weights = [quantize(torch.randn(n, 192, generator=g) * 0.1, 32) for n in ns]
    x = torch.randn(m, 192, generator=g).to(torch.bfloat16)
    bs = [torch.tensor(b, dtype=torch.int32) for b in bits[: len(ns)]]
    ys = qlinear_multi(x.to(DEV), *[[t.to(DEV) for t in part] for part in zip(*weights)], [b.to(DEV) for b in bs])
    for y, nw, b in zip(ys, weights, bs):
        r = qlinear_ref(x, *nw, b).float()
        assert ((y.float().cpu() - r).norm() / r.norm()).item() < 1e-2


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), hkv=st.sampled_from([1, 3, 8]), group=st.sampled_from([1, 3, 4]), t=st.integers(1, 16),
       s=st.sampled_from([1, 37, 256, 2048]), d=st.sampled_from([64, 80, 128]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_attention_op_on_cuda_matches_reference(b, hkv, group, t, s, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * group, t, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, s, d, generator=g).to(dtype) for _ in range(2))
    mask = torch.arange(s).view(1, 1, 1, s) < torch.randint(1, s + 1, (b, 1, t, 1), generator=g)
    ref = attention_ref(q.float(), k.float(), v.float(), mask, 0.1)
    out = torch.ops.csd.decode_attention(q.to(DEV), k.to(DEV), v.to(DEV), mask.to(DEV), 0.1).float().cpu()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 4), k=st.integers(1, 8), v=st.sampled_from([50, 1000, 49152]),
       lam=st.sampled_from([0.0, 1.0, 6.0]), seed=st.integers(0, 2**16))
def test_gate_triton_on_cuda_matches_reference(b, k, v, lam, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k + 1, v, generator=g)
    drafts = torch.where(torch.rand(b, k, generator=g) < 0.5, logits[:, :k].argmax(-1),
                         torch.randint(0, v, (b, k), generator=g))
    keys, counts = torch.full((64, 8), -1, dtype=torch.int64), torch.zeros((64, 8), dtype=torch.int32)
    rk, rc = keys.clone(), counts.clone()
    ref = gate_ref(drafts, logits, rk, rc, lam, -2.0)
    ck, cc = keys.to(DEV), counts.to(DEV)
    got = gate_triton(drafts.to(DEV), logits.to(DEV), ck, cc, lam, -2.0)
    assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])
    assert torch.equal(ck.cpu(), rk) and torch.equal(cc.cpu(), rc)


def test_backend_end_to_end_on_cuda_equals_eager_at_the_same_bits():
    from csd_compile import load_model, quantize_

    model, _ = load_model("smollm2-135m-instruct", dtype="bf16")
    model = model.to(DEV)
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0)).to(DEV)
    with torch.no_grad():
        y = torch.compile(model, backend="csd", options={"bits": 8, "group_size": 32}, fullgraph=True)(ids).logits
        eager = quantize_(load_model("smollm2-135m-instruct", dtype="bf16")[0], bits=8, group_size=32).to(DEV)
        ref = eager(ids).logits
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2


def test_reduce_overhead_decode_is_captured_and_gives_the_same_tokens():
    """``mode="reduce-overhead"``: the quantized decode step is replayed as a CUDA graph (Inductor
    skips none) and greedy decoding gives the tokens of the same step without graphs."""
    from torch._dynamo.utils import counters

    from csd_compile import load_model
    from csd_compile.models.greedy import GreedyDecoder

    model, _ = load_model("smollm2-135m-instruct", dtype="bf16")
    model = model.to(DEV)
    ids = torch.randint(100, 20000, (1, 30), generator=torch.Generator().manual_seed(1)).to(DEV)
    options = {"bits": 4, "group_size": 32}
    plain = GreedyDecoder(model, backend="csd", options=options)(ids, max_new_tokens=48, eos_token_id=[])
    torch._dynamo.reset()
    counters.clear()
    graphs = GreedyDecoder(model, backend="csd", options={**options, "mode": "reduce-overhead"})
    got = [graphs(ids, max_new_tokens=48, eos_token_id=[]) for _ in range(2)]  # replays, cache reused
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    for out in got:
        assert torch.equal(out, plain)
