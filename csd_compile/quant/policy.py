"""FlexQuant online policy: the entropy of the last output picks the next token's per-layer bit plan.

How a plan is chosen (monotone and explainable):

1. **Lowering order** (offline, from the precision-requirement table). Start with every layer at
   the top rung. A *step* lowers one layer by one rung; its price is the KL it adds per weight-bit
   saved, ``(kl[i][r-1] - kl[i][r]) / (numel_i * (ladder[r] - ladder[r-1]))``. Steps are taken
   greedily, cheapest first (a layer's next step becomes available once its previous one is
   taken). The result is one fixed sequence of steps: the least sensitive layers go down first.
2. **Budget -> plan**. The plan for a budget ``B`` applies that sequence until the
   parameter-weighted average bit-width is <= ``B``. A smaller budget only applies more steps, so
   every layer's bits are non-increasing as the budget falls (monotone).
3. **Entropy -> plan**. With a version-2 table (``kl_by_entropy``: each layer's KL measured
   separately on the calibration positions of each of ``NB`` equally likely entropy buckets),
   every bucket gets its own lowering order, priced with that bucket's KL, and all buckets lower
   at one common **price threshold** ``mu``: bucket ``b`` takes the steps of its order while their
   price (running maximum) is <= ``mu``; ``mu`` is the smallest threshold whose plans average
   <= ``avg_bits`` over the buckets. This spends bits where they buy the most KL: tokens whose
   distribution a lowered layer barely moves (typically confident ones) get lower plans,
   uncertain ones higher. Equal KL in every bucket gives one plan for all: the static
   sensitivity plan is the special case of no entropy signal. A smaller budget raises ``mu``: every
   bucket's bits are non-increasing as the budget falls (monotone).
   With a version-1 table (one KL per layer and rung), or with an explicit ``spread``: the
   calibration entropies are split into ``num_buckets`` equally likely buckets and bucket ``b``
   (low entropy = confident) gets budget ``avg_bits + shift + spread * (2b / (NB - 1) - 1)``
   clipped to the ladder, with ``shift`` chosen so the plans average ``avg_bits`` over the buckets.

Online, :class:`DynamicPrecisionPolicy` holds the ``[NB, L]`` plan table and the ``NB - 1`` bucket
edges on the device: entropy -> ``bucketize`` -> row of the table -> copied into the bits
tensors of the quantized linears. No host sync, no data-dependent Python, so a compiled step
neither syncs nor recompiles.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .table import PrecisionTable, TableError

__all__ = [
    "DynamicPrecisionPolicy",
    "bucket_plans",
    "check_avg_bits",
    "enable_dynamic_precision",
    "lowering_order",
    "next_token_entropy",
    "plan_for_budget",
    "static_plan",
    "weighted_average",
]

def check_avg_bits(avg_bits: float, ladder: Sequence[int]) -> float:
    """Return ``avg_bits`` as a float if it lies within ``[min(ladder), max(ladder)]``."""
    lo, hi = min(ladder), max(ladder)
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not lo <= avg_bits <= hi:
        raise ValueError(f"avg_bits={avg_bits!r} is outside the ladder {list(ladder)}: use a number in [{lo}, {hi}]")
    return float(avg_bits)


def next_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats, fp32) of the last position's next-token distribution: [..., T, V] or [B, V] -> [B]."""
    last = logits[:, -1] if logits.dim() == 3 else logits  # [B, V]
    logp = F.log_softmax(last.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def lowering_order(table: PrecisionTable) -> list[tuple[int, int]]:
    """The greedy sequence of ``(layer, rung index after the step)`` steps; see the module doc."""
    return [(i, r) for _, i, r in _priced_order(table.kl, table.numels, table.ladder)]


def _priced_order(kl: Sequence[Sequence[float]], numels: Sequence[int],
                  ladder: Sequence[int]) -> list[tuple[float, int, int]]:
    """``(price, layer, rung index after the step)`` in lowering order (cheapest step first)."""
    top = len(ladder) - 1
    # KL at the top rung counts as 0 loss relative to where every layer starts.
    def price(i: int, r: int) -> float:
        added = max(kl[i][r - 1] - kl[i][r], 0.0)
        return added / (numels[i] * (ladder[r] - ladder[r - 1]))

    heap = [(price(i, top), i, top) for i in range(len(kl))] if top > 0 else []
    heapq.heapify(heap)
    steps = []
    while heap:
        p, i, r = heapq.heappop(heap)
        steps.append((p, i, r - 1))
        if r - 1 > 0:
            heapq.heappush(heap, (price(i, r - 1), i, r - 1))
    return steps


def _step_averages(table: PrecisionTable, steps: list[tuple[int, int]]) -> list[float]:
    """Parameter-weighted average bits after 0, 1, ..., len(steps) steps."""
    total = sum(table.numels)
    ladder = table.ladder
    cur = sum(n * ladder[-1] for n in table.numels)
    rung = [len(ladder) - 1] * len(table.numels)
    out = [cur / total]
    for i, r in steps:
        cur -= table.numels[i] * (ladder[rung[i]] - ladder[r])
        rung[i] = r
        out.append(cur / total)
    return out


def plan_for_budget(table: PrecisionTable, avg_bits: float, steps: list[tuple[int, int]] | None = None) -> list[int]:
    """Per-layer bits (table order) for a budget: the lowering order applied until the weighted
    average is <= ``avg_bits``."""
    check_avg_bits(avg_bits, table.ladder)
    steps = lowering_order(table) if steps is None else steps
    averages = _step_averages(table, steps)
    n = next(k for k, a in enumerate(averages) if a <= avg_bits + 1e-9)
    rung = [len(table.ladder) - 1] * len(table.names)
    for i, r in steps[:n]:
        rung[i] = r
    return [table.ladder[r] for r in rung]


static_plan = plan_for_budget


def weighted_average(table: PrecisionTable, plan: Sequence[int]) -> float:
    """Parameter-weighted average bits of ``plan``."""
    return sum(n * b for n, b in zip(table.numels, plan)) / sum(table.numels)


def _bucket_edges(quantiles: Sequence[float], num_buckets: int) -> list[float]:
    q = torch.tensor(quantiles, dtype=torch.float64)
    pos = torch.linspace(0, 1, len(q), dtype=torch.float64)
    targets = torch.arange(1, num_buckets, dtype=torch.float64) / num_buckets
    idx = torch.searchsorted(pos, targets).clamp(1, len(q) - 1)
    w = (targets - pos[idx - 1]) / (pos[idx] - pos[idx - 1])
    return (q[idx - 1] + w * (q[idx] - q[idx - 1])).tolist()


DEFAULT_NUM_BUCKETS = 8
DEFAULT_SPREAD = 1.5


def bucket_plans(table: PrecisionTable, avg_bits: float, num_buckets: int | None = None,
                 spread: float | None = None) -> tuple[list[list[int]], list[float]]:
    """``(plans [NB][L], bucket edges [NB-1])`` for the dynamic policy; see the module doc.

    A version-2 table and no ``spread``: the priced per-entropy plans on the table's own buckets
    (``num_buckets`` must then be ``None`` or that count). Otherwise the ``spread`` rule (defaults:
    8 buckets, spread 1.5 bits).
    """
    check_avg_bits(avg_bits, table.ladder)
    if num_buckets is not None and (isinstance(num_buckets, bool) or not isinstance(num_buckets, int)
                                    or num_buckets < 1):
        raise ValueError(f"num_buckets={num_buckets!r} must be a positive int")
    if spread is not None and (isinstance(spread, bool) or not isinstance(spread, (int, float)) or not spread >= 0):
        raise ValueError(f"spread={spread!r} must be a number >= 0 (bits)")
    if spread is None and table.kl_by_entropy is not None:
        nb = table.num_entropy_buckets
        if num_buckets is not None and num_buckets != nb:
            raise ValueError(f"num_buckets={num_buckets} differs from the table's {nb} entropy buckets: leave it "
                             "unset, pass a spread to use the spread rule, or calibrate with that many buckets")
        return _priced_plans(table, avg_bits), list(table.entropy_edges)
    num_buckets = DEFAULT_NUM_BUCKETS if num_buckets is None else num_buckets
    spread = DEFAULT_SPREAD if spread is None else float(spread)
    lo, hi = table.ladder[0], table.ladder[-1]
    steps = lowering_order(table)
    averages = _step_averages(table, steps)
    offsets = [spread * (2 * b / (num_buckets - 1) - 1) if num_buckets > 1 else 0.0 for b in range(num_buckets)]

    def achieved(shift: float) -> float:
        vals = []
        for off in offsets:
            budget = min(max(avg_bits + shift + off, lo), hi)
            vals.append(next(a for a in averages if a <= budget + 1e-9))
        return sum(vals) / len(vals)

    a, b = -(hi - lo) - spread, (hi - lo) + spread  # achieved() is non-decreasing in shift
    for _ in range(50):
        mid = (a + b) / 2
        a, b = (mid, b) if achieved(mid) <= avg_bits + 1e-9 else (a, mid)
    budgets = [min(max(avg_bits + a + off, lo), hi) for off in offsets]
    plans = [plan_for_budget(table, bud, steps) for bud in budgets]
    return plans, _bucket_edges(table.entropy_quantiles, num_buckets)


def _priced_plans(table: PrecisionTable, avg_bits: float) -> list[list[int]]:
    """Per-entropy-bucket plans at one common price threshold (module doc, point 3)."""
    ladder, top = table.ladder, len(table.ladder) - 1
    orders = []  # per bucket: running-max prices and the parameter-weighted average after each step
    for b in range(table.num_entropy_buckets):
        kl_b = [[cells[b] for cells in row] for row in table.kl_by_entropy]
        order = _priced_order(kl_b, table.numels, ladder)
        prices, run = [], 0.0
        for p, _, _ in order:
            run = max(run, p)
            prices.append(run)
        steps = [(i, r) for _, i, r in order]
        orders.append((prices, steps, _step_averages(table, steps)))

    def taken(mu: float) -> list[int]:
        return [next((k for k, p in enumerate(prices) if p > mu), len(prices)) for prices, _, _ in orders]

    def mean_bits(mu: float) -> float:
        return sum(avgs[n] for (_, _, avgs), n in zip(orders, taken(mu))) / len(orders)

    # the smallest threshold meeting the budget: mean_bits is non-increasing in mu, so bisect the candidates
    cands = sorted({0.0, *(p for prices, _, _ in orders for p in prices)})
    lo, hi = 0, len(cands) - 1  # at cands[-1] every step is taken: the lowest rung, <= any valid budget
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if mean_bits(cands[mid]) <= avg_bits + 1e-9 else (mid + 1, hi)
    plans = []
    for (_, steps, _), n in zip(orders, taken(cands[lo])):
        rung = [top] * len(table.names)
        for i, r in steps[:n]:
            rung[i] = r
        plans.append([ladder[r] for r in rung])
    return plans


class DynamicPrecisionPolicy(nn.Module):
    """Entropy-driven per-token bit plans, all on the device.

    Buffers: ``plans`` int32 [NB, L] (row b = plan of entropy bucket b, low entropy first),
    ``edges`` float32 [NB-1] (bucket boundaries, nats), ``plan`` int32 [L] (the current plan),
    ``entropy`` float32 0-d (the last entropy seen). Calling the policy on logits updates ``plan``
    and the attached bits tensors in place and returns ``plan``.
    """

    def __init__(self, plans: torch.Tensor, edges: torch.Tensor, names: Sequence[str] = ()) -> None:
        super().__init__()
        if plans.dim() != 2 or edges.dim() != 1 or edges.numel() != plans.shape[0] - 1:
            raise ValueError(f"plans must be [NB, L] and edges [NB-1], got {tuple(plans.shape)} and {tuple(edges.shape)}")
        self.names = tuple(names)
        self.register_buffer("plans", plans.to(torch.int32))
        self.register_buffer("edges", edges.to(torch.float32))
        self.register_buffer("plan", self.plans[plans.shape[0] // 2].clone())
        self.register_buffer("entropy", torch.zeros((), dtype=torch.float32, device=plans.device))
        self._targets: list[torch.Tensor] = []
        self._handle = None

    @classmethod
    def from_table(cls, table: PrecisionTable, avg_bits: float, *, num_buckets: int | None = None,
                   spread: float | None = None, device: torch.device | str | None = None) -> "DynamicPrecisionPolicy":
        """Build the bucket plans of ``table`` for the budget ``avg_bits`` (see the module doc)."""
        plans, edges = bucket_plans(table, avg_bits, num_buckets, spread)
        return cls(torch.tensor(plans, dtype=torch.int32, device=device),
                   torch.tensor(edges, dtype=torch.float32, device=device), table.names)

    def attach(self, model: nn.Module) -> "DynamicPrecisionPolicy":
        """Drive the quantized linears of ``model`` (their names must match the table's)."""
        from .linear import quantized_linears

        found = quantized_linears(model)
        names = tuple(n for n, _ in found)
        if self.names and names != self.names:
            missing = sorted(set(self.names) ^ set(names))[:4]
            raise TableError(f"the model's quantized linears do not match the table's layers (e.g. {missing}); "
                             "quantize with the table's group size and calibrate this model")
        if len(found) != self.plans.shape[1]:
            raise ValueError(f"model has {len(found)} quantized linears, the plans have {self.plans.shape[1]}")
        return self.drive([t for _, t in found])

    def drive(self, targets: Sequence[torch.Tensor]) -> "DynamicPrecisionPolicy":
        """Write every plan into ``targets`` (0-d bits tensors, one per layer, plan order), starting now."""
        if len(targets) != self.plans.shape[1]:
            raise ValueError(f"{len(targets)} bits tensors for plans of {self.plans.shape[1]} layers")
        self._targets = list(targets)
        device = self._targets[0].device
        self.plans, self.edges = self.plans.to(device), self.edges.to(device)
        self.plan, self.entropy = self.plan.to(device), self.entropy.to(device)
        torch._foreach_copy_(self._targets, list(self.plan.unbind()))
        return self

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Entropy of the last position (max over the batch: one plan serves the batch) -> plan."""
        h = next_token_entropy(logits.detach()).amax()
        self.entropy.copy_(h)
        bucket = torch.bucketize(h.reshape(1), self.edges)  # [1], a tensor index: no host sync
        self.plan.copy_(self.plans.index_select(0, bucket)[0])
        if self._targets:
            torch._foreach_copy_(self._targets, list(self.plan.unbind()))
        return self.plan

    def remove(self) -> None:
        """Uninstall the output hook installed by :func:`enable_dynamic_precision`."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def enable_dynamic_precision(model: nn.Module, table: PrecisionTable | str | os.PathLike, avg_bits: float, *,
                             num_buckets: int | None = None, spread: float | None = None) -> DynamicPrecisionPolicy:
    """Quantize ``model`` in place and let each forward's output entropy set the next bit plan.

    For users who do not compile (it also works under ``torch.compile``: the hook is traced).
    ``table`` is a :class:`PrecisionTable` or its path (``csd-compile calibrate``); it must have
    been made for this model. Quantizes every layer of the table with ``quantize_`` (unless the
    model already is), then installs a forward hook on the LM head that runs the policy on the
    logits. Returns the policy (``policy.plan`` is the current plan; ``policy.remove()`` undoes
    the hook).
    """
    from .linear import QLinear, lm_head_of, quantize_

    if isinstance(table, (str, os.PathLike)):
        table = PrecisionTable.load(table)
    if not isinstance(table, PrecisionTable):
        raise TypeError(f"table must be a PrecisionTable or a path, got {type(table).__name__}")
    check_avg_bits(avg_bits, table.ladder)
    head = lm_head_of(model)
    if head is None:
        raise ValueError("enable_dynamic_precision: found no LM head (output embeddings) to read the logits from")
    table.check_model(model)
    policy = DynamicPrecisionPolicy.from_table(table, avg_bits, num_buckets=num_buckets, spread=spread)
    if not any(isinstance(m, QLinear) for m in model.modules()):
        quantize_(model, bits=table.ladder[-1], group_size=table.group_size, quantize_lm_head=False)
    policy.attach(model)

    def hook(_mod, _args, out):
        policy(out)

    policy._handle = head.register_forward_hook(hook)
    return policy
