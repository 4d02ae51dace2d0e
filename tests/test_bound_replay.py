"""Bound replays (``csd_compile.cpu_graph.BoundReplay``): inside one decoding loop a step's CPU graph
is replayed on the inputs it was bound to, skipping the compiled graph's entry. It must compute what
the plain call computes, check what a call checks, and hand back to the plain call whenever it
cannot run (an input moved, a profiler is on, the recording was replaced)."""

import pytest
import torch

from csd_compile import cpu_graph, stance
from csd_compile.kernels import native
from csd_compile.models import greedy
from csd_compile.models.greedy import GreedyDecoder
from csd_compile.stance import LoopSteps
from tests.conftest import make_tiny_llama
from tests.test_cpu_graph import _graph_with_inputs


@pytest.fixture(scope="module", autouse=True)
def _built():
    assert native.load(), "the C++ CPU kernels should build on this machine"


@pytest.fixture
def bound_calls(monkeypatch):
    """How many bound replays ran ("ran") and how many handed back to the plain call ("declined")."""
    seen = {"ran": 0, "declined": 0}
    call = cpu_graph.BoundReplay.__call__

    def counting(self):
        out = call(self)
        seen["ran" if out is not None else "declined"] += 1
        return out

    monkeypatch.setattr(cpu_graph.BoundReplay, "__call__", counting)
    return seen


def _prompt(seed, length, vocab=128):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [{"bits": 4}, {"bits": 8, "group_linears": False}, {}],
                         ids=["bits4", "bits8-ungrouped", "unquantized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_decoding_loop_replays_bound_and_keeps_its_tokens(options, dtype, bound_calls):
    model = make_tiny_llama(seed=31, dtype=dtype)
    prompts = [_prompt(s, n) for s, n in ((1, 6), (2, 3), (3, 11))]
    dec = GreedyDecoder(model, backend="csd", options={**options, "mode": "reduce-overhead"})
    with cpu_graph.bound_replays(False):
        expected = [dec(ids, max_new_tokens=15, eos_token_id=[]) for ids in prompts]
    assert bound_calls == {"ran": 0, "declined": 0}
    with greedy.native_loop(False):  # every step through Python (the native loop: below)
        got = [dec(ids, max_new_tokens=15, eos_token_id=[]) for ids in prompts]
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    assert len({tuple(g[0, -14:].tolist()) for g in got}) == 3  # the prompts decode differently
    # per call: 14 steps, the first through Dynamo, two direct calls watched, the rest bound
    assert bound_calls == {"ran": 3 * 11, "declined": 0}


def test_without_cpu_graphs_a_loop_calls_its_graph_as_before(bound_calls):
    """No ``mode``: no CPU graph to bind; the direct calls go on as they did."""
    model = make_tiny_llama(seed=32)
    dec = GreedyDecoder(model, backend="csd", options={"bits": 4})
    ids = _prompt(4, 5)
    first = dec(ids, max_new_tokens=10, eos_token_id=[])
    assert dec(ids, max_new_tokens=10, eos_token_id=[]).tolist() == first.tolist()
    assert bound_calls == {"ran": 0, "declined": 0}


def _loop_step():
    """A step with an input read in place (the cache, written), a small one copied in and a weight."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 32, generator=g)

    def step(cache, x, i):
        cache.index_copy_(0, i, (x @ w).tanh()[None])
        return cache.sum(0) * 0.5 + x

    return torch.compile(stance.own_code(step), backend="csd", mode="reduce-overhead", fullgraph=True), w


def test_a_moved_input_hands_back_to_the_plain_call_which_records_again(bound_calls):
    step, w = _loop_step()
    cache = torch.zeros(600, 32)  # 75 KB: read in place, not copied in
    x, i = torch.randn(32), torch.tensor([0])
    steps = LoopSteps(True)
    before = set(map(id, cpu_graph.live_steps()))
    ref = torch.zeros(600, 32)
    g = torch.Generator().manual_seed(6)
    with torch.inference_mode():
        for n in range(9):
            x.copy_(torch.randn(32, generator=g))
            i.fill_(n)
            if n == 6:  # the same tensor object, its data elsewhere: the recorded address is stale
                cache.data = cache.clone()
            out = steps(step, cache, x, i)
            ref[n] = (x @ w).tanh()
            torch.testing.assert_close(out, ref.sum(0) * 0.5 + x)
            torch.testing.assert_close(cache, ref)
    # n = 0 through Dynamo, 1 and 2 watched, 3 to 5 bound; at 6 the bound replay declines and the loop
    # calls the graph from then on, which records the step again for the new address
    assert bound_calls == {"ran": 3, "declined": 1}
    (graph,) = [s for s in cpu_graph.live_steps() if id(s) not in before]
    assert graph.recordings == 2 and graph.replays == 9 - 2  # 9 calls, 2 of them recorded


def test_under_a_profiler_started_inside_the_loop_the_wrapper_runs(bound_calls):
    """A bound replay declines while a profiler is on (the profile keeps the graph's kernel rows);
    the loop goes on through the graph's entry, with the same results."""
    step, w = _loop_step()
    cache, x, i = torch.zeros(600, 32), torch.randn(32), torch.tensor([0])
    steps = LoopSteps(True)
    with torch.inference_mode():
        for n in range(5):
            i.fill_(n)
            steps(step, cache, x, i)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            i.fill_(5)
            out = steps(step, cache, x, i)
    torch.testing.assert_close(out, cache[:6].sum(0) * 0.5 + x)
    torch.testing.assert_close(cache[:6], (x @ w).tanh().expand(6, 32))
    assert bound_calls == {"ran": 2, "declined": 1}
    names = {e.name for e in prof.events()}
    assert "aten::mm" in names and any(n.startswith("## Call CompiledFxGraph") for n in names)  # the wrapper ran


def test_a_binding_checks_what_a_call_checks():
    graph, buf, pinned = _graph_with_inputs()
    x = torch.randn(4, 8)
    assert graph.bind([x]) is None  # wrong number of inputs
    assert graph.bind([x, pinned.clone()]) is None  # the pinned input elsewhere
    assert graph.bind([torch.randn(4, 9), pinned]) is None  # another shape than the buffer's
    assert graph.bind([x.double(), pinned]) is None  # another dtype
    assert graph.bind([x, 3]) is None and graph.bind([[1.0], pinned]) is None  # not tensors
    binding = graph.bind([x, pinned])
    assert binding is not None and torch.equal(buf, torch.zeros(4, 8))  # binding copies nothing
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # each run copies the bound tensor's values of the moment
        x.copy_(torch.randn(4, 8, generator=g))
        assert graph.run_bound(binding)
        assert torch.equal(buf, x)
    other, _, _ = _graph_with_inputs()
    assert not other.run_bound(binding)  # bound to another graph
    seen = buf.clone()
    x.resize_(4, 9)  # the bound tensor no longer fits its buffer
    assert not graph.run_bound(binding) and torch.equal(buf, seen)
    x.resize_(4, 8)
    assert graph.run_bound(binding)
    pinned.data = pinned.clone()  # the same tensor, its data moved
    x.add_(1.0)
    assert not graph.run_bound(binding) and torch.equal(buf, seen)  # nothing copied by a refused run


class _FakeGraph:
    def __init__(self):
        self.bound = []

    def bind(self, inputs):
        self.bound.append(inputs)
        return "bound"


def _direct(outputs_picked=(0,)):
    return stance._Direct(lambda *a: None, (), list(outputs_picked), None)


def test_a_loop_binds_only_when_both_watched_calls_passed_the_same_objects_and_outputs():
    graph = _FakeGraph()
    a, b, c = torch.zeros(1), torch.zeros(2), torch.zeros(3)
    out1, out2 = torch.ones(1), torch.ones(2)

    d = _direct((1, 0))  # the step returns the graph's outputs swapped
    d._watched = d._bind([(graph, (a, b, 7), (out1, out2))], [out1, out2])
    assert d._watched == (graph, (a, b, 7)) and d.bound is None
    d._watched = d._bind([(graph, (a, b, 7), (out2, out1))], [out1, out2])
    assert d._watched is False and d.bound == "bound" and graph.bound == [(a, b, 7)]
    # the step's first output is the entry's second (out2), which the graph returned first
    assert d.bound_picks == [0, 1]

    refusals = [
        [(graph, (a, c, 7), (out1,))],  # another object at an input
        [(graph, (a, b, 8), (out1,))],  # another int
        [(graph, (a, b), (out1,))],  # fewer inputs
        [(_FakeGraph(), (a, b, 7), (out1,))],  # another graph
        [(graph, (a, b, 7), (out1,)), (graph, (a, b, 7), (out1,))],  # two graph calls
        [],  # no CPU graph
        [(graph, (a, b, 7), (torch.ones(1),))],  # the entry returned other tensors than the graph's
        [(graph, (a, b, 7), (out1, out2))],  # the graph returned more than the entry did
    ]
    for graphs in refusals:
        graph.bound.clear()
        d = _direct()
        d._watched = (graph, (a, b, 7))
        d._watched = d._bind(graphs, [out1])
        assert d._watched is False and d.bound is None and graph.bound == [], graphs


# --- greedy decoding in C++ (GreedyDecoder's native loop, CpuGraph.run_bound_loop) ---------------


@pytest.fixture
def native_runs(monkeypatch):
    """The replays each native loop ran."""
    runs = []
    loop = cpu_graph.BoundReplay.loop

    def counting(self, *args):
        ran = loop(self, *args)
        runs.append(ran)
        return ran

    monkeypatch.setattr(cpu_graph.BoundReplay, "loop", counting)
    return runs


@pytest.mark.parametrize("options", [{"bits": 4}, {}], ids=["bits4", "unquantized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_native_loop_decodes_the_tokens_of_the_python_loop(options, dtype, native_runs):
    model = make_tiny_llama(seed=33, dtype=dtype)
    dec = GreedyDecoder(model, backend="csd", options={**options, "mode": "reduce-overhead"})
    prompts = [_prompt(s, n) for s, n in ((5, 4), (6, 10), (7, 1))]
    # 1 to 4 new tokens: the loop never starts (the first steps go through Dynamo and are watched)
    lengths = [1, 2, 3, 4, 5, 17]
    with greedy.native_loop(False):
        expected = {(i, n): dec(ids, max_new_tokens=n, eos_token_id=[]) for i, ids in enumerate(prompts)
                    for n in lengths}
    assert native_runs == []
    for (i, n), want in expected.items():
        assert dec(prompts[i], max_new_tokens=n, eos_token_id=[]).tolist() == want.tolist(), (i, n)
    # per call of n tokens: the prefill's, three steps through Python, the rest in one native loop
    assert native_runs == [n - 4 for _ in prompts for n in lengths if n > 4]
    assert len({tuple(expected[(i, 17)][0, -16:].tolist()) for i in range(3)}) == 3


def test_the_native_loop_stops_right_after_an_eos_token_and_at_stop_after(native_runs):
    model = make_tiny_llama(seed=34)
    dec = GreedyDecoder(model, backend="csd", options={"bits": 4, "mode": "reduce-overhead"})
    ids = _prompt(8, 5)
    full = dec(ids, max_new_tokens=30, eos_token_id=[])
    new = full[0, 5:].tolist()
    assert native_runs == [30 - 4]
    absent = next(t for t in range(128) if t not in new)
    for at in (1, 3, 9, 20, 29):  # the Python steps' part, then the native loop's
        eos = new[at]
        first = new.index(eos)  # (the token may come earlier too)
        native_runs.clear()
        out = dec(ids, max_new_tokens=30, eos_token_id=[absent, eos])
        assert out.tolist() == full[:, : 5 + first + 1].tolist(), at
        assert native_runs == ([first + 1 - 4] if first >= 4 else []), at
    # warm_up's _stop_after ends the call early too
    native_runs.clear()
    assert dec(ids, max_new_tokens=30, eos_token_id=[], _stop_after=12).tolist() == full[:, : 5 + 12].tolist()
    assert native_runs == [12 - 4]


class _Streamer:
    def __init__(self, model=None, move_at=None):
        self.calls = []
        self.model, self.move_at = model, move_at

    def put(self, value):
        self.calls.append(value.reshape(-1).tolist())
        if self.move_at is not None and len(self.calls) == self.move_at:  # a weight's data moved
            p = self.model.model.norm.weight
            p.data = p.data.clone()

    def end(self):
        self.calls.append("end")


def test_a_streamer_gets_each_token_from_the_native_loop(native_runs):
    model = make_tiny_llama(seed=35)
    dec = GreedyDecoder(model, backend="csd", options={"bits": 4, "mode": "reduce-overhead"})
    ids = _prompt(9, 3)
    with greedy.native_loop(False):
        want = dec(ids, max_new_tokens=12, eos_token_id=[])
    s = _Streamer()
    assert dec(ids, max_new_tokens=12, eos_token_id=[], streamer=s).tolist() == want.tolist()
    assert s.calls == [ids[0].tolist()] + [[t] for t in want[0, 3:].tolist()] + ["end"]  # each once, in order
    assert native_runs == [12 - 4]
    eos = want[0, 3 + 9].item()  # stopping at an EOS token inside the native loop: it is streamed, then end
    first = want[0, 3:].tolist().index(eos)
    s = _Streamer()
    assert dec(ids, max_new_tokens=12, eos_token_id=eos, streamer=s).tolist() == want[:, : 3 + first + 1].tolist()
    assert s.calls == [ids[0].tolist()] + [[t] for t in want[0, 3:3 + first + 1].tolist()] + ["end"]


def test_a_streamer_that_moves_a_weight_ends_the_native_loop_and_the_call_goes_on(native_runs):
    """Not allowed (module docstring of csd_compile.models.greedy), but not unsafe: the next replay's
    check sees the weight moved and the call goes on through Python, recording the step again."""
    model = make_tiny_llama(seed=36)
    dec = GreedyDecoder(model, backend="csd", options={"bits": 4, "mode": "reduce-overhead"})
    ids = _prompt(10, 4)
    want = dec(ids, max_new_tokens=14, eos_token_id=[])
    native_runs.clear()
    recorded = sum(st.recordings for st in cpu_graph.live_steps())
    s = _Streamer(model, move_at=8)  # the prompt, then 7 tokens: the native loop's third
    assert dec(ids, max_new_tokens=14, eos_token_id=[], streamer=s).tolist() == want.tolist()
    assert s.calls == [ids[0].tolist()] + [[t] for t in want[0, 4:].tolist()] + ["end"]
    assert native_runs == [3]  # its fourth replay saw the weight moved; the rest through Python
    assert sum(st.recordings for st in cpu_graph.live_steps()) == recorded + 1  # for the weight's new address


def _loop_graph(moves_after=None):
    """A graph of three inputs (the fed token and the position, copied in; a weight read in place)
    whose one call, from Python, writes (token * 3 + position) % 50 to its output; after
    ``moves_after`` calls it moves the weight's data."""
    graph = native.CpuGraph()
    graph.set_num_inputs(3)
    tok_buf, pos_buf = torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64)
    graph.copy_input(0, tok_buf)
    graph.copy_input(1, pos_buf)
    weight = torch.randn(64)
    graph.pin_input(2, weight.data_ptr())
    out = torch.zeros(1, 1, dtype=torch.int64)
    calls = []

    def call():
        calls.append(1)
        out.copy_((tok_buf * 3 + pos_buf) % 50)
        if moves_after is not None and len(calls) == moves_after:
            weight.data = weight.clone()

    graph.add_python(call, (), {})
    return graph, weight, out, calls


def _expected_tokens(token, position, n, stop=()):
    got = []
    for _ in range(n):
        token = (token * 3 + position) % 50
        position += 1
        got.append(token)
        if token in stop:
            break
    return got, position


@pytest.mark.parametrize("n, stop", [(1, []), (7, []), (40, []), (40, "third"), (40, "first")])
def test_the_cpp_loop_feeds_each_token_back_and_counts_positions(n, stop):
    graph, weight, out, calls = _loop_graph()
    feed, count = torch.tensor([[7]]), torch.tensor([[11]])
    binding = graph.bind([feed, count, weight])
    free, _ = _expected_tokens(7, 11, 40)
    stop = {"third": [free[2]], "first": [free[0], 1000]}[stop] if isinstance(stop, str) else stop
    want, end = _expected_tokens(7, 11, n, stop)
    tokens = torch.full((n,), -1, dtype=torch.int64)
    assert graph.run_bound_loop(binding, tokens, out, feed, count, stop) == len(want)
    assert tokens[:len(want)].tolist() == want and len(calls) == len(want)
    assert int(count) == end  # advanced once per replay
    assert int(feed) == (want[-2] if len(want) > 1 else 7)  # each token fed to the next replay only


def test_the_cpp_loop_stops_when_an_input_moves_and_refuses_bad_arguments():
    graph, weight, out, calls = _loop_graph(moves_after=3)
    feed, count = torch.tensor([[2]]), torch.tensor([[0]])
    binding = graph.bind([feed, count, weight])
    tokens = torch.zeros(10, dtype=torch.int64)
    assert graph.run_bound_loop(binding, tokens, out, feed, count, []) == 3  # the 4th replay's check fails
    assert tokens[:3].tolist() == _expected_tokens(2, 0, 3)[0] and int(count) == 3
    graph, weight, out, _ = _loop_graph()
    feed, count = torch.tensor([[2]]), torch.tensor([[0]])
    binding = graph.bind([feed, count, weight])
    with pytest.raises(ValueError, match="feed and count must be inputs copied in from the binding"):
        graph.run_bound_loop(binding, tokens, out, torch.tensor([[2]]), count, [])
    with pytest.raises(ValueError, match="one-element int64 CPU tensors"):
        graph.run_bound_loop(binding, tokens, out.float(), feed, count, [])
    with pytest.raises(ValueError, match="tokens must be a contiguous 1-d int64 CPU tensor"):
        graph.run_bound_loop(binding, tokens.view(2, 5), out, feed, count, [])
    assert int(count) == 0  # nothing ran


def test_an_exception_inside_the_cpp_loop_reaches_the_caller():
    graph, weight, out, calls = _loop_graph()
    feed, count = torch.tensor([[2]]), torch.tensor([[0]])
    binding = graph.bind([feed, count, weight])

    def interrupt():
        if len(calls) == 4:
            raise KeyboardInterrupt

    graph.add_python(interrupt, (), {})
    with pytest.raises(KeyboardInterrupt):
        graph.run_bound_loop(binding, torch.zeros(10, dtype=torch.int64), out, feed, count, [])
    assert len(calls) == 4


def test_the_cpp_loop_hands_each_token_to_a_callback_as_it_comes():
    graph, weight, out, calls = _loop_graph()
    feed, count = torch.tensor([[4]]), torch.tensor([[1]])
    binding = graph.bind([feed, count, weight])
    seen = []
    tokens = torch.zeros(9, dtype=torch.int64)
    assert graph.run_bound_loop(binding, tokens, out, feed, count, [], lambda t: seen.append((t, len(calls)))) == 9
    assert seen == [(t, i + 1) for i, t in enumerate(tokens.tolist())]  # right after each replay
