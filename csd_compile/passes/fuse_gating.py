"""Fuse plain-torch speculative acceptance into one ``csd.gate`` node (Inductor post-grad pass).

The verify step's acceptance, written in plain torch, reaches Inductor as a dozen aten ops::

    before:  argmax(logits) -> slice -> eq(draft) -> [gather, gather, sub, ge, memory look-up:
             mul/xor/remainder/index/eq/mul/sum, gt, and, or] -> cumprod -> sum -> arange/cat/
             lt/eq/where/where                                      (tokens [B,K+1], n [B])
    after:   csd.gate(draft, logits, mem_keys, mem_counts, lambda_, log_tau, update=False)
             (CPU: argmax -> slice/gather/sub/ge -> csd.gate_walk, the op's own CPU lowering)

Patterns (traced for fp32, bf16 and fp16 logits):

* ``csd_accept_torch`` (read-only memory; ``lambda_`` and ``log_tau`` are matched as any float
  constants and carried into the op);
* ``exact_accept_torch`` and the engine's ``greedy_accept``: exact greedy acceptance, replaced by
  ``csd.gate`` on a 1-slot empty memory with rescue disabled (identical output, one kernel).

The counting gate (``update=True``) has sequential semantics no vectorised torch expresses, so a
step that wants counting calls ``torch.ops.csd.gate`` itself (``speculative.csd_accept.make_csd_accept``);
this pass only fuses what can be written in plain torch. The pattern matcher re-traces every
match with its real shapes before replacing it, so a graph that differs (other slices, other
dtypes) is left alone.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement

__all__ = ["FuseGatingPass", "fuse_gating"]

# Distinct placeholder values: the matcher turns these constants of the traced pattern into inputs.
_LAMBDA_PH, _LOG_TAU_PH = 6.125, -4.5


def _csd_search(draft_tokens, target_logits, mem_keys, mem_counts, lambda_, log_tau):
    from ..kernels.gate import csd_accept_torch

    return csd_accept_torch(draft_tokens, target_logits, mem_keys, mem_counts, lambda_, log_tau)


def _gate_nodes(cpu_walk, draft_tokens, target_logits, mem_keys, mem_counts, lambda_, log_tau):
    if cpu_walk and target_logits.device.type == "cpu":
        # what csd.gate decomposes into on CPU: argmax/gather stay visible so Inductor fuses them
        from ..kernels.gate import _cpu_gate_inputs

        t_star, gate_ok = _cpu_gate_inputs(draft_tokens, target_logits, log_tau)
        return torch.ops.csd.gate_walk(draft_tokens, t_star, gate_ok, mem_keys, mem_counts, lambda_, False)
    return torch.ops.csd.gate(draft_tokens, target_logits, mem_keys, mem_counts, lambda_, log_tau, False)


def _csd_replace(cpu_walk):
    def replace(draft_tokens, target_logits, mem_keys, mem_counts, lambda_, log_tau):
        return _gate_nodes(cpu_walk, draft_tokens, target_logits, mem_keys, mem_counts, lambda_, log_tau)

    return replace


def _exact_search(draft_tokens, target_logits):
    from ..kernels.gate import exact_accept_torch

    return exact_accept_torch(draft_tokens, target_logits)


def _greedy_search(draft_tokens, target_logits):
    from ..speculative.acceptance import greedy_accept

    return greedy_accept(draft_tokens, target_logits)


def _exact_replace(cpu_walk):
    def replace(draft_tokens, target_logits):
        from ..kernels.gate import _LAMBDA_CAP

        keys = torch.full((1, 1), -1, dtype=torch.int64, device=draft_tokens.device)
        counts = torch.zeros((1, 1), dtype=torch.int32, device=draft_tokens.device)
        return _gate_nodes(cpu_walk, draft_tokens, target_logits, keys, counts, _LAMBDA_CAP, 0.0)

    return replace


def _shapes_ok(match) -> bool:
    d = match.kwargs["draft_tokens"].meta.get("val")
    z = match.kwargs["target_logits"].meta.get("val")
    return (
        d is not None and z is not None and d.dim() == 2 and z.dim() == 3 and d.dtype == torch.int64
        and z.shape[0] == d.shape[0] and z.shape[1] == d.shape[1] + 1
    )


@functools.cache
def _pattern_pass(cpu_walk: bool) -> PatternMatcherPass:
    import csd_compile.kernels.gate  # noqa: F401  (registers torch.ops.csd.gate)

    patterns = PatternMatcherPass(pass_name="csd_fuse_gating")
    draft = torch.randint(0, 16, (2, 3))
    keys = torch.full((4, 2), -1, dtype=torch.int64)
    counts = torch.zeros((4, 2), dtype=torch.int32)
    searches = [_exact_search]
    try:
        import csd_compile.speculative.acceptance  # noqa: F401
    except ImportError:  # the engine is optional for this pass
        pass
    else:
        searches.append(_greedy_search)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randn(2, 4, 16, dtype=dtype)
        register_replacement(
            _csd_search, _csd_replace(cpu_walk), [draft, logits, keys, counts], fwd_only, patterns,
            extra_check=_shapes_ok, scalar_workaround={"lambda_": _LAMBDA_PH, "log_tau": _LOG_TAU_PH},
            skip_duplicates=True,
        )
        for search in searches:
            register_replacement(search, _exact_replace(cpu_walk), [draft, logits], fwd_only, patterns,
                                 extra_check=_shapes_ok, skip_duplicates=True)
    return patterns


def fuse_gating(graph: torch.fx.Graph, cpu_walk: bool = True) -> int:
    """Rewrite every plain-torch acceptance in ``graph`` (a post-grad aten graph) into ``csd.gate``;
    returns the number of replacements.

    With ``cpu_walk`` (the default), a CPU match becomes what ``csd.gate`` itself lowers to on CPU:
    the argmax and gate bits as aten ops (Inductor fuses them; its argmax is ~5x faster than the
    eager one an opaque node would run) plus one ``csd.gate_walk`` node. CUDA matches, and every
    match when ``cpu_walk=False``, become a single ``csd.gate`` node.
    """
    return _pattern_pass(bool(cpu_walk)).apply(graph)


class FuseGatingPass(CustomGraphPass):
    """:func:`fuse_gating` as Inductor's ``post_grad_custom_pre_pass``, with a cache key."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        try:
            fuse_gating(graph)
        except Exception as e:  # never break the user's program: the plain ops still compute the same
            from ..backend import CSDFallbackWarning

            warnings.warn(f"csd backend: fuse_gating skipped ({type(e).__name__}: {e})", CSDFallbackWarning, stacklevel=2)

    def uuid(self) -> str:
        from .cache_key import source_fingerprint

        return source_fingerprint()

