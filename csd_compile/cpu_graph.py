"""CPU graphs: a compiled CPU step recorded once and replayed from C++ (``mode="reduce-overhead"`` on CPU).

A decode step of a small model runs about 270 kernels a token, most of a few microseconds. Inductor's
Python wrapper around them (argument parsing, views, allocations and frees, ~125 statements a layer)
adds a few microseconds to each, while the other thread waits (about 0.5 ms of a 7 ms step of the
embedded model). CUDA graphs remove the same kind of cost on a GPU; this is their CPU counterpart,
for the graphs this backend compiles with ``mode="reduce-overhead"``:

1. The first call runs the wrapper as usual, but through a copy of its code whose kernels are
   recording shims. The step becomes a list of calls (``csrc/cpu_graph.cpp``): Inductor's generated
   C++ kernels by their address with their argument words (pointers and sizes), this package's
   quantized linears and decode attention writing into the outputs the recording call allocated,
   and from Python with their recorded arguments: Inductor's extern kernels (a GEMM into ``out=``),
   C++ kernels with floating-point arguments, and ops reached through ``torch.ops`` (ATen fallbacks,
   random seeds), whose new tensors are copied into the ones the recording call returned.
2. Later calls check the inputs and replay that list from C++: no Python between the kernels, no
   allocation, the same buffers.

Inputs. Parameters, buffers marked static (HF's static KV cache) and every input the graph writes to
are read in place: a replay first checks that each is still at its recorded address, and records
the step again when one has moved. Other inputs up to 64 KiB (the token, its position) are copied
into the graph's own buffers before each replay, so the caller may pass new tensors each call.
Outputs are copies (a replay reuses its buffers), as CUDA graphs' outputs are after a copy.

Bound replays: a caller that passes the same objects at every call (a decoding loop,
``csd_compile.stance.LoopSteps``) binds a recording to them once (``CpuGraphStep.bind``); a
:class:`BoundReplay` then replays it with the same checks, from C++, without the Python list of the
graph's inputs or the compiled graph's entry around it.

Symbolic sizes (int inputs: Dynamo recompiles a step with a dynamic cache length once it has seen
a second cache size) fix every kernel argument of a call, so such a graph keeps one recording per
value of its int inputs (at most ``MAX_SIZES``, the least recently replayed dropped first).

What is not replayed, with one warning: a wrapper that calls anything else (a nested region's
subgraph function, an op returning something other than tensors), inputs that are neither tensors
nor ints, a graph whose inputs keep moving (more than ``MAX_RECORDINGS`` recordings, fewer than
four replays each), and every graph when the C++ kernels are not available (no compiler,
``native.disable()``). Such a graph runs Inductor's own wrapper, as without the mode; so does a
training graph's forward. Under ``torch.profiler`` the wrapper runs too (the profile keeps its
per-kernel rows).
"""

from __future__ import annotations

import contextlib
import ctypes
import dis
import logging
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "CpuGraphWarning", "CpuGraphStep", "BoundReplay", "replay", "live_steps", "metadata_prefetch", "watching",
    "bound_replays", "SMALL_INPUT_BYTES", "MAX_RECORDINGS", "MAX_SIZES",
]

log = logging.getLogger(__name__)

SMALL_INPUT_BYTES = 1 << 16  # inputs up to this size that are neither static nor written are copied in
MAX_RECORDINGS = 8  # then: give up unless the recordings are replayed four times each on average
MAX_SIZES = 8  # recordings kept at once, one per value of a graph's symbolic sizes (least recently replayed goes)

# wrapper globals that only make buffers and views (their results reach the recorded kernels) or
# check the inputs' alignment, sizes and strides (which a replay's checks of its inputs imply)
_PASS_THROUGH = frozenset({"empty_strided_cpu", "reinterpret_tensor", "assert_alignment", "assert_size_stride"})


class CpuGraphWarning(UserWarning):
    """A graph compiled with ``mode="reduce-overhead"`` on CPU runs without a CPU graph."""


class _NotReplayable(Exception):
    pass


def replay(compiled: Callable) -> None:
    """Makes the Inductor graphs behind ``compiled`` (what ``compile_fx`` returned: AOT Autograd's
    wrappers around one ``CompiledFxGraph`` for an inference graph) record and replay their steps.
    Whether Inductor compiled the graph or read it from AOT Autograd's cache, the graph object is
    reached through the wrappers' closures; without one, a warning and no CPU graph."""
    from torch._inductor.output_code import CompiledFxGraph

    from .kernels import native

    if not native.load():  # (no compiler, or native.disable()): the replay is C++
        warnings.warn("csd backend: mode='reduce-overhead' on CPU: the C++ CPU kernels are not available; the graph "
                      "runs without a CPU graph", CpuGraphWarning, stacklevel=3)
        return
    found = [g for g in _reachable(compiled) if isinstance(g, CompiledFxGraph)]
    for graph in list(found):
        runner = getattr(graph, "compiled_fn_runner", None)
        if isinstance(graph.current_callable, CpuGraphStep):
            continue
        if (graph.current_callable is None or runner is None or not hasattr(type(runner), "call")
                or not graph.fx_kwargs.get("is_inference")):  # (a training graph's forward: left as it is)
            found.remove(graph)
            continue
        static = set(graph.fx_kwargs.get("static_input_idxs") or ())
        aligned = set(getattr(graph, "inputs_to_check", None) or ())  # inputs its kernels assume aligned
        graph.current_callable = CpuGraphStep(runner, graph.current_callable, static, set(graph.mutated_input_idxs),
                                              aligned)
    if not found:
        warnings.warn("csd backend: mode='reduce-overhead' on CPU: no Inductor graph with a Python wrapper was found "
                      f"behind {type(compiled).__name__}; it runs without a CPU graph", CpuGraphWarning, stacklevel=3)


def _reachable(fn: Any, limit: int = 400) -> list:
    """Objects reachable from the callable ``fn`` through closures, ``functools.partial`` and instance
    attributes that are callables (breadth first, at most ``limit`` objects; modules and classes are
    not entered)."""
    out, seen, queue = [], set(), [fn]
    while queue and len(seen) < limit:
        obj = queue.pop(0)
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, torch.nn.Module, torch.Tensor)):
            continue
        seen.add(id(obj))
        out.append(obj)
        nxt = []
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                nxt.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        nxt.extend(getattr(obj, name) for name in ("func", "__self__", "__wrapped__") if hasattr(obj, name))
        if not isinstance(obj, (types.FunctionType, types.MethodType)) and hasattr(obj, "__dict__"):
            nxt.extend(vars(obj).values())
        queue.extend(o for o in nxt if callable(o) or type(o).__name__ == "CompiledFxGraph")
    return out


_LIVE: "weakref.WeakSet[CpuGraphStep]" = weakref.WeakSet()


def live_steps() -> list["CpuGraphStep"]:
    """The compiled graphs of this process that record and replay CPU graphs (their ``recordings``,
    ``replays`` and ``given_up`` say how it went)."""
    return list(_LIVE)


@contextlib.contextmanager
def metadata_prefetch(on: bool) -> Iterator[None]:
    """``with metadata_prefetch(False):`` replays without fetching each call's record and tensor
    metadata ahead of the call (the default is on; see cpu_graph.cpp), then restores the previous
    setting. Process-wide; for A/B measurements (``benchmarks.fixed_cost_ab --lever
    metadata_prefetch``)."""
    from .kernels import native

    graph_class = native.CpuGraph
    before = graph_class.set_prefetch(bool(on))
    try:
        yield
    finally:
        graph_class.set_prefetch(before)


_watch = threading.local()  # .calls: where CpuGraphStep calls are collected while watching() runs
_BIND = [True]  # CpuGraphStep.bind makes bound replays (bound_replays(False): it does not, for A/Bs)


@contextlib.contextmanager
def watching() -> Iterator[list]:
    """``with watching() as calls:`` collects the CPU graph calls this thread makes in the block, as
    (``CpuGraphStep``, its inputs, the outputs it returned)."""
    before = getattr(_watch, "calls", None)
    calls: list = []
    _watch.calls = calls
    try:
        yield calls
    finally:
        _watch.calls = before


@contextlib.contextmanager
def bound_replays(on: bool) -> Iterator[None]:
    """``with bound_replays(False):`` steps bound in the block do not replay bound
    (:class:`BoundReplay`; the default is on), then restores the previous setting. Process-wide;
    for A/B measurements (``benchmarks.fixed_cost_ab --lever bound_replay``)."""
    before = _BIND[0]
    _BIND[0] = bool(on)
    try:
        yield
    finally:
        _BIND[0] = before


def _profiling() -> bool:
    return torch.autograd.profiler._is_profiler_enabled


class CpuGraphStep:
    """The boxed callable of one compiled graph (``call(args)``): records the step at its first call,
    then replays it (see the module docstring)."""

    def __init__(self, runner: Any, plain: Callable[[list], Any], static: set[int], written: set[int],
                 aligned: set[int] = frozenset()) -> None:
        self._runner = runner
        self._plain = plain  # Inductor's callable (input realignment included)
        self._static, self._written, self._aligned = static, written, aligned
        self._sizes: tuple[int, ...] = ()  # positions of the int inputs (symbolic sizes), found at the first call
        self._recorded: dict[tuple, _Recording] = {}  # by the values of those inputs
        self._calls = 0
        self._lock = threading.Lock()
        self.recordings = 0
        self.replays = 0
        self.given_up: str | None = None  # why this graph runs without a CPU graph
        _LIVE.add(self)

    def __call__(self, args: list) -> Any:
        calls = getattr(_watch, "calls", None)
        if calls is None:
            return self._call(args)
        inputs = tuple(args)  # the call clears args
        outputs = self._call(args)
        calls.append((self, inputs, outputs))
        return outputs

    def bind(self, inputs: Sequence[Any]) -> "BoundReplay | None":
        """A replay of this graph's recording for ``inputs`` that holds them in C++, for a caller
        that passes the very same objects at every call (see :class:`BoundReplay`); None when no
        recording serves them (or bound replays are off: :func:`bound_replays`)."""
        if not _BIND[0] or self.given_up is not None:
            return None
        key = self._key(list(inputs))
        rec = self._recorded.get(key)
        binding = rec.graph.bind(list(inputs)) if rec is not None else None
        return None if binding is None else BoundReplay(self, key, rec, binding)

    def _call(self, args: list) -> Any:
        self._calls += 1
        if self._recorded and not _profiling():
            rec = self._recorded.get(self._key(args))
            if rec is not None:
                with self._lock:  # one replay at a time: they share the graph's buffers
                    if rec.graph.run(args):
                        self.replays += 1
                        rec.used = self._calls
                        args.clear()
                        return _copies(rec.outputs)
        if self.given_up is not None or _profiling():
            return self._plain(args)
        if self.recordings >= MAX_RECORDINGS and self.replays < 4 * self.recordings:
            self._give_up(f"its inputs moved between calls ({self.recordings} recordings, {self.replays} replays)")
            return self._plain(args)
        with self._lock:
            try:
                cap, graph, key = self._prepare(args)
            except _NotReplayable as e:
                self._give_up(str(e))
                return self._plain(args)
            self.recordings += 1
            self._recorded.pop(key, None)
            outputs, records = self._record(cap)
            try:
                keep = _add_steps(graph, records)
            except _NotReplayable as e:
                self._give_up(str(e))
            else:
                if len(self._recorded) >= MAX_SIZES:  # the least recently replayed one goes
                    del self._recorded[min(self._recorded, key=lambda k: self._recorded[k].used)]
                self._recorded[key] = _Recording(graph, keep, outputs, self._calls)
            args.clear()
            return _copies(outputs)

    def _give_up(self, why: str) -> None:
        self.given_up = why
        self._recorded.clear()
        warnings.warn(f"csd backend: mode='reduce-overhead' on CPU: this graph runs without a CPU graph: {why}",
                      CpuGraphWarning, stacklevel=3)

    def _prepare(self, args: list) -> tuple[list, Any, tuple]:
        """The inputs the recording runs on (small ones replaced by the graph's buffers), a new graph
        that checks or copies each, and the values of the int inputs the recording is for."""
        from .kernels import native

        _kernels(type(self._runner).call)  # raises for a wrapper that calls anything else
        graph = native.CpuGraph()
        graph.set_num_inputs(len(args))
        cap = list(args)
        sizes = []
        for i, t in enumerate(args):
            if type(t) is int:  # a symbolic size: this recording serves calls with the same value
                sizes.append(i)
                continue
            if not isinstance(t, torch.Tensor):
                raise _NotReplayable(f"input {i} is a {type(t).__name__}, not a tensor or an int")
            if t.device.type != "cpu" or t.is_sparse or t.layout != torch.strided:
                raise _NotReplayable(f"input {i} is not a dense CPU tensor ({t.device}, {t.layout})")
            if (i not in self._static and i not in self._written and t.is_contiguous()
                    and t.numel() * t.element_size() <= SMALL_INPUT_BYTES):
                buf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)  # the same strides
                cap[i] = buf
                graph.copy_input(i, buf)
            else:
                if i in self._aligned and t.data_ptr() % 16:  # Inductor's callable would copy it to align it
                    raise _NotReplayable(f"input {i} is not 16-byte aligned, as its kernels assume")
                graph.pin_input(i, t.data_ptr())
        if self._recorded and tuple(sizes) != self._sizes:
            raise _NotReplayable(f"its int inputs moved (positions {list(self._sizes)}, then {sizes})")
        self._sizes = tuple(sizes)
        return cap, graph, self._key(args)

    def _key(self, args: list) -> tuple:
        """The values of the int inputs (symbolic sizes): which recording serves ``args``."""
        return tuple([args[i] for i in self._sizes]) if self._sizes else ()

    def _record(self, cap: list) -> tuple[Any, list]:
        """Runs the wrapper's code once with recording shims in place of its kernels; its outputs and
        the calls it made, in order."""
        call = type(self._runner).call
        records: list = []
        shims = {name: _shim(fn, records) for name, fn in _kernels(call).items()}
        recording = types.FunctionType(call.__code__, {**call.__globals__, **shims}, call.__name__,
                                       call.__defaults__, call.__closure__)
        return recording(self._runner, cap), records


class BoundReplay:
    """Called, one more replay of a recording on the inputs it was bound to (``CpuGraphStep.bind``),
    without passing them again. A decoding loop calls a step's graph on the same objects at every
    token (csd_compile/stance.py), and the compiled graph's own entry (AOT Autograd's wrapper, the
    list of every input, ~1200 for the embedded model with its quantized weights lifted) then costs
    more than the few tensors whose values change: its objects are out of every cache after a step
    has streamed the weights. The replay still checks what a call checks (each input read in place
    at its recorded address, each one copied in the size of its buffer) and returns copies of the
    outputs, or None, having run nothing, when it cannot run: a profiler is on, the recording was
    replaced or dropped, or an input moved. The caller then calls the graph as usual."""

    __slots__ = ("step", "key", "rec", "binding")

    def __init__(self, step: CpuGraphStep, key: tuple, rec: "_Recording", binding: Any) -> None:
        self.step, self.key, self.rec, self.binding = step, key, rec, binding

    def _stale(self) -> bool:
        """Whether it may not run now: a profiler is on, or its recording was replaced or dropped."""
        return _profiling() or self.step._recorded.get(self.key) is not self.rec

    def _ran(self, n: int) -> None:
        """The step's bookkeeping for ``n`` replays of the recording (under the step's lock)."""
        step = self.step
        step._calls += n
        step.replays += n
        self.rec.used = step._calls

    def __call__(self) -> Any:
        if self._stale():
            return None
        with self.step._lock:
            if not self.rec.graph.run_bound(self.binding):
                return None
            self._ran(1)
            return _copies(self.rec.outputs)

    def loop(self, tokens: torch.Tensor, output: int, feed: torch.Tensor, count: torch.Tensor,
             stop: Sequence[int], each: Callable[[int], Any] | None = None) -> int:
        """Greedy decoding from C++ (``CpuGraph.run_bound_loop``): up to ``len(tokens)`` replays, each
        one's token (the graph's output ``output``, one int64) stored in ``tokens``, 1 added to
        ``count`` and the token written to ``feed`` (both inputs this replay was bound to) for the
        next replay, stopping after a token in ``stop``; ``each(token)`` is called as each comes.
        Returns how many replays ran; fewer than asked without a stop token when one could not run
        (as ``__call__`` returning None)."""
        if self._stale():
            return 0
        with self.step._lock:
            ran = self.rec.graph.run_bound_loop(self.binding, tokens, self.rec.outputs[output], feed, count,
                                                list(stop), each)
            self._ran(ran)
        return ran


class _Recording:
    """One recorded step: the C++ graph, the tensors its calls use (their addresses are in the graph),
    the outputs it writes, and the call that last replayed it."""

    __slots__ = ("graph", "keep", "outputs", "used")

    def __init__(self, graph: Any, keep: list, outputs: Any, used: int) -> None:
        self.graph, self.keep, self.outputs, self.used = graph, keep, outputs, used


def _copies(outputs: Any) -> Any:
    return type(outputs)(o.clone() if isinstance(o, torch.Tensor) else o for o in outputs)


def _kernel_address(fn: Any) -> int | None:
    """The address of the ``kernel`` C function behind one of Inductor's C++ kernel bindings."""
    module = getattr(fn, "__self__", None)
    path = getattr(module, "__file__", None)
    if getattr(fn, "__name__", None) != "kernel" or not isinstance(path, str) or not path.endswith(".so"):
        return None
    address = _ADDRESSES.get(path)
    if address is None:
        try:
            address = ctypes.cast(ctypes.CDLL(path).kernel, ctypes.c_void_p).value
        except (OSError, AttributeError):
            return None
        _ADDRESSES[path] = address
    return address


_ADDRESSES: dict[str, int] = {}


_SCANNED: "weakref.WeakKeyDictionary[types.FunctionType, dict[str, Any] | str]" = weakref.WeakKeyDictionary()


def _kernels(call: types.FunctionType) -> dict[str, Any]:
    """The kernels the wrapper function ``call`` calls, by their global names; raises
    ``_NotReplayable`` when it uses a global that is not a kernel this module replays, an
    allocation, a view, or a dtype (``torch.float32``). Read from its bytecode once (a large step's
    wrapper is ~150k instructions, about half a second)."""
    found = _SCANNED.get(call)
    if found is None:
        try:
            found = _scan(call)
        except _NotReplayable as e:
            found = str(e)
        _SCANNED[call] = found
    if isinstance(found, str):
        raise _NotReplayable(found)
    return found


def _scan(call: types.FunctionType) -> dict[str, Any]:
    module = call.__globals__
    kernels = {}
    code = list(dis.get_instructions(call))
    for i, ins in enumerate(code):
        if ins.opname != "LOAD_GLOBAL":
            continue
        name = ins.argval
        if name not in module or name in _PASS_THROUGH:
            continue  # builtins; allocations, views and checks run as they are
        fn = module[name]
        if fn is torch:  # every use is checked: a dtype, or an op
            attrs = []  # the attribute chain read from it: torch.float32, torch.ops.aten.sort.default, ...
            for nxt in code[i + 1:]:
                if nxt.opname not in ("LOAD_ATTR", "LOAD_METHOD"):
                    break
                attrs.append(str(nxt.argval))
            if len(attrs) == 1 and isinstance(getattr(torch, attrs[0], None), torch.dtype):
                continue
            if attrs[:1] == ["ops"]:  # an ATen fallback or custom op: replayed from Python
                kernels[name] = fn
                continue
            raise _NotReplayable(f"its wrapper calls {'.'.join(['torch', *attrs])}, which is not an Inductor C++ "
                                 "kernel or a csd CPU kernel")
        if fn is torch.device or name in kernels:
            continue
        if isinstance(fn, torch._ops._OpNamespace):  # aten = torch.ops.aten: its ops, replayed from Python
            kernels[name] = fn
            continue
        if name == "extern_kernels":  # e.g. extern_kernels.mm(a, b, out=buf): replayed from Python
            kernels[name] = fn
            continue
        if _replayable(fn):
            kernels[name] = fn
            continue
        raise _NotReplayable(f"its wrapper calls {name} ({type(fn).__name__}), which is not an Inductor C++ "
                             "kernel or a csd CPU kernel")
    return kernels


def _replayable(fn: Any) -> bool:
    from .kernels import native

    return (fn is native.direct_qlinear or fn is native.direct_qlinear_multi or fn is native.direct_attention
            or _kernel_address(fn) is not None)


class _ExternKernels:
    """Recording stand-in for the wrapper's ``extern_kernels`` namespace: a call that writes into an
    ``out=`` buffer is replayed as a Python call; one that returns a new tensor too, its result then
    copied into the recorded one."""

    def __init__(self, namespace: Any, records: list) -> None:
        self._namespace, self._records = namespace, records

    def __getattr__(self, name: str) -> Callable:
        fn = getattr(self._namespace, name)
        records = self._records

        def extern(*args, **kwargs):
            result = fn(*args, **kwargs)
            records.append(_python_record(fn, args, kwargs, None if kwargs.get("out") is not None else result,
                                          f"extern_kernels.{name}"))
            return result
        return extern


class _TorchOps:
    """Recording stand-in for ``torch`` in the wrapper's code: dtypes read through, and a call of an
    op reached through ``torch.ops`` (an ATen fallback: ``torch.ops.aten.cumprod.default(...)``) is
    recorded as a Python call whose new tensors are copied into the recorded ones at each replay."""

    def __init__(self, target: Any, records: list, path: str) -> None:
        self._target, self._records, self._path = target, records, path

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if self._path == "torch" and name != "ops":
            return value
        return _TorchOps(value, self._records, f"{self._path}.{name}")

    def __call__(self, *args, **kwargs):
        result = self._target(*args, **kwargs)
        self._records.append(_python_record(self._target, args, kwargs, result, self._path))
        return result


def _python_record(fn: Any, args: tuple, kwargs: dict, result: Any, what: str) -> tuple:
    """The record of a Python call: its new tensors (``result``: None, a tensor, or a tuple or list of
    tensors) are copied into the recorded ones at each replay."""
    if result is None:
        return ("python", fn, args, kwargs)
    outs = [result] if isinstance(result, torch.Tensor) else list(result) if isinstance(result, (tuple, list)) else None
    if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
        return ("unreplayable", f"{what} returned {type(result).__name__}, not tensors")
    return ("python_into", fn, args, kwargs, outs)


def _shim(fn: Any, records: list) -> Any:
    """A recording stand-in for the wrapper's kernel ``fn``."""
    from torch._inductor.select_algorithm import extern_kernels

    from .kernels import native

    if fn is extern_kernels:
        return _ExternKernels(fn, records)
    if fn is torch:
        return _TorchOps(torch, records, "torch")
    if isinstance(fn, torch._ops._OpNamespace):
        return _TorchOps(fn, records, fn.name if hasattr(fn, "name") else "torch.ops")

    if fn is native.direct_qlinear:
        def qlinear(x, qdata, scale, zero, bits):
            out = fn(x, qdata, scale, zero, bits)
            records.append(("qlinear", x, [qdata], [scale], [zero], [bits], [out]))
            return out
        return qlinear
    if fn is native.direct_qlinear_multi:
        def qlinear_multi(x, qdata, scale, zero, bits):
            outs = fn(x, qdata, scale, zero, bits)
            records.append(("qlinear", x, list(qdata), list(scale), list(zero), list(bits), list(outs)))
            return outs
        return qlinear_multi
    if fn is native.direct_attention:
        def attention(query, key, value, attn_mask, scale):
            out = fn(query, key, value, attn_mask, scale)
            records.append(("attention", query, key, value, attn_mask, scale, out))
            return out
        return attention
    address = _kernel_address(fn)

    def kernel(*args):
        records.append(("kernel", fn, address, args))
        return fn(*args)
    return kernel


def _add_steps(graph: Any, records: list) -> list:
    """The recorded calls into ``graph``; the tensors they use (to be kept alive with it)."""
    from .kernels import native

    keep: list = []
    max_words = native.cpu_graph_max_words
    for rec in records:
        kind = rec[0]
        if kind == "qlinear":
            _, x, qdata, scale, zero, bits, outs = rec
            graph.add_qlinear(x, qdata, scale, zero, bits, outs)
            keep.append(rec)
        elif kind == "attention":
            _, q, k, v, mask, scale, out = rec
            graph.add_attention(q, k, v, mask, float(scale), out)
            keep.append(rec)
        elif kind == "python":
            _, fn, args, kwargs = rec
            graph.add_python(fn, tuple(args), dict(kwargs))
            keep.append(rec)
        elif kind == "python_into":
            _, fn, args, kwargs, outs = rec
            graph.add_python_into(fn, tuple(args), dict(kwargs), outs)
            keep.append(rec)
        elif kind == "unreplayable":
            raise _NotReplayable(rec[1])
        else:
            _, fn, address, args = rec
            words = _words(args)
            if words is not None and len(words) <= max_words:
                graph.add_kernel(address, words)
            else:  # floating-point arguments travel in other registers: a Python call
                graph.add_python(fn, tuple(args), {})
            keep.append(args)
    log.debug("csd CPU graph: %d calls recorded", len(records))
    return keep


def _words(args: Sequence[Any]) -> list[int] | None:
    """A kernel's arguments as 64-bit words (tensors by their data address), or None if one is not
    a tensor or an integer."""
    words = []
    for a in args:
        if isinstance(a, torch.Tensor):
            words.append(a.data_ptr())
        elif isinstance(a, int) and not isinstance(a, bool) and -(1 << 63) <= a < (1 << 63):
            words.append(a)
        else:
            return None
    return words
