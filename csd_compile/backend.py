"""The ``"csd"`` torch.compile backend: options -> config -> ordered FX passes -> Inductor.

Registered under the entry-point group ``torch_dynamo_backends``, so
``torch.compile(model, backend="csd", options={...})`` works right after ``pip install``.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from . import progress
from .config import MODES, CSDConfig, OptionError
from .passes import BOUND_INPUTS, clone_graph_module, node_value, pre_aot_passes
from .stance import Recorded

__all__ = ["csd_backend", "CSDFallbackWarning"]

# Inductor settings for every graph the backend compiles. The generated wrapper runs at every decode
# step: with size_asserts it re-checks the size and stride of each graph input and extern-kernel
# output (1211 checks, about 0.5 ms of a SmolLM2 step of 10 ms on CPU) that Dynamo's guards (inputs)
# and the ops' fake implementations and tests (outputs) already vouch for.
WRAPPER_CONFIG: dict[str, Any] = {"size_asserts": False}


class CSDFallbackWarning(UserWarning):
    """A graph the csd passes could not handle was compiled with plain Inductor instead."""


class _OptionErrorForDynamo(OptionError, torch._dynamo.exc.ShortenTraceback):
    # Dynamo wraps backend errors in BackendCompilerFailed but lets ShortenTraceback through,
    # so the user sees the OptionError (a ValueError) itself.
    def __init__(self, msg: str) -> None:
        ValueError.__init__(self, msg)
        self.first_useful_frame = None


def csd_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Any:
    """Compile a Dynamo graph: run the csd passes the options ask for, then Inductor.

    Args:
        gm: the torch-level FX graph captured by Dynamo.
        example_inputs: real tensors for the graph's placeholders (parameters included).
        options: the ``options=`` dict of ``torch.compile``; see :class:`CSDConfig`.
        mode: ``torch.compile``'s ``mode=`` (which it passes instead of ``options``): the same as
            the ``mode`` option, Inductor's settings for that mode.
    """
    compiled = _compile(gm, example_inputs, options=options, mode=mode)
    # recorded: a decoding loop calls the graph directly after a step's first call (csd_compile/stance.py)
    if isinstance(compiled, _BoundToWeights):
        return Recorded(compiled, compiled.graph_for)
    return Recorded(compiled)


def _compile(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | None,
    mode: str | None,
) -> Any:
    """:func:`csd_backend`'s work: the compiled graph, before it is wrapped for recording."""
    try:
        cfg = CSDConfig.from_options(options)
        if mode is not None:
            if mode not in MODES:
                raise OptionError(f"torch.compile mode={mode!r} is not supported; choose one of {list(MODES)}")
            if cfg.mode is not None and cfg.mode != mode:
                raise OptionError(f"torch.compile mode={mode!r} and option 'mode'={cfg.mode!r} disagree; give one")
            cfg = dataclasses.replace(cfg, mode=mode)
    except OptionError as e:
        raise _OptionErrorForDynamo(str(e)) from None

    table = None
    if cfg.bits == "dynamic":
        from .quant import compiled_policy

        try:
            table, avg_bits = compiled_policy.load_table(cfg.calibration, cfg.avg_bits, cfg.group_size)
        except (OSError, ValueError) as e:
            raise _OptionErrorForDynamo(str(e)) from None

    compiled_gm = gm
    bound: set[int] = set()  # inputs whose tensors the passes baked in (quantized weights)
    passes = pre_aot_passes(cfg)
    ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    progress.note(f"{ops} ops, csd passes", new_graph=True)
    if passes:
        work = clone_graph_module(gm)
        name = "?"
        try:
            for name, fn in passes:
                progress.note(f"{ops} ops, pass {name}")
                work = fn(work, example_inputs, cfg)
                bound.update(work.meta.get(BOUND_INPUTS, ()))
            compiled_gm = work
        except OptionError as e:  # options this graph cannot honour (bits="auto" on weights not from a GGUF)
            raise _OptionErrorForDynamo(str(e)) from None
        except Exception as e:  # a pass must never break the user's program
            warnings.warn(
                f"csd backend: pass {name!r} could not handle this graph ({type(e).__name__}: {e}); "
                "compiling it with plain Inductor instead",
                CSDFallbackWarning,
                stacklevel=2,
            )

    from torch._inductor.compile_fx import compile_fx

    if _has_cpu_qlinear(compiled_gm):
        from .kernels import native

        native.load()  # before tracing: the CPU lowering picks the C++ kernel when it exists
    from .passes.cache_key import CacheKeyPass

    patches: dict[str, Any] = {"post_grad_custom_post_pass": CacheKeyPass(), **WRAPPER_CONFIG}
    if cfg.mode not in (None, "default"):
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(cfg.mode))  # e.g. triton.cudagraphs for "reduce-overhead"
    if _all_cpu(example_inputs):
        # Inductor inlines cheap pointwise producers into their consumers; in a decode step that
        # puts the rotary embedding of the query (cos, sin) inside the attention's loop over every
        # cache slot: recomputed 512 times, a fifth of the step. Realizing any producer of more
        # than a few ops keeps such work out of reduction loops.
        patches["realize_opcount_threshold"] = 4
    if cfg.fuse_gating:
        from .passes.fuse_gating import FuseGatingPass

        patches["post_grad_custom_pre_pass"] = FuseGatingPass()
    driver = None
    if table is not None and compiled_gm is not gm:  # (a graph that fell back runs unquantized)
        try:
            driver = compiled_policy.policy_for_graph(compiled_gm, example_inputs, table, avg_bits, cfg.group_size)
        except ValueError as e:
            raise _OptionErrorForDynamo(str(e)) from None
    qlinears = sum(1 if str(n.target) == "csd.qlinear.default" else len(n.args[1])
                   for g in _graphs(compiled_gm) for n in g.nodes
                   if str(n.target) in ("csd.qlinear.default", "csd.qlinear_multi.default"))
    progress.note(f"{ops} ops ({qlinears} quantized linears), Inductor: lowering, C++ code and its build")
    compiled = compile_fx(compiled_gm, example_inputs, config_patches=patches)
    if cfg.mode == "reduce-overhead" and _all_cpu(example_inputs):
        from . import cpu_graph

        cpu_graph.replay(compiled)  # CUDA graphs' counterpart on CPU: csd_compile/cpu_graph.py
    if driver is not None:
        compiled = compiled_policy.wrap(compiled, *driver)
    if compiled_gm is gm or not bound:
        return compiled

    def rebuild(inputs: list[Any]) -> Callable:
        again = _compile(gm, inputs, options=options, mode=mode)
        return next(iter(again._graphs.values())) if isinstance(again, _BoundToWeights) else again

    return _BoundToWeights(compiled, sorted(bound), example_inputs, rebuild)


class _BoundToWeights:
    """A graph compiled with some inputs' tensors baked in (weights quantized into constants), run
    only with those very tensors at those inputs.

    Dynamo hands every instance of a module class the same graph (parameters are graph inputs), so
    a call with other tensors there (another instance of the same model, or a parameter replaced by
    a new one) must not run the first one's quantized weights: it compiles the graph again for its
    own tensors, and each set keeps its compiled graph for as long as all its tensors live. The
    check per call is the identities of the bound inputs (about 15 us for 200 weights).
    """

    def __init__(self, compiled: Callable, positions: list[int], example_inputs: Sequence[Any],
                 rebuild: Callable[[list[Any]], Callable]) -> None:
        self._pick = operator.itemgetter(*positions, positions[0])  # always a tuple, even for one
        self._rebuild = rebuild
        self._graphs: dict[tuple[int, ...], Callable] = {}
        self._add(compiled, example_inputs)

    def _key(self, args: Sequence[Any]) -> tuple[int, ...]:
        return tuple(map(id, self._pick(args)))

    def _add(self, compiled: Callable, inputs: Sequence[Any]) -> None:
        key = self._key(inputs)
        self._graphs[key] = compiled
        me = weakref.ref(self)
        for t in set(self._pick(inputs)):  # a freed tensor's id may be reused: forget its graphs
            weakref.finalize(t, _forget, me, key)

    def graph_for(self, args: Sequence[Any]) -> Callable:
        """The graph compiled for the tensors at the bound inputs of ``args`` (compiled now if new)."""
        compiled = self._graphs.get(self._key(args))
        if compiled is None:
            compiled = self._rebuild(list(args))
            self._add(compiled, args)
        return compiled

    def __call__(self, *args: Any) -> Any:
        return self.graph_for(args)(*args)


def _forget(ref: "weakref.ref[_BoundToWeights]", key: tuple[int, ...]) -> None:
    bound = ref()
    if bound is not None:
        bound._graphs.pop(key, None)


def _all_cpu(example_inputs: Sequence[Any]) -> bool:
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    return devices == {"cpu"}


def _graphs(gm: fx.GraphModule) -> list[fx.Graph]:
    """``gm``'s graph and those of its regions (subgraphs of higher-order ops)."""
    return [m.graph for m in gm.modules() if isinstance(m, fx.GraphModule)]


def _has_cpu_qlinear(gm: fx.GraphModule) -> bool:
    nodes = [n for g in _graphs(gm) for target in (torch.ops.csd.qlinear.default, torch.ops.csd.qlinear_multi.default)
             for n in g.find_nodes(op="call_function", target=target)]
    for node in nodes:
        val = node_value(node.args[0])
        if val is not None and val.device.type == "cpu":
            return True
    return False
