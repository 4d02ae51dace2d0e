"""``csd_compile.generate``: the speculative decoding loop, standalone or as HF's ``custom_generate``.

The loop is plain Python around one compiled draft-verify step (see ``step.py``): prefill eagerly,
then call the step until every row has ``max_new_tokens`` tokens or hit EOS, reading the emitted
tokens once per step. Compiled steps and caches live in an :class:`Engine`, kept on the model
(per draft and shape), so a second call with another ``max_new_tokens`` in the same cache bucket reuses them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..stance import LoopSteps, own_code
from .cache import RowCache
from .drafts import ModelDraft, NgramDraft, NoDraft, make_self_draft, vocab_size
from .csd_accept import DEFAULT_LAMBDA, DEFAULT_TAU
from .engine_args import GenerateArgs, parse_args
from .step import build_step, prefill

__all__ = ["Engine", "generate"]

_STORE_ATTR = "_csd_speculative_engines"


class _EngineStore(dict):
    """Engines of one model, kept on the model itself (their lifetime is the model's); a deep copy
    of the model starts with none rather than copying compiled code and caches."""

    def __deepcopy__(self, memo):
        return _EngineStore()


def warn_if_graphs_requested(options, device: torch.device) -> None:
    """One warning when ``options`` ask for CUDA graphs (``mode`` "reduce-overhead" or "max-autotune")
    on a CUDA device: the draft-verify step updates its token, length and cache buffers in place, which
    are not static addresses, so Inductor runs it without a graph. (Plain decoding, ``GreedyDecoder``,
    is captured. On CPU, ``csd_compile.cpu_graph`` replays both steps: the buffers are the engine's
    own, at the same addresses every call.)"""
    from torch._inductor import list_mode_options

    from ..config import MODES

    mode = options.get("mode") if isinstance(options, Mapping) else None
    if device.type == "cuda" and mode in MODES and list_mode_options(mode).get("triton.cudagraphs"):
        warnings.warn(f"csd_compile.generate: mode={mode!r} asks for CUDA graphs, which the draft-verify step "
                      "does not use yet (it updates its buffers in place); it runs without them", stacklevel=3)


class Engine:
    """A compiled draft-verify step with its static caches, for one (model, draft, K, batch, cache length),
    plus a one-token decode step for drafts that propose on the host (n-gram lookup)."""

    def __init__(self, target: nn.Module, draft, args: GenerateArgs, batch_size: int, max_len: int):
        p = next(target.parameters())
        self.target, self.draft, self.max_len = target, draft, max_len
        self.cache = RowCache(target.config, batch_size, max_len, dtype=p.dtype, device=p.device)
        draft.allocate(batch_size, max_len, p.dtype, p.device, self.cache)
        rule, self.memory = args.acceptance.build(p.device)  # memory: the CSD rule's (None otherwise)
        step = build_step(target, self.cache, draft, temperature=args.temperature, top_p=args.top_p,
                          acceptance=rule)
        extra = {"options": args.options} if args.options else {}
        if args.backend is not None:
            warn_if_graphs_requested(args.options, p.device)

        def compiled(fn):
            if args.backend is None:
                return fn
            return torch.compile(own_code(fn), backend=args.backend, fullgraph=True, **extra)

        self.step = compiled(step)
        # a draft that proposes on the host may leave a step with no proposal: plain decoding then
        # (its own graph, compiled by warm_up; no drafts means nothing for a rescue rule to do)
        self.decode_step = None
        if getattr(draft, "host", False):
            nothing = NoDraft(vocab_size(target))
            self.decode_step = compiled(build_step(target, self.cache, nothing, temperature=args.temperature,
                                                   top_p=args.top_p))
        self.device = p.device
        self.batch_size = batch_size
        self._warm = self.decode_step is None
        # the token rows and lengths that the steps write, reused by every generation: the same
        # tensors at every call, so that a CPU graph (mode="reduce-overhead") replays on them
        # rather than recording the step again for each generation
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.int64, device=p.device)
        self.length = torch.zeros(batch_size, dtype=torch.int64, device=p.device)

    def warm_up(self) -> None:
        """Compile both steps of a host-draft engine before generating, so that the second compile
        never lands in the middle of a generation. Each runs once on placeholder state: a row of two
        zero tokens and no proposal, so nothing is accepted or counted, and the cache slots it writes
        are overwritten before anything reads them. (A model draft's single step compiles on its
        first call, inside the first generation's first step.)"""
        if self._warm:
            return
        B, dev = self.batch_size, self.device
        tokens = torch.zeros(B, self.max_len, dtype=torch.int64, device=dev)
        state = (torch.full((B,), 2, dtype=torch.int64, device=dev), torch.ones(B, dtype=torch.int64, device=dev),
                 torch.ones(B, dtype=torch.bool, device=dev), torch.tensor(self.draft.K, dtype=torch.int64, device=dev))
        self.draft.buffer.fill_(-1)
        for step in (self.decode_step, self.step):
            step(tokens, *state)
        self._warm = True


def _make_draft(target: nn.Module, args: GenerateArgs):
    if isinstance(args.draft, str) and args.draft == "ngram":
        return NgramDraft(args.num_draft_tokens, vocab_size(target))
    if isinstance(args.draft, str) and args.draft == "self":
        # the target at low bits reads the target's own keys and values of every verified slot
        return ModelDraft(make_self_draft(target, bits=args.draft_bits), args.num_draft_tokens,
                          temperature=args.temperature, top_p=args.top_p, share_target_kv=True)
    model = getattr(args.draft, "_orig_mod", args.draft)
    return ModelDraft(model, args.num_draft_tokens, temperature=args.temperature, top_p=args.top_p)


def _engine(target: nn.Module, args: GenerateArgs, batch_size: int, max_len: int) -> Engine:
    per_model = target.__dict__.get(_STORE_ATTR)
    if per_model is None:
        per_model = _EngineStore()
        target.__dict__[_STORE_ATTR] = per_model
    draft_key = args.draft if isinstance(args.draft, str) else id(args.draft)
    key = (draft_key, args.draft_bits, args.num_draft_tokens, batch_size, max_len, args.temperature,
           args.top_p, args.backend, repr(args.options), args.acceptance)
    if key not in per_model:
        per_model[key] = Engine(target, _make_draft(target, args), args, batch_size, max_len)
    return per_model[key]


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    *,
    draft: str | nn.Module = "self",
    num_draft_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    streamer=None,
    return_stats: bool = False,
    adaptive: bool = False,
    draft_bits: int = 4,
    max_cache_len: int | None = None,
    compile_backend: str | None = "csd",
    compile_options: dict | None = None,
    acceptance="exact",
    memory=None,
    tau: float = DEFAULT_TAU,
    lam: float = DEFAULT_LAMBDA,
    tokenizer=None,
    generation_config=None,
    logits_processor=None,
    stopping_criteria=None,
    **kwargs,
):
    """Speculative decoding with a draft model, the target at low bits, or n-gram prompt lookup.

    Works standalone, ``generate(model, ids, max_new_tokens=64, draft="ngram")``, and as
    ``model.generate(ids, custom_generate=csd_compile.generate, draft="self", max_new_tokens=64)``
    (then HF prepares the inputs and passes ``generation_config``; its ``max_new_tokens`` and EOS
    are used). ``model`` may be a ``torch.compile``'d module (its original module is used; the step
    is compiled on its own).

    Args:
        model: an HF causal LM (``input_ids``, ``attention_mask``, ``position_ids``, ``cache=`` forward).
        input_ids: ``[B, S]`` int64 prompt ids, left-padded when rows differ (pass ``attention_mask``),
            or a list of equal-length id lists.
        draft: ``"self"`` (the target with ``draft_bits``-bit linears via ``csd_compile.quant.QLinear``),
            ``"ngram"`` (prompt lookup on the host; steps with no proposal run a one-token decode
            graph), or a model sharing the target's vocabulary, dtype and device (another dtype is an
            error naming both; convert a copy: ``copy.deepcopy(draft).to(dtype)``).
        num_draft_tokens: ``K``, drafts per step (1..64); default 4 for model drafts, 3 for n-grams (a verify
            pass over K + 1 positions is paid whenever a proposal exists; 3 measured best on CPU).
        temperature: 0 = greedy (output identical to the target's greedy decoding); > 0 = lossless
            speculative sampling from ``softmax(logits / temperature)`` restricted to ``top_p``.
        top_p: nucleus mass in (0, 1].
        eos_token_id: stop token(s), inside the vocabulary; a row ends right after it. Default: the model's.
        streamer: an HF streamer (``put`` / ``end``), batch 1 only; standalone calls only (HF's
            ``generate`` keeps its streamer for itself).
        return_stats: also return a dict ``mean_accepted``, ``tokens_per_target_forward``, ``steps``,
            ``new_tokens``, ``tok_per_s``, ``seconds`` (prefill included), ``prefill_seconds``.
        adaptive: adapt the drafts used per step within ``K`` (+2 after a full acceptance, -1 after a
            rejection); the compiled graph always has ``K`` slots.
        draft_bits: bit-width of the ``"self"`` draft.
        max_cache_len: the static cache length: every call with the same value (and draft, ``K``, batch
            size) reuses one compiled step. Default: the need rounded up to a multiple of 256, at most
            ``config.max_position_embeddings``, so prompts of other lengths may compile another step.
            A cache larger than the device's memory is refused before it is allocated.
        compile_backend: ``torch.compile`` backend of the step (``None`` runs it eagerly).
        compile_options: ``options=`` of that ``torch.compile``.
        acceptance: ``"exact"`` (lossless, the default) or ``"csd"`` (Calibrated Speculative Decoding:
            a rejected draft is accepted anyway when its (draft, target) pair was rejected more than
            ``lam`` times, counted in a correction memory, and ``p(draft) / p(target's top) >= tau``;
            greedy only, ``temperature > 0`` is an error). Experts may pass a callable rule instead
            (see ``step.build_step``; reuse one object: each new callable is a new engine).
        memory: with ``"csd"``: ``None`` (each engine keeps its own memory, empty at first, that
            learns across calls), a memory file path (checked against ``tokenizer`` when given) or a
            ``CorrectionMemory`` (updated in place). See ``speculative/csd_accept.py``.
        tau: the CSD ratio gate, in (0, 1]; default 0.3 (the paper's is 0.01).
        lam: the CSD count threshold, ``>= 0`` (``float('inf')``: never rescue, exact output); default 6.
        tokenizer: the target's tokenizer, for CSD only: protects special tokens and code fences from
            rescue and checks the memory's tokenizer fingerprint. Without it only the eos/bos/pad ids
            of the model's config are protected and a memory file is not checked. (Through HF's
            ``model.generate``, transformers drops ``tokenizer=`` for a callable ``custom_generate``:
            pass ``custom_generate=functools.partial(csd_compile.generate, tokenizer=tok)``.)
        attention_mask / max_new_tokens: keyword arguments (through ``**kwargs``).

    Returns:
        ``ids [B, S + new]`` (prompt + new tokens, rows that stopped early padded with the pad/EOS id),
        or ``(ids, stats)`` when ``return_stats``.
    """
    target = getattr(model, "_orig_mod", model)
    args = parse_args(
        target, input_ids, draft=draft, num_draft_tokens=num_draft_tokens, temperature=temperature,
        top_p=top_p, eos_token_id=eos_token_id, streamer=streamer, draft_bits=draft_bits,
        max_cache_len=max_cache_len, backend=compile_backend, options=compile_options,
        acceptance=acceptance, generation_config=generation_config, kwargs=kwargs, memory=memory, tau=tau, lam=lam,
        tokenizer=tokenizer,
    )
    B, S = args.input_ids.shape
    eng = _engine(target, args, B, args.cache_len)
    eng.warm_up()
    dev = eng.device

    # internal layout: one extra pad slot on the left so every row has >= 2 slots
    tokens, length = eng.tokens.zero_(), eng.length.fill_(S + 1)
    tokens[:, 1 : S + 1] = args.input_ids.to(dev)
    pad = (1 + (1 - args.attention_mask.to(torch.int64)).sum(dim=1)).to(dev)  # [B]
    active = torch.ones(B, dtype=torch.bool, device=dev)
    K = args.num_draft_tokens
    k = torch.tensor(K, dtype=torch.int64, device=dev)

    if streamer is not None:
        streamer.put(args.input_ids.cpu())
    t0 = time.perf_counter()
    first = prefill(eng.target, eng.cache, eng.draft, tokens[:, : S + 1], pad, temperature=args.temperature,
                    top_p=args.top_p)
    tokens[:, S + 1] = first
    length += 1
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B

    def emit(b: int, emitted: list[int]) -> bool:
        """Append row ``b``'s new tokens up to its end (EOS or max_new_tokens); True if it ended."""
        ended = False
        for j, t in enumerate(emitted):
            new[b].append(t)
            if t in args.eos or len(new[b]) >= args.max_new_tokens:
                ended, emitted = True, emitted[: j + 1]
                break
        if streamer is not None and emitted:
            streamer.put(torch.tensor(emitted))
        return ended

    finished = [b for b, t in enumerate(first.tolist()) if emit(b, [t])]  # (.tolist() waits for the prefill)
    prefill_seconds = time.perf_counter() - t0
    if eng.decode_step is not None:  # host-side proposals: each row's real tokens, kept as lists
        prompts = [row[int(p) - 1:] for row, p in zip(args.input_ids.tolist(), pad.tolist())]
    steps = accepted = row_steps = 0
    calls = LoopSteps(args.backend is not None)  # Dynamo at each step's first call, its graph directly after
    while True:
        for b in finished:
            done[b] = True
        if finished:
            active[finished] = False
        if all(done):
            break
        step = eng.step
        if eng.decode_step is not None:
            proposals = [[] if done[b] else eng.draft.lookup(prompts[b] + new[b]) for b in range(B)]
            if any(proposals):
                eng.draft.buffer.copy_(torch.tensor([r + [-1] * (K - len(r)) for r in proposals]))
            else:
                step = eng.decode_step
        out, n = calls(step, tokens, length, pad, active, k)
        out_l, n_l = out.tolist(), n.tolist()  # the one host read per step
        steps += 1
        finished = []
        for b in range(B):
            if done[b]:
                continue
            row_steps += 1
            accepted += n_l[b]
            if emit(b, out_l[b][: n_l[b] + 1]):
                finished.append(b)
        if adaptive:
            live = [n_l[b] for b in range(B) if not done[b]]
            cur = int(k)
            k.fill_(min(K, cur + 2) if live and max(live) >= cur else max(1, cur - 1))
    seconds = time.perf_counter() - t0
    if streamer is not None:
        streamer.end()

    width = max(len(r) for r in new)
    fill = args.pad_token_id
    rows = [r + [fill] * (width - len(r)) for r in new]
    ids = torch.cat([args.input_ids.to(dev), torch.tensor(rows, dtype=torch.int64, device=dev)], dim=1)
    if not return_stats:
        return ids
    total = sum(len(r) for r in new)
    stats = {
        "mean_accepted": accepted / max(row_steps, 1),
        "tokens_per_target_forward": total / (row_steps + B),  # + each row's prefill forward
        "steps": steps,
        "new_tokens": total,
        "tok_per_s": total / seconds if seconds > 0 else float("inf"),
        "seconds": seconds,
        "prefill_seconds": prefill_seconds,
        "num_draft_tokens": K,
    }
    return ids, stats
