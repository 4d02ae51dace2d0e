"""csd_compile.models.greedy.GreedyDecoder: our own greedy loop decodes HF greedy's tokens."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from csd_compile.models.greedy import GreedyDecoder
from csd_compile.models.hf_generate import compile_config
from tests.conftest import make_tiny_llama


def _prompt(seed, length):
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _hf(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              pad_token_id=0, eos_token_id=None, **kw)


def test_eager_loop_is_hf_greedy():
    model = make_tiny_llama(seed=11)
    dec = GreedyDecoder(model, backend=None)
    for seed, length in ((0, 5), (1, 9), (2, 1)):
        ids = _prompt(seed, length)
        assert dec(ids, max_new_tokens=12, eos_token_id=[]).tolist() == _hf(model, ids, 12).tolist()


def test_compiled_loop_is_hf_compiled_greedy_with_one_graph_per_cache_length():
    """The same backend and options: our loop's tokens are HF's compiled greedy tokens; two prompts
    of other lengths in one cache bucket reuse the step (no new graph)."""
    options = {"bits": 8, "group_size": 32}
    model = make_tiny_llama(seed=12)
    reference = copy.deepcopy(model)
    dec = GreedyDecoder(model, backend="csd", options=options)
    hf_kw = dict(cache_implementation="static", max_cache_len=256, compile_config=compile_config(options))
    ids = _prompt(3, 7)
    assert dec(ids, max_new_tokens=10, eos_token_id=[]).tolist() == _hf(reference, ids, 10, **hf_kw).tolist()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for seed, length in ((4, 3), (5, 11)):
        ids = _prompt(seed, length)
        assert dec(ids, max_new_tokens=10, eos_token_id=[]).tolist() == _hf(reference, ids, 10, **hf_kw).tolist()
    assert counters["stats"]["unique_graphs"] == graphs


def test_reduce_overhead_mode_on_cpu_decodes_the_same_tokens():
    """``mode="reduce-overhead"`` reaches the backend through the options; on CPU the step is replayed
    as a CPU graph (tests/test_cpu_graph.py) and the loop gives the tokens of the same step without it."""
    model = make_tiny_llama(seed=16)
    ids = _prompt(8, 6)
    plain = GreedyDecoder(model, backend="csd", options={"bits": 4})(ids, max_new_tokens=12, eos_token_id=[])
    torch._dynamo.reset()
    dec = GreedyDecoder(model, backend="csd", options={"bits": 4, "mode": "reduce-overhead"})
    for _ in range(2):
        assert dec(ids, max_new_tokens=12, eos_token_id=[]).tolist() == plain.tolist()


def test_warm_up_compiles_the_cache_bucket_of_the_real_call():
    model = make_tiny_llama(seed=15)
    dec = GreedyDecoder(model, backend="csd")
    ids = _prompt(7, 6)
    dec.warm_up(ids, max_new_tokens=200)  # 206 positions: the 256 bucket
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    out = dec(ids, max_new_tokens=200, eos_token_id=[])
    assert out.shape == (1, 206) and counters["stats"]["unique_graphs"] == graphs


def test_guards_are_skipped_only_for_the_later_steps_of_a_call():
    """Steps after a call's first skip Dynamo's guard checks: only the step, never the streamer's code
    (a compiled function it calls keeps its guards), and a model changed between calls is noticed."""
    model = make_tiny_llama(seed=16)
    reference = copy.deepcopy(model)
    dec = GreedyDecoder(model, backend="csd")
    doubled = torch.compile(lambda t: t * 2, backend="eager")
    seen = []

    class Streamer:
        def put(self, tokens):
            # compiled first for float, then called with int64: guards must send it to a new graph
            seen.append(doubled(tokens.float() if not seen else tokens).dtype)

        def end(self):
            pass

    ids = _prompt(8, 5)
    out = dec(ids, max_new_tokens=6, eos_token_id=[], streamer=Streamer())
    assert out.tolist() == _hf(reference, ids, 6).tolist()
    assert seen == [torch.float32] + [torch.int64] * 6
    # between calls: swap the MLP activation of every layer (a guarded attribute, not a tensor input)
    for m in (model, reference):
        for layer in m.model.layers:
            layer.mlp.act_fn = torch.nn.Tanh()
    ids = _prompt(9, 5)
    assert dec(ids, max_new_tokens=6, eos_token_id=[]).tolist() == _hf(reference, ids, 6).tolist()


def test_stops_after_eos_and_streams_prompt_then_tokens():
    model = make_tiny_llama(seed=13)
    dec = GreedyDecoder(model, backend=None)
    ids = _prompt(6, 4)
    full = dec(ids, max_new_tokens=8, eos_token_id=[])
    eos = int(full[0, 4 + 2])  # the third new token
    first = next(i for i, t in enumerate(full[0, 4:].tolist()) if t == eos)
    out = dec(ids, max_new_tokens=8, eos_token_id=eos)
    assert out.tolist() == full[:, : 4 + first + 1].tolist()

    class Streamer:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.reshape(-1).tolist())

        def end(self):
            self.calls.append("end")

    s = Streamer()
    out = dec(ids, max_new_tokens=5, eos_token_id=[], streamer=s)
    assert s.calls == [ids[0].tolist()] + [[t] for t in out[0, 4:].tolist()] + ["end"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=torch.zeros(2, 3, dtype=torch.long), max_new_tokens=2), r"one non-empty sequence \[1, S\], got shape \(2, 3\)"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2), r"got shape \(1, 0\)"),
    (dict(input_ids=torch.zeros(1, 3), max_new_tokens=2), r"int64 tensor \[1, S\], got torch.float32"),
    (dict(input_ids=torch.tensor([[1, 128]]), max_new_tokens=2), r"\[0, 128\).*from 1 to 128"),
    (dict(input_ids=torch.tensor([[-1, 3]]), max_new_tokens=2), r"from -1 to 3"),
    (dict(input_ids=torch.tensor([[1, 2]]), max_new_tokens=0), r"max_new_tokens must be an int >= 1, got 0"),
    (dict(input_ids=torch.tensor([[1, 2]]), max_new_tokens=10**9), r"exceeds the model's context of 256 tokens"),
    (dict(input_ids=torch.tensor([[1, 2]]), max_new_tokens=2, eos_token_id="2"), r"eos_token_id must be an int"),
])
def test_bad_input_is_refused_before_any_work(kwargs, match):
    model = make_tiny_llama(seed=14)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        GreedyDecoder(model, backend=None)(**kwargs)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_bad_construction_is_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        GreedyDecoder("model")
    with pytest.raises(ValueError, match="give a backend"):
        GreedyDecoder(make_tiny_llama(), backend=None, options={"bits": 4})
    with pytest.raises(TypeError, match="mapping"):
        GreedyDecoder(make_tiny_llama(), options=[("bits", 4)])


def test_more_decoders_of_one_model_than_dynamos_recompile_limit():
    """Each decoder compiles its own copy of the step function: on one shared code object the
    decoder past Dynamo's recompile limit failed (fullgraph). The limit is lowered to 2 so that four
    decoders of one model (two backends, two cache lengths) cross it."""
    model = make_tiny_llama(seed=14, max_position_embeddings=1024)
    with torch._dynamo.config.patch(recompile_limit=2):
        for seed, length, backend in ((1, 9, "eager"), (2, 300, "aot_eager"), (3, 5, "aot_eager"), (4, 600, "eager")):
            ids = _prompt(seed, length)
            dec = GreedyDecoder(model, backend=backend)
            assert dec(ids, max_new_tokens=6, eos_token_id=[]).tolist() == _hf(model, ids, 6).tolist()
