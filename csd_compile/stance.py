"""Skipping Dynamo's guard checks on the later calls of a compiled step inside one decoding loop.

Before running compiled code Dynamo checks every guard of the frame: for a quantized model about
1200 input tensors (each linear's planes, scales, zeros and bits), ~0.8 ms of a 10 ms CPU decode
step. Inside one decoding call the step's inputs are the same objects at every token (the model,
its caches, the loop's own tensors, whose values change but are not guarded), so once a step's
first call in the loop has passed every guard, its later calls can run under
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, which still checks the guards that
tell the frame's compiled variants apart. The stance is entered around the step call alone:
other compiled code (a streamer's, another thread's between steps) keeps its guards, and a model
changed between two calls is seen at the next call's first step.

Also here: :func:`own_code`, which gives each decoding step a code object of its own before it is
compiled (Dynamo keeps compiled graphs, and counts recompiles, per code object).
"""

from __future__ import annotations

import contextlib
import types

import torch

__all__ = ["GuardedOnce", "own_code"]


def own_code(fn: types.FunctionType) -> types.FunctionType:
    """``fn`` on a copy of its code object, to compile on its own. Dynamo keeps compiled graphs, and
    counts recompiles, per code object: every speculative engine's step is ``build_step``'s one
    function and every ``GreedyDecoder``'s step its one closure, and on that shared code the ninth
    engine of a process (another K, cache size or draft) failed with the recompile limit."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class GuardedOnce:
    """``with guards(step):`` around each call of a compiled step inside one decoding loop:
    full guard checks at a step's first call, the skipping stance at its later ones. ``compiled``
    False (eager steps): always a no-op. One instance per decoding call."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        self.seen: set[int] = set()

    def __call__(self, step) -> contextlib.AbstractContextManager:
        if not self.compiled:
            return contextlib.nullcontext()
        if id(step) not in self.seen:
            self.seen.add(id(step))
            return contextlib.nullcontext()
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
