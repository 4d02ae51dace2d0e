"""Calling a compiled step inside one decoding loop: through Dynamo at its first call, straight to
its graph at the later ones.

A call of a compiled step costs more than its graph. Dynamo checks the frame's guards, then the
frame's transformed bytecode fetches every graph input from the model and its cache (each
parameter, each key and value tensor: about 670 item and 460 attribute lookups for the embedded
model) and calls the graph. On the embedded model's CPU decode step that was about 1 ms a token
with the guards already skipped (7.2 against 6.2 ms: ``benchmarks.fixed_cost_ab --lever direct``).
Inside one decoding call the step's arguments are the same objects at every token (the model, its
cache, the loop's own tensors, whose values change in place), so once a step's first call in the
loop has passed every guard, its later calls would run the same graph on the same inputs.
:class:`LoopSteps` makes them do so directly:

1. The first call of a step in a loop goes through Dynamo, every guard checked, while the graphs
   of the "csd" backend record what they are called with (:class:`Recorded`: every callable the
   backend returns).
2. Later calls with the very same arguments (each the same object, or an equal int, float, bool or
   str) call the recorded graph on the recorded inputs and return its outputs in the step's own
   return structure.

That is the step's own behaviour when the step is its graph, which the first call checks: exactly
one graph of this backend ran, on CPU tensors only (on CUDA, CUDA graph trees keep their own
bookkeeping per call); what the step returned is that graph's outputs, each of them, as the graph
gave them; and what the frame's bytecode replays around the graph is the same at every call.
Dynamo replays a frame's side effects as the final state its trace computed: constants, the
frame's inputs and objects built from them, which a later call with the same arguments would
write again unchanged (transformers' forward resets its output-capturing context variable this
way), and graph outputs, the one kind of value that changes. So the bytecode must read each graph
output once, straight into the return value, and call no helper that is not a plain write
(advancing an iterator, autograd's hooks). A step that fails a check keeps going through Dynamo,
with the guards skipped on its later calls with the same arguments
(``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, which still checks the guards that
tell the frame's compiled variants apart); a call with other arguments is a first call again.

Where the step's graph replays a CPU graph (``mode="reduce-overhead"`` on CPU), the direct calls go
one step further: the first two watch what reaches the CPU graph, and when both handed it the same
objects and the step's outputs are the CPU graph's own, the later calls replay the CPU graph bound
to those inputs (``cpu_graph.BoundReplay``), without the compiled graph's entry (AOT Autograd's
wrapper and its list of every input, ~1200 for the embedded model). A bound replay that cannot run
(an input moved, a profiler is on) hands back to the entry for the rest of the loop.

What a direct call does not see: Python state changed between two steps of one loop by code that
runs inside it (a streamer's ``put`` swapping a module or replacing a buffer by a new tensor).
Changes between two decoding calls are seen: each call's first step goes through Dynamo.

Also here: :func:`own_code`, which gives each decoding step a code object of its own before it is
compiled (Dynamo keeps compiled graphs, and counts recompiles, per code object).
"""

from __future__ import annotations

import dis
import functools
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["LoopSteps", "Recorded", "own_code"]

_local = threading.local()  # .calls: the list a first call records into, while it runs

# Dynamo helpers whose replay is not the same at every call: advancing an iterator, autograd state
_NOT_IDEMPOTENT = ("iter_next", "save_for_backward", "hook")
_PLAIN_VALUES = (int, float, bool, str)


def own_code(fn: types.FunctionType) -> types.FunctionType:
    """``fn`` on a copy of its code object, to compile on its own. Dynamo keeps compiled graphs, and
    counts recompiles, per code object: every speculative engine's step is ``build_step``'s one
    function and every ``GreedyDecoder``'s step its one closure, and on that shared code the ninth
    engine of a process (another K, cache size or draft) failed with the recompile limit."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class Recorded:
    """A graph compiled by the "csd" backend, which records its calls while a :class:`LoopSteps`
    first call runs (one thread-local check per call otherwise). ``resolve(args)``, when given,
    picks the callable that runs these inputs (the backend's per-weights graphs), so that the
    recording holds the graph itself."""

    __slots__ = ("fn", "resolve")

    def __init__(self, fn: Callable, resolve: Callable[[Sequence[Any]], Callable] | None = None) -> None:
        self.fn, self.resolve = fn, resolve

    def __call__(self, *args: Any) -> Any:
        fn = self.fn if self.resolve is None else self.resolve(args)
        out = fn(*args)
        calls = getattr(_local, "calls", None)
        if calls is not None:
            calls.append((fn, args, out))
        return out


class LoopSteps:
    """``steps(step, *args, **kwargs)`` for each call of a compiled step inside one decoding loop:
    the step's first call through Dynamo, its later calls with the same arguments straight to its
    graph, or through Dynamo with the guards skipped where the step is not a plain graph (module
    docstring). A call with other arguments is a first call again. ``compiled`` False (eager steps):
    plain calls. One instance per decoding call."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        self._steps: dict[int, _Seen] = {}

    def __call__(self, step: Callable, *args: Any, **kwargs: Any) -> Any:
        if not self.compiled:
            return step(*args, **kwargs)
        seen = self._steps.get(id(step))
        if seen is not None and seen.same_arguments(args, kwargs):
            if seen.direct is not None:
                return seen.direct.run()
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return step(*args, **kwargs)
        calls: list = []
        before = getattr(_local, "calls", None)
        _local.calls = calls
        try:
            out = step(*args, **kwargs)
        finally:
            _local.calls = before
        self._steps[id(step)] = _Seen(args, kwargs, _Direct.of(step, calls, out))
        return out

    def direct(self, step: Callable) -> bool:
        """Whether ``step``'s later calls with its last arguments go straight to its graph."""
        seen = self._steps.get(id(step))
        return seen is not None and seen.direct is not None

    def bound(self, step: Callable) -> tuple[Any, int] | None:
        """``step``'s bound replay (``cpu_graph.BoundReplay``) and the position of its one output among
        the CPU graph's outputs, for a loop whose next calls of ``step`` would pass its last
        arguments; None unless ``step`` returns one tensor and is bound."""
        seen = self._steps.get(id(step))
        direct = seen.direct if seen is not None else None
        if direct is None or direct.bound is None or len(direct.bound_picks) != 1:
            return None
        return direct.bound, direct.bound_picks[0]

    def unbind(self, step: Callable) -> None:
        """``step``'s later calls go through its graph's entry again (its bound replay failed a check)."""
        seen = self._steps.get(id(step))
        if seen is not None and seen.direct is not None:
            seen.direct.bound = None


class _Seen:
    """The arguments of a step's first call in a loop, and its direct call when there is one."""

    __slots__ = ("args", "kwargs", "direct")

    def __init__(self, args: tuple, kwargs: dict, direct: _Direct | None) -> None:
        self.args, self.kwargs, self.direct = args, kwargs, direct

    def same_arguments(self, args: tuple, kwargs: dict) -> bool:
        if len(args) != len(self.args) or kwargs.keys() != self.kwargs.keys():
            return False
        return all(map(_same, args, self.args)) and all(_same(v, self.kwargs[k]) for k, v in kwargs.items())


class _Direct:
    """A step's graph with the inputs its first call gave it, and where its outputs go.

    Where that graph replays a CPU graph (``mode="reduce-overhead"``, csd_compile/cpu_graph.py), its
    first two direct calls watch what reaches the CPU graph: when both passed it the same objects and
    it returned exactly the step's outputs, the later calls replay it bound to them
    (``cpu_graph.BoundReplay``), skipping the compiled graph's own entry."""

    __slots__ = ("fn", "inputs", "picks", "spec", "bound", "bound_picks", "_watched")

    def __init__(self, fn: Callable, inputs: tuple, picks: list[int], spec: pytree.TreeSpec) -> None:
        self.fn, self.inputs, self.picks, self.spec = fn, inputs, picks, spec
        self.bound: Any = None  # a cpu_graph.BoundReplay, once the watched calls allow one
        self.bound_picks: list[int] = []  # the step's outputs as positions in the CPU graph's outputs
        self._watched: Any = None  # the first watched call's (CPU graph, inputs); False: not watching

    @classmethod
    def of(cls, step: Callable, calls: list, out: Any) -> _Direct | None:
        """The direct call of ``step`` that its first call (``calls`` recorded, ``out`` returned)
        shows to be equivalent, or None."""
        if len(calls) != 1:
            return None
        fn, inputs, outputs = calls[0]
        if not isinstance(outputs, (list, tuple)) or not _on_cpu(inputs) or not _on_cpu(outputs):
            return None
        leaves, spec = pytree.tree_flatten(out)
        where = {id(o): i for i, o in enumerate(outputs)}
        picks = [where.get(id(leaf)) for leaf in leaves]
        if len(where) != len(outputs) or None in picks or sorted(picks) != list(range(len(outputs))):
            return None  # an output the step did not return, or returned other than as the graph gave it
        if not _plain_frame(step):
            return None
        return cls(fn, inputs, picks, spec)

    def run(self) -> Any:
        if self.bound is not None:
            outputs = self.bound()
            if outputs is not None:
                return pytree.tree_unflatten([outputs[i] for i in self.bound_picks], self.spec)
            self.bound = None  # it could not run (csd_compile/cpu_graph.py): the graph's own entry from now on
        if self._watched is False:
            outputs = self.fn(*self.inputs)
        else:
            outputs = self._watch()
        return pytree.tree_unflatten([outputs[i] for i in self.picks], self.spec)

    def _watch(self) -> Any:
        from . import cpu_graph

        with cpu_graph.watching() as graphs:
            outputs = self.fn(*self.inputs)
        self._watched = self._bind(graphs, outputs)
        return outputs

    def _bind(self, graphs: list, outputs: Any) -> Any:
        """What to remember after a watched call: this call's CPU graph and inputs (first call), or
        False (done watching: bound, or not bindable)."""
        if len(graphs) != 1 or not isinstance(outputs, (list, tuple)):
            return False
        graph, inputs, returned = graphs[0]
        if self._watched is None:
            return graph, inputs
        first, first_inputs = self._watched
        if graph is not first or len(inputs) != len(first_inputs) or not all(map(_same, inputs, first_inputs)):
            return False  # the compiled graph's entry passed other objects: not the same call each time
        if not isinstance(returned, (list, tuple)):
            return False
        where = {id(o): i for i, o in enumerate(returned)}
        order = [where.get(id(o)) for o in outputs]
        if len(where) != len(returned) or None in order or sorted(order) != list(range(len(returned))):
            return False  # the entry did more with the outputs than hand them on
        self.bound = graph.bind(inputs)
        self.bound_picks = [order[i] for i in self.picks]
        return False


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and isinstance(a, _PLAIN_VALUES) and a == b)


def _on_cpu(values: Sequence[Any]) -> bool:
    return all(v.device.type == "cpu" for v in values if isinstance(v, torch.Tensor))


def _plain_frame(step: Callable) -> bool:
    """Whether every compiled variant of ``step``'s frame replays nothing around its graph call that a
    later call with the same arguments would replay differently (module docstring). False when
    that cannot be read."""
    code = getattr(getattr(step, "_torchdynamo_orig_callable", None), "__code__", None)
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

        entries = _debug_get_cache_entry_list(code) if code is not None else []
    except Exception:  # another PyTorch: no way to look, so no direct calls
        return False
    return bool(entries) and all(_same_replay_every_call(e.code) for e in entries)


@functools.lru_cache(maxsize=64)
def _same_replay_every_call(code: types.CodeType) -> bool:
    """Dynamo replays a frame's side effects after the graph as the final state its trace computed:
    constants, the frame's own inputs, objects it built from them, and graph outputs, the only values
    that change from call to call. So the replay is the same at every call unless it writes a graph
    output, or calls a helper that is not a plain write. A graph output read once from the graph's
    result list, and not kept for a second use (COPY, STORE_FAST), goes to one place; the caller
    then checks that it is the step's return value."""
    ins = list(dis.get_instructions(code))
    stores = [i.argval for i in ins if i.opname == "STORE_FAST" and str(i.argval).startswith("graph_out")]
    if len(stores) != 1:
        return False
    result = stores[0]
    read = []
    for k, i in enumerate(ins):
        name = i.argval if isinstance(i.argval, str) else ""
        if i.opname in ("LOAD_ATTR", "LOAD_METHOD", "LOAD_GLOBAL") and any(n in name for n in _NOT_IDEMPOTENT):
            return False
        if result not in (i.argval if isinstance(i.argval, tuple) else (i.argval,)) or i.opname in (
                "STORE_FAST", "DELETE_FAST"):
            continue
        # any other use than LOAD_FAST result; LOAD_CONST j; BINARY_SUBSCR, not kept (another Python's
        # opcodes included: they fail here, and the step keeps going through Dynamo)
        after = [j.opname for j in ins[k + 1:k + 4]] + ["", "", ""]
        if i.opname != "LOAD_FAST" or after[:2] != ["LOAD_CONST", "BINARY_SUBSCR"] or after[2] in (
                "COPY", "DUP_TOP", "STORE_FAST"):
            return False
        read.append(ins[k + 1].argval)
    return len(read) == len(set(read))
