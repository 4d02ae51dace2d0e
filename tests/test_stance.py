"""csd_compile.stance.LoopSteps: a compiled step's later calls in a loop go straight to its graph, only
when that is what the step does; everything else keeps going through Dynamo."""

import pytest
import torch

from csd_compile import stance
from csd_compile.models import greedy
from csd_compile.models.greedy import GreedyDecoder
from csd_compile.speculative import generate
from csd_compile.stance import LoopSteps
from tests.conftest import make_tiny_llama


@pytest.fixture
def counted(monkeypatch):
    """How often a direct call ran, and how often a csd graph was entered through Dynamo."""
    seen = {"direct": 0, "dynamo": 0}
    run, call = stance._Direct.run, stance.Recorded.__call__

    def counting_run(self):
        seen["direct"] += 1
        return run(self)

    def counting_call(self, *args):
        seen["dynamo"] += 1
        return call(self, *args)

    monkeypatch.setattr(stance._Direct, "run", counting_run)
    monkeypatch.setattr(stance.Recorded, "__call__", counting_call)
    return seen


def _compiled(fn, backend="csd"):
    return torch.compile(stance.own_code(fn), backend=backend, fullgraph=True)


def test_a_plain_step_goes_straight_to_its_graph_on_inputs_changed_in_place(counted):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, generator=g)
    x = torch.randn(3, 16, generator=g)
    step = _compiled(lambda x, scale: ((x @ w).relu() * scale, x.sum(-1)))
    steps = LoopSteps(True)
    for i in range(6):
        x.copy_(torch.randn(3, 16, generator=g))  # new values, same tensor
        y, s = steps(step, x, 0.5)
        torch.testing.assert_close(y, (x @ w).relu() * 0.5)
        torch.testing.assert_close(s, x.sum(-1))
    assert steps.direct(step)
    assert counted == {"direct": 5, "dynamo": 1}


def test_the_return_structure_is_kept():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, generator=g)
    step = _compiled(lambda x: {"double": x * 2, "pair": (x.exp(), x.abs().max())})
    steps = LoopSteps(True)
    for _ in range(3):
        x.copy_(torch.randn(4, 5, generator=g))
        out = steps(step, x)
        assert set(out) == {"double", "pair"} and isinstance(out["pair"], tuple)
        torch.testing.assert_close(out["double"], x * 2)
        torch.testing.assert_close(out["pair"][0], x.exp())
        torch.testing.assert_close(out["pair"][1], x.abs().max())
    assert steps.direct(step)


class _Box:
    last = None
    flag = False


def test_a_step_that_keeps_its_output_in_python_state_goes_through_dynamo(counted):
    """A graph output written into an attribute changes at every call: Dynamo must replay it."""
    box = _Box()

    def step(x):
        y = x * 2
        box.last = y
        return y

    step = _compiled(step)
    steps = LoopSteps(True)
    x = torch.randn(3)
    for _ in range(4):
        x.copy_(torch.randn(3))
        y = steps(step, x)
        assert box.last is y
        torch.testing.assert_close(y, x * 2)
    assert not steps.direct(step)
    assert counted == {"direct": 0, "dynamo": 4}


def test_a_step_that_writes_the_same_state_at_every_call_goes_direct(counted):
    """Dynamo replays a constant write after every call; written once, the state is already that."""
    box = _Box()

    def step(x):
        box.flag = True
        return x + 1

    step = _compiled(step)
    steps = LoopSteps(True)
    x = torch.randn(3)
    for _ in range(4):
        x.copy_(torch.randn(3))
        torch.testing.assert_close(steps(step, x), x + 1)
        assert box.flag is True
    assert steps.direct(step)
    assert counted == {"direct": 3, "dynamo": 1}


def test_a_step_returning_an_input_or_a_constant_is_not_called_directly(counted):
    x = torch.randn(5)
    step = _compiled(lambda x: (x, x * 3, 7))
    steps = LoopSteps(True)
    for i in range(3):
        x.copy_(torch.randn(5))
        a, b, c = steps(step, x)
        assert a is x and c == 7
        torch.testing.assert_close(b, x * 3)
    assert not steps.direct(step) and counted["direct"] == 0


def test_new_argument_objects_go_through_dynamo_again(counted):
    step = _compiled(lambda x, n: x * n)
    steps = LoopSteps(True)
    x = torch.randn(4)
    for _ in range(3):
        steps(step, x, 2)
    assert counted == {"direct": 2, "dynamo": 1}
    y = torch.randn(6)  # another tensor, another shape
    torch.testing.assert_close(steps(step, y, 2), y * 2)
    torch.testing.assert_close(steps(step, y, 3), y * 3)  # another int
    torch.testing.assert_close(steps(step, y, 3), y * 3)
    assert counted["dynamo"] == 3 and counted["direct"] == 3


def test_graphs_of_other_backends_and_eager_steps_are_not_called_directly():
    x = torch.randn(4)
    for steps, step in ((LoopSteps(True), _compiled(lambda x: x.sin(), backend="eager")),
                        (LoopSteps(False), lambda x: x.sin())):
        for _ in range(3):
            x.copy_(torch.randn(4))
            torch.testing.assert_close(steps(step, x), x.sin())
        assert not steps.direct(step)


def _prompt(seed, length):
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [{"bits": 4}, {"bits": 4, "mode": "reduce-overhead"}])
def test_greedy_decoder_calls_its_graph_directly_and_decodes_its_own_tokens(options, counted):
    model = make_tiny_llama(seed=21)
    ids = _prompt(2, 7)
    dec = GreedyDecoder(model, backend="csd", options=options)
    with greedy.native_loop(False):  # (with CPU graphs the loop goes on in C++: tests/test_bound_replay.py)
        out = dec(ids, max_new_tokens=12, eos_token_id=[])
    # the first token comes from the prefill, the second from the step through Dynamo, ten direct
    assert counted == {"direct": 10, "dynamo": 1}
    with pytest.MonkeyPatch.context() as mp:  # the same decoder with every step through Dynamo
        mp.setattr(stance._Direct, "of", classmethod(lambda cls, *a: None))
        assert dec(ids, max_new_tokens=12, eos_token_id=[]).tolist() == out.tolist()
    assert counted["direct"] == 10


@pytest.mark.parametrize("draft", ["ngram", "self"])
def test_speculative_steps_are_called_directly_and_match_hf_greedy(draft, counted):
    """The draft-verify step (and the n-gram draft's one-token step) return their graph's outputs
    as they come: after each one's first call in a generation, the rest go straight to the graph."""
    target = make_tiny_llama(0)
    ids = torch.tensor([[5, 9, 17, 5, 9, 17, 40, 5, 9, 17, 41, 5, 9]])
    ref = target.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    out, stats = generate(target, ids, draft=draft, num_draft_tokens=3, max_new_tokens=30, eos_token_id=[],
                          compile_backend="csd", return_stats=True)
    assert torch.equal(out, ref)
    # the warm-up runs each compiled step once; in the generation, one first call per step kind
    first_calls = counted["dynamo"] - (2 if draft == "ngram" else 0)
    assert first_calls in (1, 2) and counted["direct"] == stats["steps"] - first_calls
