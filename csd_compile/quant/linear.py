"""``QLinear`` (a linear layer on the nested weight format), ``quantize_`` and ``set_bits``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from ..kernels import native as _native
from ..kernels import qlinear as _qlinear_op  # noqa: F401  (registers torch.ops.csd.qlinear)
from .nested import NestedWeight, check_bits, group_minima, pack_scale_zero, quantize
from .registry import lookup_quantized

__all__ = ["QLinear", "quantize_", "quantized_linears", "set_bits"]


class QLinear(nn.Module):
    """A linear layer whose weight is stored once in the nested format and run at ``bits``.

    ``nested``: a quantized copy made elsewhere (e.g. a GGUF file's own grid, ``quant.gguf``)
    instead of quantizing ``weight`` (still read for its shape and fingerprint). Without it, a
    weight loaded from a GGUF Q4 tensor and quantized at group size 32 takes the file's grid
    (:func:`~csd_compile.quant.gguf.file_grid`: the file's weights exactly, where ``quantize`` would
    estimate that grid from the weight in the model's dtype).

    Buffers: ``qdata`` uint8 [2, N, K/2], ``scale``/``zero`` float32 [N, K/g], ``bits`` int32 0-d
    (change it in place, e.g. with :func:`set_bits`; compiled code never recompiles for it),
    ``fingerprint_minima`` (not saved): :func:`~csd_compile.quant.nested.group_minima` of the
    original weight, which calibration tables use to recognise the model, and ``scale_zero`` (not
    saved): on CPU, ``scale`` and ``zero`` packed for the C++ kernel
    (:func:`~csd_compile.quant.nested.pack_scale_zero`: 8 bytes per group, 4 in float16 where that
    holds the grid, as for a GGUF Q4 file's weights, 2 for a symmetric grid's steps, as a Q8_0
    file's), which reads them faster that way; ``None`` on other devices. It is rebuilt when the
    module moves (``.to``) or loads a state dict; after writing ``scale`` or ``zero`` in place by
    hand, call :meth:`repack`.
    ``bias`` is the original layer's Parameter (shared, not copied). ``in_plan``: whether
    :func:`set_bits` and bit plans drive this layer (``False`` for an LM head ``quantize_`` kept
    at the precision its checkpoint stores; it stays at its own ``bits``).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, bits: int, group_size: int = 64,
                 nested: NestedWeight | None = None):
        super().__init__()
        check_bits(bits)
        if nested is None:  # a GGUF Q4 tensor at group 32: the file's grid itself (quant.gguf.file_grid)
            from .gguf import file_grid

            nested = file_grid(weight, group_size)
        nw = quantize(weight, group_size) if nested is None else nested
        if tuple(nw.qdata.shape) != (2, weight.shape[0], weight.shape[1] // 2):
            raise ValueError(f"nested weight of shape {tuple(nw.qdata.shape)} does not hold a weight {tuple(weight.shape)}")
        group_size = nw.group_size
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.group_size = group_size
        self.register_buffer("qdata", nw.qdata)
        self.register_buffer("scale", nw.scale)
        self.register_buffer("zero", nw.zero)
        self.register_buffer("bits", torch.tensor(bits, dtype=torch.int32, device=weight.device))
        self.register_buffer("fingerprint_minima", group_minima(weight, group_size), persistent=False)
        self.bias = bias
        self.in_plan = True
        self.repack()
        self.register_load_state_dict_post_hook(_repack_after_load)

    def repack(self) -> None:
        """Rebuild ``scale_zero`` from ``scale`` and ``zero`` (CPU float32 ones; else ``None``)."""
        cpu = self.scale.device.type == "cpu" and self.scale.dtype == self.zero.dtype == torch.float32
        with torch.no_grad():
            self.register_buffer("scale_zero", pack_scale_zero(self.scale, self.zero) if cpu else None,
                                 persistent=False)

    def _apply(self, fn, recurse=True):
        self.scale_zero = None  # not moved or converted itself: rebuilt from the converted pair below
        super()._apply(fn, recurse)
        self.repack()
        return self

    def kernel_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(scale, zero)`` arguments the kernels read: the packed tensor twice where the C++ CPU
        kernel runs, else the [N, K/g] pair."""
        if self.scale_zero is not None and _native_cpu():
            return self.scale_zero, self.scale_zero
        return self.scale, self.zero

    def view(self, bits: int, bias: torch.Tensor | None = None) -> "QLinear":
        """A ``QLinear`` on the same quantized weight (buffers shared, nothing copied) with its own
        ``bits`` tensor and ``bias``: one stored copy serves every rung (e.g. the self draft at
        2-4 bits beside an 8-bit target)."""
        check_bits(bits)
        new = QLinear.__new__(QLinear)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.group_size = self.in_features, self.out_features, self.group_size
        for name in ("qdata", "scale", "zero"):
            new.register_buffer(name, getattr(self, name))
        new.register_buffer("scale_zero", self.scale_zero, persistent=False)
        new.register_load_state_dict_post_hook(_repack_after_load)
        with torch.inference_mode(False):  # set_bits may write it later, in or out of inference mode
            new.register_buffer("bits", torch.tensor(bits, dtype=torch.int32, device=self.bits.device))
        new.register_buffer("fingerprint_minima", self.fingerprint_minima, persistent=False)
        new.bias = bias
        new.in_plan = True
        return new

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int, group_size: int = 64) -> "QLinear":
        """Quantize ``linear`` (its weight is read, not modified; its bias is shared)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        with torch.no_grad():
            return cls(linear.weight, linear.bias, bits=bits, group_size=group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On CPU call the CPU kernel directly: one dispatch instead of two (same op underneath), and
        # in a compiled graph the C++ op, not the PyTorch fallback (whose Python body runs per call).
        if self.qdata.device.type == "cpu":
            op = torch.ops.csd.qlinear_cpu_native if _native_cpu() else torch.ops.csd.qlinear_cpu
        else:
            op = torch.ops.csd.qlinear
        y = op(x, self.qdata, *self.kernel_scales(), self.bits)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bits={int(self.bits)}")


def _repack_after_load(module: "QLinear", incompatible_keys) -> None:
    module.repack()


@torch.compiler.assume_constant_result
def _native_cpu() -> bool:
    """Whether the C++ CPU kernel is loaded (built on first call); a constant to the compiler."""
    return _native.load()


def lm_head_of(model: nn.Module) -> nn.Module | None:
    """The output projection of ``model``: HF's ``get_output_embeddings()``, else a linear whose
    out_features equals the input embedding's vocabulary, else ``None``."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        return head
    embeds = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    vocab = {e.num_embeddings for e in embeds}
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features in vocab]
    return heads[-1] if heads else None


def quantize_(model: nn.Module, bits: int | str = 4, group_size: int | None = None,
              quantize_lm_head: bool | None = None) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for a :class:`QLinear` in place (torchao style).

    ``group_size`` defaults to 64. The LM head (see :func:`lm_head_of`): ``quantize_lm_head=True``
    quantizes it like the others, ``False`` keeps it full precision, and ``None`` (the default)
    keeps it as the checkpoint stores it: on its GGUF file's own grid when the nested format holds
    that type exactly (:func:`~csd_compile.quant.gguf.stored_exactly`: SmolLM2's Q8_0 head at 8
    bits, group 32), else full precision. Layers the format cannot hold (odd out_features, in_features not
    divisible by ``group_size``) stay full precision, with one warning naming them.

    ``bits="auto"`` (a model loaded from a GGUF file by ``load_model``): each weight at the rung and
    grid that reproduce its GGUF type (:mod:`csd_compile.quant.gguf`), group 32, the LM head
    included when the file stores it quantized (unless ``quantize_lm_head=False``; a tied
    embedding keeps reading the dense table); one :class:`~csd_compile.quant.gguf.AutoBitsWarning`
    line when a weight was approximated; a ``ValueError`` when no linear came from a GGUF file.
    Returns ``model``.
    """
    if bits == "auto":
        return _quantize_auto(model, group_size, quantize_lm_head)
    check_bits(bits)
    group_size = 64 if group_size is None else group_size
    if isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not supported; choose one of {list(SUPPORTED_GROUP_SIZES)}")
    if quantize_lm_head is not None and not isinstance(quantize_lm_head, bool):
        raise TypeError(f"quantize_lm_head must be a bool or None, got {type(quantize_lm_head).__name__}")
    from ..parallel import AllReduced, RowParallelLinear
    from .gguf import stored_exactly

    head = None if quantize_lm_head else lm_head_of(model)
    stored = stored_exactly(head.weight) if quantize_lm_head is None and type(head) is nn.Linear else None
    skipped = []
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child is head and stored is not None:
                with torch.no_grad():
                    q = QLinear(child.weight, child.bias, bits=stored.bits, nested=stored.nested)
                q.in_plan = False  # the file's precision, not a rung of the plan
                setattr(parent, child_name, q)
                continue
            if type(child) not in (nn.Linear, RowParallelLinear) or child is head:
                continue
            n, k = child.weight.shape
            if n % 2 or k % group_size:
                skipped.append(f"{name + '.' if name else ''}{child_name} {tuple(child.weight.shape)}")
                continue
            q = QLinear.from_linear(child, bits=bits, group_size=group_size)
            # a tensor-parallel row shard (csd_compile.parallel) keeps its all-reduce
            setattr(parent, child_name, AllReduced(q, child.group) if isinstance(child, RowParallelLinear) else q)
    if skipped:
        warnings.warn(f"quantize_: left full precision (shape not divisible by group_size={group_size} "
                      f"or odd out_features): {skipped}", stacklevel=2)
    return model


def _quantize_auto(model: nn.Module, group_size, quantize_lm_head) -> nn.Module:
    from ..config import CSDConfig
    from . import gguf

    cfg = CSDConfig(bits="auto", group_size=group_size, quantize_lm_head=quantize_lm_head)  # validates both
    head = None if cfg.quantize_lm_head else lm_head_of(model)
    todo = [(f"{name + '.' if name else ''}{child_name}", parent, child_name, child)
            for name, parent in list(model.named_modules()) for child_name, child in list(parent.named_children())
            if type(child) is nn.Linear and child is not head]
    choices = [(path, gguf.choose(child.weight)) for path, _, _, child in todo]
    gguf.require_gguf(choices)
    for (path, parent, child_name, child), (_, c) in zip(todo, choices):
        if c.nested is not None:
            with torch.no_grad():
                setattr(parent, child_name, QLinear(child.weight, child.bias, bits=c.bits, nested=c.nested))
    gguf.warn_if_approximated(choices)
    return model


def quantized_linears(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(module name, bits tensor)`` of every quantized linear of ``model``, in module order.

    Covers ``QLinear`` modules and the one quantized copy of each ``nn.Linear`` layer quantized by
    the csd compile pass (``quant.registry``; one entry per group size compiled). This order is the
    order of a per-layer plan given to :func:`set_bits`. An LM head kept at the precision its
    checkpoint stores (``quantize_lm_head=None``) is not one of them: no plan moves it.
    """
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear):
            if mod.in_plan:
                out.append((name, mod.bits))
        elif isinstance(mod, nn.Linear):
            out.extend((name, q.bits) for q in lookup_quantized(mod.weight))
    return out


def set_bits(model: nn.Module, bits_or_plan: int | Sequence[int] | torch.Tensor) -> None:
    """Set the bit-width of the quantized linears of ``model`` in place; never recompiles.

    ``bits_or_plan``: an int (every layer), or a 1-D list/tensor with one entry per quantized
    linear in :func:`quantized_linears` order. Entries must be in ``SUPPORTED_BITS``; a tensor plan
    on the model's device is copied without a host sync (its values are then not checked).
    """
    targets = [b for _, b in quantized_linears(model)]
    if not targets:
        raise ValueError("set_bits: model has no quantized linears (use quantize_ or compile with options={'bits': ...})")
    if isinstance(bits_or_plan, int) and not isinstance(bits_or_plan, bool):
        check_bits(bits_or_plan)
        for t in targets:
            t.fill_(bits_or_plan)
        return
    if isinstance(bits_or_plan, torch.Tensor):
        plan = bits_or_plan
        if plan.is_floating_point() or plan.dtype == torch.bool:
            raise TypeError(f"set_bits: a plan tensor must be integer, got dtype {plan.dtype}")
        if plan.device.type == "cpu" and plan.dim() == 1:
            for v in plan.tolist():
                check_bits(v)
    elif isinstance(bits_or_plan, Sequence) and not isinstance(bits_or_plan, str):
        for v in bits_or_plan:
            check_bits(v)
        plan = torch.tensor(list(bits_or_plan), dtype=torch.int32)
    else:
        raise TypeError(f"set_bits: expected an int in {list(SUPPORTED_BITS)} or a 1-D plan, got {bits_or_plan!r}")
    if plan.dim() != 1 or plan.numel() != len(targets):
        raise ValueError(f"set_bits: plan shape {tuple(plan.shape)} must be [{len(targets)}] (one per quantized linear)")
    plan = plan.to(device=targets[0].device, dtype=targets[0].dtype, non_blocking=True)
    torch._foreach_copy_(targets, list(plan.unbind()))
