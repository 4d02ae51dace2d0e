"""``options={"bits": "dynamic"}`` inside the backend: the compiled step drives its own bit plan.

The quantize pass puts every quantized linear of the graph on a shared 0-d ``bits`` tensor (see
``quant.registry``). For ``bits="dynamic"`` the backend then wraps the compiled graph: after each
call, :class:`~csd_compile.quant.policy.DynamicPrecisionPolicy` reads the entropy of the logits the
graph returned and writes the next token's per-layer plan into those ``bits`` tensors, with tensor
ops on the device (no host sync; the graph never recompiles: bits are runtime tensors).

Layers are matched to the precision table by module path, read from Dynamo's sources of the weight
placeholders (``..._modules['layers']._modules['0']._modules['mlp']._modules['up_proj']
._parameters['weight']`` -> ``layers.0.mlp.up_proj``) and compared by suffix, so compiling the model
itself, a wrapper around it, or a function closing over it all find the table's names. The table
must have been calibrated for these weights (fingerprint) with the same group size.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import fx

from ..passes import node_value
from .policy import DynamicPrecisionPolicy, check_avg_bits
from .registry import lookup_quantized
from .table import PrecisionTable, TableError, weights_fingerprint

__all__ = ["load_table", "module_path", "policy_for_graph", "wrap"]

DEFAULT_AVG_BITS = 6.0  # budget when options give none (clipped to the table's ladder)
_MODULE_KEY = re.compile(r"_modules\['([^']+)'\]")


def module_path(placeholder: fx.Node) -> str | None:
    """The module path of the parameter behind a Dynamo placeholder (``None`` if it has no source)."""
    arg = placeholder.meta.get("grapharg")
    source = getattr(arg, "source", None)
    name = getattr(source, "name", None)
    if callable(name):  # older Dynamo: a method
        name = name()
    if not isinstance(name, str):
        return None
    parts = _MODULE_KEY.findall(name)
    return ".".join(parts) if parts else None


def _match(names: Sequence[str], paths: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Table name -> the graph weight whose module path is that name or ends with ``.`` + it."""
    out = {}
    for name in names:
        hits = [w for p, w in paths.items() if p == name or p.endswith("." + name)]
        if len(hits) == 1:
            out[name] = hits[0]
    return out


def _logits_index(gm: fx.GraphModule, vocab: set[int]) -> int | None:
    """Index, in the graph's flat outputs, of the logits (a float output whose last dim is a vocab)."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    flat = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else (out_node.args[0],)
    for i, node in enumerate(flat):
        val = node_value(node)
        if val is not None and val.is_floating_point() and val.dim() >= 2 and val.shape[-1] in vocab:
            return i
    return None


def load_table(path: str, avg_bits: float | None, group_size: int) -> tuple[PrecisionTable, float]:
    """The table at ``path`` and the budget to use with it; raise before any compile work when the
    file is missing or corrupt, ``avg_bits`` is off its ladder, or its group size differs."""
    table = PrecisionTable.load(path)  # a missing file: FileNotFoundError naming `csd-compile calibrate`
    lo, hi = min(table.ladder), max(table.ladder)
    avg = check_avg_bits(min(max(DEFAULT_AVG_BITS, lo), hi) if avg_bits is None else avg_bits, table.ladder)
    if table.group_size != group_size:
        raise TableError(f"precision table {path!r} was calibrated with group_size={table.group_size}, "
                         f"the options ask for group_size={group_size}; use the same group size")
    return table, avg


def policy_for_graph(gm: fx.GraphModule, example_inputs: Sequence[object], table: PrecisionTable, avg_bits: float,
                     group_size: int) -> tuple[DynamicPrecisionPolicy, int] | None:
    """The policy driving ``gm``'s quantized linears (``gm`` after the quantize pass) and the index of
    the logits among its flat outputs; ``None`` for a graph that returns no logits (no output whose
    last dim is an embedding's vocabulary), which has nothing to drive the policy with.

    Raises :class:`TableError` when the table does not fit the graph's model (layers, fingerprint).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    paths, vocab = {}, set()
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.nn.Parameter) or value.dim() != 2:
            continue
        path = module_path(node)
        if path is None:
            continue
        if lookup_quantized(value):
            paths[path] = value
        else:  # full-precision tables (embedding, LM head): their row count may be the vocabulary
            vocab.add(value.shape[0])
    idx = _logits_index(gm, vocab)
    if idx is None:
        return None
    found = _match(table.names, paths)
    if len(found) != len(table.names) or len(paths) != len(table.names):
        missing = [n for n in table.names if n not in found][:3]
        raise TableError(f"the compiled model's quantized linears ({len(paths)}) do not match the precision "
                         f"table's {len(table.names)} layers (unmatched: {missing}); calibrate this model")
    weights = [(name, found[name]) for name in table.names]
    table.check_fingerprint(weights_fingerprint(weights, group_size))
    targets = [_bits_of(w, group_size) for _, w in weights]
    return DynamicPrecisionPolicy.from_table(table, avg_bits, device=targets[0].device).drive(targets), idx


def wrap(compiled: Callable, policy: DynamicPrecisionPolicy, logits_index: int) -> Callable:
    """``compiled``, then the policy on the logits it returned (tensor ops only: no host sync)."""

    def run(*args):
        out = compiled(*args)
        policy(out[logits_index])
        return out

    run.csd_policy = policy  # for inspection and tests
    return run


def _bits_of(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    for qlin in lookup_quantized(weight):
        if qlin.group_size == group_size:
            return qlin.bits
    raise TableError(f"no {group_size}-group quantized copy of a weight of shape {tuple(weight.shape)}")
