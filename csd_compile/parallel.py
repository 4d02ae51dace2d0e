"""Tensor-parallel decoding on ``torch.distributed``: every rank holds a slice of each layer.

Launch with ``torchrun --nproc-per-node N -m csd_compile generate --tp ...``, or from Python::

    tp = csd_compile.parallel.init()                # reads torchrun's env; gloo on CPU, NCCL on CUDA
    model = csd_compile.parallel.shard_model(model)  # a sharded copy; `model` itself is not changed
    ...
    csd_compile.parallel.close()                     # every rank, when done

The split is Megatron's, and which linear is which comes from transformers' own plan for the
model (``config.base_model_tp_plan``: ``colwise`` / ``rowwise`` per module path):

- attention: rank ``r`` holds a contiguous range of whole KV heads together with their query heads
  (``q_proj``, ``k_proj``, ``v_proj`` by rows, ``o_proj`` by columns), so grouped-query attention
  stays local to the rank;
- MLP: ``gate_proj`` / ``up_proj`` by rows, ``down_proj`` by columns;
- one all-reduce (sum) after each row-parallel projection (``o_proj``, ``down_proj``);
- embedding, norms and LM head replicated: every rank computes the same logits, so sampling,
  draft acceptance and CSD's correction memory run identically everywhere with no extra message.

**Uneven shards.** The split need not be even: SmolLM2-135M has 9 query / 3 KV heads, and at
TP=2 rank 0 holds 2 KV heads (6 query heads) and rank 1 holds 1 (3 query heads). DTensor's
``parallelize_module`` styles (which transformers' ``tp_plan`` applies) shard a dimension evenly
and leave head counts to the model, which does not fit here; so this module reads the plan but
applies it itself: it slices each local weight into a plain ``nn.Linear`` (row-parallel ones are
:class:`RowParallelLinear`, whose forward ends with a traceable functional all-reduce that
Dynamo/Inductor compile into the graph), and gives the sharded model a per-rank config copy with
the local ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size``, which sizes
the KV caches (HF ``StaticCache`` and the speculative engine's ``RowCache``). One code path serves
even and uneven splits, and the sharded model is an ordinary module tree: the csd backend's
quantize pass, the self draft and ``csd_compile.generate`` see plain linears of the local shape.

A world size larger than the KV-head count cannot be served (a rank would hold no head) and is
an error before any work, as is quantizing with a group size that does not divide every
row-parallel shard's width (:func:`check_group_size`), since a group must not straddle ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .quant import gguf

__all__ = [
    "AllReduced", "BACKENDS", "DEFAULT_TIMEOUT_S", "RowParallelLinear", "ShardPlan", "TPInfo", "check_group_size",
    "check_launch", "check_same_sharding", "check_split", "close", "init", "plan_shards", "resolve_backend", "shard_model",
    "tp_info",
]

BACKENDS = ("gloo", "nccl")
# A collective waits this long for a rank before the group fails with an error (a rank that exits
# closes its connections, which fails its peers' next collective at once; the timeout covers a
# rank that hangs). Long enough for the slowest rank's first compile.
DEFAULT_TIMEOUT_S = 600.0
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_INFO_ATTR = "_csd_tp"
# Per-instance state of transformers / csd-compile that must not follow a module into its sharded copy
_DROPPED_STATE = ("_csd_speculative_engines", "_compiled_call", "_last_compile_config")


def check_launch() -> int:
    """The world size of a ``torchrun`` launch; ``ValueError`` when this process was not started by one."""
    missing = [k for k in _LAUNCH_ENV if k not in os.environ]
    if missing:
        raise ValueError(f"tensor parallel needs a distributed launch ({', '.join(missing)} not set): run "
                         "`torchrun --nproc-per-node N -m csd_compile generate --tp ...` (N ranks, one per device)")
    try:
        world = int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world} must be >= 1")
    return world


def resolve_backend(backend: str | None = None) -> str:
    """``None``/``"auto"``: NCCL when CUDA is available, else gloo. ``"nccl"`` without CUDA is an error."""
    if backend is None or backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"distributed backend {backend!r} is not supported; choose one of {['auto', *BACKENDS]}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("distributed backend 'nccl' needs CUDA devices and this machine has none; "
                         "use 'gloo' (the CPU backend) or 'auto'")
    return backend


@dataclasses.dataclass(frozen=True)
class TPInfo:
    """This process's place in the tensor-parallel group."""

    rank: int
    world: int
    group: object  # the ProcessGroup (dist.group.WORLD by default)
    backend: str


def init(backend: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> TPInfo:
    """Join the process group that ``torchrun`` set up (its env variables); idempotent.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``None``/``"auto"`` (:func:`resolve_backend`).
        timeout_s: how long a collective waits for a missing rank before failing with an error.
    """
    world = check_launch()
    backend = resolve_backend(backend)
    if not (isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and timeout_s > 0):
        raise ValueError(f"timeout_s={timeout_s!r} must be a number > 0 (seconds)")
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    elif dist.get_world_size() != world:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE={world}")
    return TPInfo(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, dist.get_backend())


def close() -> None:
    """Leave the process group when this rank is done (every rank calls it; no-op without a group).
    A barrier first, so that no rank tears its connections down while a peer is still in a
    collective or still closing: a gloo rank whose peer vanished under it can abort on its way out
    ("terminate called without an active exception"), as can one that exits with its group alive."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()


def _ranges(n: int, parts: int) -> tuple[tuple[int, int], ...]:
    """``n`` items in ``parts`` contiguous ranges, the first ``n % parts`` one item longer."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for r in range(parts):
        end = start + base + (r < extra)
        out.append((start, end))
        start = end
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Which heads and MLP columns each rank holds (ranges ``[start, end)``, one per rank)."""

    world: int
    kv_heads: tuple[tuple[int, int], ...]
    queries_per_kv: int
    head_dim: int
    intermediate: tuple[tuple[int, int], ...]

    def row_parallel_widths(self, rank: int) -> dict[str, int]:
        """Input features of this rank's ``o_proj`` and ``down_proj`` shards."""
        a, b = self.kv_heads[rank]
        i, j = self.intermediate[rank]
        return {"o_proj": (b - a) * self.queries_per_kv * self.head_dim, "down_proj": j - i}


def plan_shards(config, world: int) -> ShardPlan:
    """The split of a model with ``config`` over ``world`` ranks; ``ValueError`` when it cannot be split."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world size {world!r} must be an integer >= 1")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    inter = getattr(cfg, "intermediate_size", None)
    if heads % kv:
        raise ValueError(f"{heads} attention heads are not a multiple of {kv} KV heads; cannot shard by KV-head group")
    if world > kv:
        raise ValueError(f"tensor parallel over {world} ranks cannot shard {kv} KV heads ({heads} query heads): "
                         f"each rank needs at least one whole KV head; use at most {kv} ranks")
    if not isinstance(inter, int) or inter < world:
        raise ValueError(f"intermediate_size={inter!r} cannot be split over {world} ranks")
    return ShardPlan(world, _ranges(kv, world), heads // kv, head_dim, _ranges(inter, world))


def check_group_size(config, world: int, group_size: int) -> None:
    """``ValueError`` unless every rank's row-parallel shard width is a multiple of ``group_size``
    (quantization groups run along input features and must not straddle two ranks)."""
    from .config import SUPPORTED_GROUP_SIZES

    plan = plan_shards(config, world)
    widths = [(r, name, w) for r in range(world) for name, w in plan.row_parallel_widths(r).items()]
    bad = [(r, name, w) for r, name, w in widths if w % group_size]
    if bad:
        r, name, w = bad[0]
        fits = [g for g in SUPPORTED_GROUP_SIZES if all(w2 % g == 0 for _, _, w2 in widths)]
        raise ValueError(f"group_size={group_size} does not fit tensor parallel over {world} ranks: rank {r}'s "
                         f"{name} shard has {w} input features, not a multiple of {group_size} (a quantization "
                         f"group must not straddle two ranks); group sizes that fit: {fits or 'none'}")


def check_split(config, world: int, options) -> None:
    """``ValueError`` unless a model of ``config`` can run over ``world`` ranks with backend
    ``options`` (a dict, or a :class:`~csd_compile.config.CSDConfig`): the split itself
    (:func:`plan_shards`), a static bit-width (``"dynamic"`` is not supported yet), and the group size
    as the backend resolves it (:func:`check_group_size`: 32 for ``bits="auto"``, 64 when not given).
    What ``generate --tp`` and the bench's tensor-parallel row check before any work."""
    from .config import CSDConfig

    cfg = CSDConfig.from_options(options)
    plan_shards(config, world)
    if cfg.bits == "dynamic":
        raise ValueError("bits='dynamic' is not supported with --tp yet (its precision table describes the "
                         "whole model's weights); use bits=2|3|4|8")
    if cfg.bits is not None:
        check_group_size(config, world, cfg.group_size)


class RowParallelLinear(nn.Linear):
    """A linear holding some input features (columns) of the full weight: its output is a partial
    sum, all-reduced over the group with a functional collective (traceable: Inductor compiles it
    into the graph). The bias, if any, is held by rank 0 only, so it is added once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(F.linear(x, self.weight, self.bias), "sum", self.group)


class AllReduced(nn.Module):
    """``module``'s output all-reduced (sum) over ``group``: a :class:`RowParallelLinear` whose
    linear was swapped for another (the self draft's quantized view of the same shard)."""

    def __init__(self, module: nn.Module, group):
        super().__init__()
        self.module, self.group = module, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(self.module(x), "sum", self.group)


def _column(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _plan_patterns(model: nn.Module) -> list[tuple[re.Pattern, str]]:
    plan = getattr(model.config, "base_model_tp_plan", None)
    if not plan:
        raise ValueError(f"model type {getattr(model.config, 'model_type', type(model).__name__)!r} has no "
                         "tensor-parallel plan in transformers (config.base_model_tp_plan); it cannot be sharded")
    out = []
    for pattern, style in plan.items():
        regex = re.compile(r"(^|\.)" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
        out.append((regex, style))
    return out


# which dimension each linear of the plan is split along, by its leaf name
_HEAD_ROWS = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv"}
_FF_ROWS = ("gate_proj", "up_proj")


def tp_info(model: nn.Module) -> TPInfo | None:
    """The :class:`TPInfo` of a model made by :func:`shard_model`, ``None`` for an unsharded model."""
    return getattr(getattr(model, "_orig_mod", model), _INFO_ATTR, None)


def shard_model(model: nn.Module, info: TPInfo | None = None) -> nn.Module:
    """This rank's shard of ``model`` (see the module doc), a new module tree: sliced linears are new
    parameters, everything else (embedding, norms, LM head) is shared with ``model``, which is left
    as it was. Call :func:`init` first (or pass ``info``). Move ``model`` to this rank's device
    before sharding (``.to()`` on the shard would move the shared tensors of ``model`` too)."""
    model = getattr(model, "_orig_mod", model)
    if tp_info(model) is not None:
        raise ValueError("model is already sharded")
    if info is None:
        if not dist.is_initialized():
            raise ValueError("shard_model needs the process group: call csd_compile.parallel.init() first "
                             "(under torchrun)")
        info = TPInfo(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, dist.get_backend())
    plan = plan_shards(model.config, info.world)
    patterns = _plan_patterns(model)
    a, b = plan.kv_heads[info.rank]
    i0, i1 = plan.intermediate[info.rank]
    qk, hd = plan.queries_per_kv, plan.head_dim
    rows = {"q": slice(a * qk * hd, b * qk * hd), "kv": slice(a * hd, b * hd), "ff": slice(i0, i1)}

    def local(t: torch.Tensor | None, index) -> torch.Tensor | None:
        return None if t is None else t[index].detach().clone()

    def shard_linear(name: str, mod: nn.Module) -> nn.Module | None:
        style = next((s for regex, s in patterns if regex.search(name)), None)
        if style is None or style.startswith("replicated"):
            return None
        leaf = name.rsplit(".", 1)[-1]
        if type(mod) is not nn.Linear:
            raise ValueError(f"{name} is a {type(mod).__name__}, not a plain nn.Linear: shard the model before "
                             "quantizing or compiling it")
        if style == "colwise" and (leaf in _HEAD_ROWS or leaf in _FF_ROWS):
            r = rows[_HEAD_ROWS.get(leaf, "ff")]
            new = _column(local(mod.weight, r), local(mod.bias, r))
            gguf.register_slice(new.weight, mod.weight, rows=r)  # a GGUF weight's shard keeps the file's grid
            return new
        if style == "rowwise" and leaf in ("o_proj", "down_proj"):
            c = rows["q"] if leaf == "o_proj" else rows["ff"]
            bias = local(mod.bias, slice(None)) if info.rank == 0 else None
            new = RowParallelLinear(local(mod.weight, (slice(None), c)), bias, info.group)
            gguf.register_slice(new.weight, mod.weight, cols=c)
            return new
        raise ValueError(f"{name}: tensor-parallel style {style!r} is not one csd-compile shards "
                         "(it handles colwise q/k/v/gate/up and rowwise o/down projections)")

    config = copy.deepcopy(model.config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.head_dim = hd
    text.num_attention_heads = (b - a) * qk
    text.num_key_value_heads = b - a
    text.intermediate_size = i1 - i0
    old_configs = {id(model.config)}
    if hasattr(model.config, "get_text_config"):
        old_configs.add(id(model.config.get_text_config()))

    found = []

    def rebuild(name: str, mod: nn.Module) -> nn.Module:
        new = shard_linear(name, mod) if name else None
        if new is not None:
            found.append(name)
            return new
        new = copy.copy(mod)  # its own attribute dicts: assigning a parameter here leaves `model` alone
        new._parameters, new._buffers = dict(mod._parameters), dict(mod._buffers)
        for key in _DROPPED_STATE:
            new.__dict__.pop(key, None)
        if id(getattr(mod, "config", None)) in old_configs:
            new.config = config if mod.config is model.config else text
        new._modules = {k: rebuild(f"{name}.{k}" if name else k, c) if c is not None else None
                        for k, c in mod._modules.items()}
        for attr in ("num_heads", "num_key_value_heads"):  # older attention modules keep their own counts
            if isinstance(getattr(new, attr, None), int) and hasattr(new, "head_dim"):
                setattr(new, attr, text.num_attention_heads if attr == "num_heads" else text.num_key_value_heads)
        return new

    sharded = rebuild("", model)
    if not found:
        raise ValueError(f"no linear of {type(model).__name__} matches its tensor-parallel plan; cannot shard it")
    sharded.__dict__[_INFO_ATTR] = info
    return sharded


def check_same_sharding(target: nn.Module, draft: nn.Module) -> None:
    """``ValueError`` unless a draft model used with a sharded ``target`` is sharded over the same group."""
    t, d = tp_info(target), tp_info(draft)
    if t is None and d is None:
        return
    if t is None or d is None:
        sharded, plain = ("target", "draft") if d is None else ("draft", "target")
        raise ValueError(f"the {sharded} model is sharded (tensor parallel) but the {plain} is not; shard both "
                         "over the same ranks with csd_compile.parallel.shard_model (the draft's KV heads must "
                         "split over as many ranks)")
    if (t.rank, t.world) != (d.rank, d.world):
        raise ValueError(f"draft sharded as rank {d.rank}/{d.world}, target as rank {t.rank}/{t.world}: "
                         "shard both over the same group")
