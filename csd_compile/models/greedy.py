"""Plain greedy decoding with the decode step compiled once: our own loop instead of HF ``generate``.

Around every step, HF's ``generate`` runs a general loop: input preparation, logits processors,
stopping criteria, model-kwargs updates. At the step times a quantized 135M model reaches on a CPU
(about 10 ms) that loop is a visible share of the step (the profile's "other" bucket). This loop does
only what greedy decoding needs: the prompt through the model once (eager, ``logits_to_keep=1``),
then per token one compiled step (the forward of that token on HF's ``StaticCache`` and the argmax
over the vocabulary, in one graph: an eager argmax of the bf16 logits cost ~0.2 ms a token) and an
EOS check. The tokens are HF greedy's (``tests/models/test_greedy.py``); the bench compares the two
loops on the same compiled step (rows ``csd-q4-g32`` and ``csd-q4-g32-loop``) and ``csd-compile
generate`` uses this one for plain decoding.

Guards: only the first decode step of a call checks all of Dynamo's guards (``csd_compile.stance``:
1.08x decode on the embedded model). The model must therefore not be changed while a call runs
(from a streamer's ``put``, say); between calls it may be.

CUDA graphs (``options={"mode": "reduce-overhead"}``): on a CUDA model every compiled step starts a
new graph replay (``torch.compiler.cudagraph_mark_step_begin``) and each token is copied out of the
graph's output memory, which the next replay overwrites. (HF's static cache marks its tensors as
static addresses, so the step's cache writes do not stop Inductor from capturing it.) On CPU the
same mode replays the step as a CPU graph (``csd_compile.cpu_graph``): the token and its position
are copied into the graph's buffers, the cache is read in place. Once the loop has bound the step's
CPU graph to its inputs (``cpu_graph.BoundReplay``, after the step's first three calls), the call
decodes its remaining tokens in C++ (``BoundReplay.loop``): each replay's token is stored, checked
against the EOS tokens and fed to the next replay, the position advanced, with no Python between
the tokens (about 0.1 ms of Python a token, on objects the step's weights had evicted from the
caches) but a streamer's ``put``, called with each token as it comes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..stance import LoopSteps, own_code

__all__ = ["GreedyDecoder", "native_loop"]

_CACHE_QUANTUM = 256  # cache lengths are rounded up to this: fewer distinct shapes, fewer recompiles
_NATIVE_LOOP = [True]  # decode in C++ once the step is bound (native_loop(False): never, for A/Bs)


@contextlib.contextmanager
def native_loop(on: bool) -> Iterator[None]:
    """``with native_loop(False):`` decoders decode every token through Python, as before the loop in
    C++ (module docstring), then restores the previous setting. For A/B measurements
    (``benchmarks.fixed_cost_ab --lever native_loop``)."""
    before = _NATIVE_LOOP[0]
    _NATIVE_LOOP[0] = bool(on)
    try:
        yield
    finally:
        _NATIVE_LOOP[0] = before


class GreedyDecoder:
    """Greedy decoding of one sequence at a time with ``model``'s decode step compiled by
    ``backend`` (``None``: eager). One decoder compiles once per cache length (lengths are rounded
    up to a multiple of 256) and reuses its cache across calls; make one per model and keep it.

    ``decoder(input_ids [1, S], max_new_tokens=N)`` returns ``[1, S + n]`` (``n <= N``: it stops
    right after an EOS token). ``streamer``: an HF-style streamer (``put`` with the prompt, then each
    new token, then ``end``).
    """

    def __init__(self, model: nn.Module, *, backend: str | None = "csd", options: Mapping[str, Any] | None = None):
        if not isinstance(model, nn.Module) or not callable(getattr(model, "forward", None)):
            raise TypeError(f"model must be an nn.Module causal LM, got {type(model).__name__}")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name or None, got {type(backend).__name__}")
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"options must be a mapping of backend options, got {type(options).__name__}")
        if options and backend is None:
            raise ValueError("options are backend options: give a backend, or no options")
        self.model = model
        self._compiled = backend is not None

        def step(**kwargs) -> torch.Tensor:  # the next token [1, 1]
            return model(**kwargs).logits[:, -1].argmax(-1, keepdim=True)

        self._step = step if backend is None else torch.compile(
            own_code(step), backend=backend, fullgraph=True, options=dict(options) if options else None)
        self._caches: dict[int, Any] = {}

    def _cache(self, length: int):
        from transformers import StaticCache

        size = _CACHE_QUANTUM * math.ceil(length / _CACHE_QUANTUM)
        cache = self._caches.get(size)
        if cache is None:
            cache = self._caches[size] = StaticCache(config=self.model.config, max_cache_len=size)
        else:
            cache.reset()
        return cache

    def warm_up(self, input_ids: torch.Tensor, *, max_new_tokens: int, steps: int = 2) -> None:
        """Compile the step for the cache a call with these arguments uses, decoding only ``steps``
        tokens (the compile happens on the first)."""
        self(input_ids, max_new_tokens=max_new_tokens, eos_token_id=[], _stop_after=steps)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, *, max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                 streamer=None, _stop_after: int | None = None) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError(f"input_ids must be an int64 tensor [1, S], got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}")
        if input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must hold one non-empty sequence [1, S], got shape {tuple(input_ids.shape)}; "
                             "for batches use csd_compile.generate or model.generate")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        from ..speculative.drafts import vocab_size
        from ..speculative.engine_args import eos_set

        vocab = vocab_size(self.model)
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}) (the vocabulary), got ids from {lo} to {hi}")
        total = input_ids.shape[1] + max_new_tokens
        context = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(context, int) and total > context:
            raise ValueError(f"the prompt ({input_ids.shape[1]} tokens) + max_new_tokens {max_new_tokens} exceeds the "
                             f"model's context of {context} tokens")
        eos = eos_set(eos_token_id, self.model, None, vocab)  # as csd_compile.generate resolves it
        device = next(self.model.parameters()).device
        ids = input_ids.to(device)
        cache = self._cache(total)
        if streamer is not None:
            streamer.put(ids.cpu())
        logits = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        new = [token]
        position = torch.tensor([[ids.shape[1]]], device=device)
        # the step's token and position are one tensor each for the whole call, updated in place: its
        # later calls then go straight to the compiled graph (csd_compile/stance.py)
        step_input = token.clone()
        steps = LoopSteps(self._compiled)
        graphs = self._compiled and device.type == "cuda"  # replays of a CUDA graph, if the mode made one
        limit = max_new_tokens if _stop_after is None else min(max_new_tokens, _stop_after)
        produced, streamed = 1, False  # streamed: the streamer already has `token`
        while True:
            if streamer is not None and not streamed:
                streamer.put(token.cpu())
            streamed = False
            if produced >= limit or int(token) in eos:
                break
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            step_input.copy_(token)
            if _NATIVE_LOOP[0]:
                ran = self._native_loop(steps, new, limit - produced, step_input, position, eos, streamer)
                if ran:
                    produced += ran
                    token = new[-1][:, -1:]
                    streamed = True
                    continue
            token = steps(self._step, input_ids=step_input, position_ids=position, cache=cache, use_cache=True,
                          logits_to_keep=1)
            if graphs:
                token = token.clone()
            new.append(token)
            produced += 1
            position += 1
        if streamer is not None:
            streamer.end()
        return torch.cat([ids, *new], dim=1)

    def _native_loop(self, steps: LoopSteps, new: list, remaining: int, step_input: torch.Tensor,
                     position: torch.Tensor, eos: set[int], streamer) -> int:
        """Up to ``remaining`` tokens decoded by the step's CPU graph in a loop of its own, in C++
        (``cpu_graph.BoundReplay.loop``), once ``steps`` has bound it: appended to ``new`` as one
        ``[1, n]`` tensor, each handed to ``streamer`` as it comes, the position advanced. Returns n;
        0 when the step is not bound."""
        bound = steps.bound(self._step)
        if bound is None:
            return 0
        replay, output = bound
        tokens = torch.empty(remaining, dtype=torch.int64)
        each = None if streamer is None else (lambda t: streamer.put(torch.tensor([[t]])))
        ran = replay.loop(tokens, output, step_input, position, sorted(eos), each)
        if ran:
            new.append(tokens[:ran].view(1, ran))
        if ran < remaining and (ran == 0 or int(tokens[ran - 1]) not in eos):
            steps.unbind(self._step)  # a replay could not run: the step's graph is called from now on
        return ran
