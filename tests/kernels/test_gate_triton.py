"""The Triton csd::gate kernel against the reference, on CPU through Triton's interpreter.

The comparison runs in a child Python with ``TRITON_INTERPRET=1`` set before anything imports
triton, unless this process already imported the kernel interpreted (``tests/interpreted.py``).
"""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.interpreted import run_interpreted

LOG_TAU = math.log(0.01)


@st.composite
def _cases(draw):
    from csd_compile.speculative.memory import CorrectionMemory

    B, K, V = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 24))
    S, W = draw(st.integers(1, 4)), draw(st.sampled_from([1, 2, 4]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = (torch.randn(B, K + 1, V, generator=g) * 2).to(draw(st.sampled_from([torch.float32, torch.bfloat16])))
    if draw(st.booleans()):  # a non-contiguous [B, K+1, V] view with unit stride along V
        logits = torch.cat([logits, logits], dim=1)[:, ::2]
    alphabet = min(V, 4)
    agree = torch.rand(B, K, generator=g) < 0.6
    draft = torch.where(agree, logits.argmax(-1)[:, :K], torch.randint(0, alphabet, (B, K), generator=g))
    draft = torch.where(torch.rand(B, K, generator=g) < 0.1, -1, draft)  # "no proposal" slots
    mem = CorrectionMemory(num_buckets=S, ways=W)
    n = draw(st.integers(0, 12))
    mem.record(torch.randint(0, alphabet, (n,), generator=g), torch.randint(0, V, (n,), generator=g))
    lam = draw(st.sampled_from([0.0, 1.0, 6.0, float("inf")]))
    log_tau = draw(st.sampled_from([0.0, LOG_TAU, -float("inf")]))
    block_v = draw(st.sampled_from([4, 16, 1024]))
    return draft, logits, mem, lam, log_tau, draw(st.booleans()), block_v


@settings(max_examples=25, deadline=None, derandomize=True)
@given(_cases())
def _check_triton_matches_reference(case):
    from csd_compile.kernels.gate import gate_ref, gate_triton

    draft, logits, mem, lam, log_tau, update, block_v = case
    k1, c1 = mem.keys.clone(), mem.counts.clone()
    k2, c2 = mem.keys.clone(), mem.counts.clone()
    t1, n1 = gate_ref(draft, logits, k1, c1, lam, log_tau, update)
    t2, n2 = gate_triton(draft, logits, k2, c2, lam, log_tau, update, block_v=block_v)
    assert torch.equal(t1, t2), (t1, t2)
    assert torch.equal(n1, n2), (n1, n2)
    assert torch.equal(k1, k2) and torch.equal(c1, c2)


def test_triton_kernel_matches_reference_interpreted():
    run_interpreted(__file__, "csd_compile.kernels.gate", "_gate_kernel", [_check_triton_matches_reference])
