"""CPU graphs (``mode="reduce-overhead"`` on CPU, ``csd_compile/cpu_graph.py``): a compiled step is
recorded once and replayed from C++. A replay must compute what Inductor's own wrapper computes, on
the inputs of each call: new small inputs copied in, inputs read in place checked, a moved one
recorded again, outputs that a later call does not overwrite, and graphs it cannot replay run as
before with one warning."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from torch._dynamo.utils import counters
from hypothesis import strategies as st

from csd_compile import cpu_graph
from csd_compile.kernels import native
from csd_compile.models.greedy import GreedyDecoder
from csd_compile.quant import nested
from csd_compile.quant.nested import quantize
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module", autouse=True)
def _built():
    assert native.load(), "the C++ CPU kernels should build on this machine"


def _steps_of(fn):
    """The CPU graph steps created while ``fn`` compiled and ran."""
    before = set(map(id, cpu_graph.live_steps()))
    fn()
    return [s for s in cpu_graph.live_steps() if id(s) not in before]


def _compiled(fn):
    return torch.compile(fn, backend="csd", mode="reduce-overhead", fullgraph=True)


def _prompt(seed, length, vocab=128):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [{"bits": 4}, {"bits": 8, "group_linears": False}, {}],
                         ids=["bits4", "bits8-ungrouped", "unquantized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_replayed_decode_step_gives_the_tokens_of_the_plain_one(options, dtype):
    model = make_tiny_llama(seed=21, dtype=dtype)
    prompts = [_prompt(s, n) for s, n in ((1, 5), (2, 9), (3, 3))]
    plain = GreedyDecoder(model, backend="csd", options=options or None)
    expected = [plain(ids, max_new_tokens=14, eos_token_id=[]) for ids in prompts]
    torch._dynamo.reset()
    dec = GreedyDecoder(model, backend="csd", options={**options, "mode": "reduce-overhead"})
    got = []
    steps = _steps_of(lambda: got.extend(dec(ids, max_new_tokens=14, eos_token_id=[]) for ids in prompts))
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    assert len(steps) == 1 and steps[0].given_up is None
    # one recording (the cache is reused, the token and its position are copied in), then replays
    assert steps[0].recordings == 1 and steps[0].replays == 3 * 13 - 1


@pytest.mark.parametrize("prefetch", [True, False], ids=["metadata-prefetch", "no-prefetch"])
@pytest.mark.parametrize("options", [{"bits": 4}, {"bits": 8}], ids=["bits4", "bits8"])
def test_replayed_logits_equal_the_plain_steps_bit_for_bit(options, prefetch):
    """Teacher-forced over random tokens on a static cache: every position's logits from the replay
    are the plain step's, bit for bit (the same kernels on the same values), with the replay's
    metadata prefetches (a hint: no value may change) and without."""
    from transformers import StaticCache

    model = make_tiny_llama(seed=24)
    ids = _prompt(9, 12)
    runs = {}
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        step = torch.compile(lambda **kw: model(**kw).logits[:, -1], backend="csd", fullgraph=True,
                             options={**options, **({"mode": mode} if mode else {})})
        cache = StaticCache(config=model.config, max_cache_len=16)

        def run():
            with torch.inference_mode(), cpu_graph.metadata_prefetch(prefetch):
                runs[mode] = [step(input_ids=ids[:, i:i + 1], position_ids=torch.tensor([[i]]), cache=cache,
                                   use_cache=True) for i in range(ids.shape[1])]

        steps = _steps_of(run)
    # (the first call, on an empty cache, may be a graph of its own)
    assert all(s.given_up is None and s.recordings == 1 for s in steps)
    assert sum(s.replays for s in steps) == ids.shape[1] - len(steps) and max(s.replays for s in steps) >= 10
    assert all(a.abs().max() > 0 and torch.equal(a, b) for a, b in zip(runs[None], runs["reduce-overhead"]))
    assert len({tuple(r.argmax(-1).tolist()) for r in runs[None]}) > 1  # the positions differ


def test_metadata_prefetch_switch_restores_the_previous_setting():
    with cpu_graph.metadata_prefetch(False):
        with cpu_graph.metadata_prefetch(True):
            assert native.CpuGraph.set_prefetch(True) is True  # on inside (returns the previous)
        assert native.CpuGraph.set_prefetch(False) is False  # back off
    assert native.CpuGraph.set_prefetch(True) is True  # the default, restored


@pytest.mark.parametrize("caches", ["off", "warm"])
def test_a_graph_compiled_afresh_or_read_from_the_caches_is_replayed(caches):
    """Inductor compiles the graph, or AOT Autograd's cache returns it without compiling: either way
    the graph object behind the compiled function is found and replayed."""
    def fn(x):
        return torch.tanh(x * 1.5) - x

    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(3, 11, generator=g) for _ in range(3)]
    if caches == "warm":  # a first compile fills the caches, the second reads them
        _compiled(fn)(xs[0])
        torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(force_disable_caches=caches == "off"):
        f = _compiled(fn)
        outs = []
        steps = _steps_of(lambda: outs.extend(f(x) for x in xs))
    assert counters["aot_autograd"]["autograd_cache_hit"] == (caches == "warm")
    for o, x in zip(outs, xs):
        torch.testing.assert_close(o, fn(x))
    assert len(steps) == 1 and steps[0].recordings == 1 and steps[0].replays == 2


def test_new_small_inputs_are_copied_in_and_outputs_survive_later_calls():
    f = _compiled(lambda x, y: ((x * 3 + y).sin() * 2, x.sum()))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, 5, generator=g) for _ in range(4)]
    ys = [torch.randn(7, 5, generator=g) for _ in range(4)]
    kept = []
    steps = _steps_of(lambda: kept.extend(f(x, y) for x, y in zip(xs, ys)))
    for (a, s), x, y in zip(kept, xs, ys):  # every call's outputs, read after all the calls
        torch.testing.assert_close(a, (x * 3 + y).sin() * 2)
        torch.testing.assert_close(s, x.sum())
    assert len(steps) == 1 and steps[0].recordings == 1 and steps[0].replays == 3


def test_an_input_read_in_place_is_rerecorded_when_it_moves_and_written_where_it_is():
    def step(cache, x):
        cache.add_(x)  # the graph writes this input: it is read in place, never copied
        return cache.sum(0)

    f = _compiled(step)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    a0, b0 = a.clone(), b.clone()
    xs = [torch.randn(64, 16, generator=g) for _ in range(3)]
    outs = []

    def run():
        outs.append(f(a, xs[0]))
        outs.append(f(a, xs[1]))
        outs.append(f(b, xs[2]))  # another cache: recorded again, `a` untouched
        outs.append(f(a, xs[0]))

    steps = _steps_of(run)
    torch.testing.assert_close(a, a0 + xs[0] + xs[1] + xs[0])
    torch.testing.assert_close(b, b0 + xs[2])
    torch.testing.assert_close(outs[1], (a0 + xs[0] + xs[1]).sum(0))
    torch.testing.assert_close(outs[2], (b0 + xs[2]).sum(0))
    assert len(steps) == 1 and steps[0].recordings == 3 and steps[0].replays == 1


def test_inputs_that_keep_moving_end_the_recordings_with_one_warning():
    f = _compiled(lambda big: big * 2)
    g = torch.Generator().manual_seed(2)
    bigs = [torch.randn(cpu_graph.SMALL_INPUT_BYTES // 4 + 1, generator=g) for _ in range(cpu_graph.MAX_RECORDINGS + 3)]
    with pytest.warns(cpu_graph.CpuGraphWarning, match="its inputs moved between calls") as caught:
        outs = [f(t) for t in bigs]
    assert len([w for w in caught if issubclass(w.category, cpu_graph.CpuGraphWarning)]) == 1
    for o, t in zip(outs, bigs):
        torch.testing.assert_close(o, t * 2)


def test_aten_fallbacks_that_return_new_tensors_are_replayed():
    """``torch.ops.aten.sort`` and ``cumprod`` have no Inductor lowering here: the wrapper calls them
    and gets new tensors, which a replay copies into the recorded ones that later kernels read."""
    def fn(x):
        values, indices = torch.sort(x, dim=-1)
        return values * 2 + 1, indices, torch.cumprod(x, dim=-1) + values

    f = _compiled(fn)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 9, generator=g) for _ in range(4)]
    outs = []
    steps = _steps_of(lambda: outs.extend(f(x) for x in xs))
    for got, x in zip(outs, xs):
        for a, b in zip(got, fn(x)):
            torch.testing.assert_close(a, b)
    assert len(steps) == 1 and steps[0].given_up is None and steps[0].recordings == 1 and steps[0].replays == 3


def test_random_ops_draw_new_numbers_at_every_replay():
    """Inductor's random kernels take seeds from ``torch.ops.prims.inductor_seeds`` at every call: a
    replay draws new seeds from the generator, so calls differ and a reseeded generator repeats."""
    f = _compiled(lambda x: (x + torch.rand_like(x), torch.randn(5)))
    x = torch.randn(6, generator=torch.Generator().manual_seed(9))
    steps = _steps_of(lambda: f(x))
    outs = [f(x) for _ in range(3)]
    for u, n in outs:
        assert ((u - x) >= 0).all() and ((u - x) < 1).all() and n.std() > 0
    assert not torch.equal(outs[0][0], outs[1][0]) and not torch.equal(outs[1][1], outs[2][1])
    torch.manual_seed(11)
    first = f(x)
    torch.manual_seed(11)
    again = f(x)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert len(steps) == 1 and steps[0].given_up is None and steps[0].replays == 5


def test_a_wrapper_calling_a_nested_region_runs_as_before_with_one_warning():
    @torch.compiler.nested_compile_region
    def inner(x):
        return torch.tanh(x) * 2

    def fn(x):
        return inner(inner(x) + 1)

    f = _compiled(fn)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 9, generator=g) for _ in range(3)]
    with pytest.warns(cpu_graph.CpuGraphWarning, match="runs without a CPU graph: its wrapper calls") as caught:
        outs = [f(x) for x in xs]
    assert len([w for w in caught if issubclass(w.category, cpu_graph.CpuGraphWarning)]) == 1
    for o, x in zip(outs, xs):
        torch.testing.assert_close(o, fn(x))


def test_symbolic_sizes_are_recorded_once_per_value_and_replayed():
    f = torch.compile(lambda x, y: (x.cos() + 1) * y.sum(), backend="csd", mode="reduce-overhead", dynamic=True)
    g = torch.Generator().manual_seed(4)
    sizes = (5, 8, 5, 11, 8, 5, 11)
    xs = [(torch.randn(n, generator=g), torch.randn(3 * n, generator=g)) for n in sizes]
    outs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", cpu_graph.CpuGraphWarning)
        steps = _steps_of(lambda: outs.extend(f(*x) for x in xs))
    for o, (x, y) in zip(outs, xs):
        torch.testing.assert_close(o, (x.cos() + 1) * y.sum())
    assert len(steps) == 1 and steps[0].given_up is None  # dynamic=True: one graph for every size
    assert steps[0].recordings == 3 and steps[0].replays == len(sizes) - 3


def test_a_recording_per_size_beyond_the_limit_drops_the_least_recently_replayed(monkeypatch):
    monkeypatch.setattr(cpu_graph, "MAX_SIZES", 2)
    f = torch.compile(lambda x: x.sin() * 3, backend="csd", mode="reduce-overhead", dynamic=True)
    g = torch.Generator().manual_seed(6)
    sizes = (4, 6, 4, 9, 4, 6, 6, 4)  # 6 is dropped when 9 comes (4 was replayed later), then recorded again
    xs = [torch.randn(n, generator=g) for n in sizes]
    outs = []
    steps = _steps_of(lambda: outs.extend(f(x) for x in xs))
    for o, x in zip(outs, xs):
        torch.testing.assert_close(o, x.sin() * 3)
    assert len(steps) == 1 and len(steps[0]._recorded) == 2
    assert steps[0].recordings == 4 and steps[0].replays == len(sizes) - 4


def test_a_decoder_whose_prompts_need_a_larger_cache_replays_both_sizes():
    """A longer prompt needs the next cache bucket: Dynamo recompiles the step with a symbolic cache
    length, and that graph is recorded per cache size and replayed, with the plain step's tokens."""
    model = make_tiny_llama(seed=23, max_position_embeddings=1024)
    prompts = [_prompt(s, n) for s, n in ((1, 40), (2, 300), (3, 20), (4, 290), (5, 600))]
    plain = GreedyDecoder(model, backend="csd", options={"bits": 4})
    expected = [plain(ids, max_new_tokens=9, eos_token_id=[]) for ids in prompts]
    torch._dynamo.reset()
    dec = GreedyDecoder(model, backend="csd", options={"bits": 4, "mode": "reduce-overhead"})
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", cpu_graph.CpuGraphWarning)
        steps = _steps_of(lambda: got.extend(dec(ids, max_new_tokens=9, eos_token_id=[]) for ids in prompts))
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    assert all(s.given_up is None for s in steps)
    # a static graph (the first cache) and a symbolic one, recorded once per cache size it serves
    # (Dynamo tries its newest graph first, so the symbolic one may serve the first size too)
    assert len(steps) == 2 and max(s.recordings for s in steps) >= 2
    recordings = sum(s.recordings for s in steps)
    assert recordings in (3, 4) and sum(s.replays for s in steps) == 5 * 8 - recordings


def test_an_extern_gemm_and_a_kernel_of_many_arguments_are_replayed():
    """An unquantized matmul is Inductor's extern GEMM writing into ``out=`` (replayed from Python);
    a pointwise kernel over 60 inputs takes more argument words than the C++ caller has arities for
    (also replayed from Python)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 32, generator=g)
    mm = _compiled(lambda x: (x @ w).relu())
    many = _compiled(lambda *xs: sum(x * (i + 1) for i, x in enumerate(xs)))
    xs = [torch.randn(3, 48, generator=g) for _ in range(3)]
    parts = [[torch.randn(6, generator=g) for _ in range(60)] for _ in range(3)]
    outs = []
    steps = _steps_of(lambda: outs.extend([mm(x) for x in xs] + [many(*p) for p in parts]))
    for o, x in zip(outs[:3], xs):
        torch.testing.assert_close(o, (x @ w).relu())
    for o, p in zip(outs[3:], parts):
        torch.testing.assert_close(o, sum(x * (i + 1) for i, x in enumerate(p)))
    assert len(steps) == 2 and all(s.given_up is None and s.recordings == 1 and s.replays == 2 for s in steps)


@pytest.mark.parametrize("draft", ["self", "ngram"])
def test_speculative_decoding_with_replayed_steps_keeps_its_tokens(draft):
    """The draft-verify step (ATen fallbacks included) and the n-gram path's decode step replay; the
    tokens are those of the same engine without CPU graphs."""
    import csd_compile

    model = make_tiny_llama(seed=23)
    ids = _prompt(8, 7)
    expected = csd_compile.generate(model, ids, draft=draft, max_new_tokens=20, eos_token_id=[],
                                    compile_options={"bits": 8})
    torch._dynamo.reset()
    got = []
    steps = _steps_of(lambda: got.extend(
        csd_compile.generate(model, ids, draft=draft, max_new_tokens=20, eos_token_id=[],
                             compile_options={"bits": 8, "mode": "reduce-overhead"}) for _ in range(2)))
    assert [g.tolist() for g in got] == [expected.tolist()] * 2
    assert sum(s.replays for s in steps) > 0


def test_under_the_profiler_the_wrapper_runs_and_its_kernels_are_seen():
    model = make_tiny_llama(seed=22)
    dec = GreedyDecoder(model, backend="csd", options={"bits": 4, "mode": "reduce-overhead"})
    ids = _prompt(6, 4)
    expected = dec(ids, max_new_tokens=6, eos_token_id=[])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = dec(ids, max_new_tokens=6, eos_token_id=[])
    assert got.tolist() == expected.tolist()
    names = {e.name for e in prof.events()}
    assert "csd::qlinear_cpu_multi_native" in names and "csd::decode_attention_cpu_native" in names


def _weight(n, k, group, seed):
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(n, k, generator=g) * 0.05, group)


@settings(max_examples=25, deadline=None)
@given(ns=st.lists(st.sampled_from([64, 96, 192]), min_size=1, max_size=3), rows=st.sampled_from([1, 3, 17, 70]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), bits=st.sampled_from([2, 4, 8]),
       seed=st.integers(0, 2**16))
def test_a_recorded_quantized_linear_writes_what_the_direct_call_returns(ns, rows, dtype, bits, seed):
    """The graph's quantized-linear step writes the direct call's values into the recorded outputs,
    on the inputs' current values (both the blocked path and, past its rows, the dequantized GEMM)."""
    k, group = 128, 32
    weights = [_weight(n, k, group, seed + i) for i, n in enumerate(ns)]
    b = torch.tensor(bits)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    outs = [torch.full((rows, n), float("nan"), dtype=dtype) for n in ns]
    graph = native.CpuGraph()
    graph.set_num_inputs(1)
    graph.copy_input(0, x)
    graph.add_qlinear(x, [w[0] for w in weights], [w[1] for w in weights], [w[2] for w in weights], [b] * len(ns),
                      outs)
    new_x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 99)).to(dtype)
    assert graph.run([new_x])
    expected = native.direct_qlinear_multi(new_x, [w[0] for w in weights], [w[1] for w in weights],
                                           [w[2] for w in weights], [b] * len(ns))
    for o, e in zip(outs, expected):
        assert e.abs().max() > 0 and torch.equal(o, e)


@settings(max_examples=12, deadline=None)
@given(ns=st.lists(st.sampled_from([64, 96, 192]), min_size=1, max_size=3), rows=st.sampled_from([1, 5, 70]),
       layout=st.sampled_from(["packed", "column-major", "strided"]), seed=st.integers(0, 2**16))
def test_later_replays_of_a_quantized_linear_read_every_value_of_the_moment(ns, rows, layout, seed):
    """Every replay of a quantized-linear call reads the bit-widths, x, the codes and the scales as
    they are at that replay (whatever it keeps between replays), follows the thread count, and
    refuses a bit-width that is not supported."""
    k, group = 128, 32
    g = torch.Generator().manual_seed(seed)
    weights = [list(_weight(n, k, group, seed + i)) for i, n in enumerate(ns)]
    if layout == "packed":
        scales = [nested.pack_scale_zero(w[1], w[2]) for w in weights]
        scale_args, zero_args = scales, scales
    elif layout == "column-major":
        scale_args, zero_args = [w[1] for w in weights], [w[2] for w in weights]
    else:  # every other column of wider tensors: the kernel reads contiguous copies
        wide = [(torch.randn(n, 2 * (k // group), generator=g), torch.randn(n, 2 * (k // group), generator=g))
                for n in ns]
        for (ws, wz), w in zip(wide, weights):
            ws[:, ::2].copy_(w[1])
            wz[:, ::2].copy_(w[2])
        scale_args, zero_args = [ws[:, ::2] for ws, _ in wide], [wz[:, ::2] for _, wz in wide]
    bits = [torch.tensor(4) for _ in ns]
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    outs = [torch.empty(rows, n, dtype=torch.bfloat16) for n in ns]
    graph = native.CpuGraph()
    graph.set_num_inputs(0)
    graph.add_qlinear(x, [w[0] for w in weights], scale_args, zero_args, bits, outs)

    def check():
        assert graph.run([])
        expected = native.direct_qlinear_multi(x, [w[0] for w in weights], scale_args, zero_args, bits)
        for o, e in zip(outs, expected):
            assert e.abs().max() > 0 and torch.equal(o, e)

    check()
    bits[-1].fill_(8)  # another bit-width for one weight
    check()
    x.copy_(torch.randn(rows, k, generator=g))  # new activations, in place
    check()
    fresh = _weight(ns[0], k, group, seed + 77)
    weights[0][0].copy_(fresh[0])  # new codes and scales, in place
    if layout == "packed":
        scale_args[0].copy_(nested.pack_scale_zero(fresh[1], fresh[2]))
    else:
        scale_args[0].copy_(fresh[1])
        zero_args[0].copy_(fresh[2])
    check()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check()
    finally:
        torch.set_num_threads(threads)
    bits[0].fill_(5)
    with pytest.raises(ValueError, match="bits=5 is not supported; choose one of"):
        graph.run([])


def _graph_with_inputs():
    """A graph of two inputs: 0 copied into a buffer, 1 read in place (no calls: the checks alone)."""
    graph = native.CpuGraph()
    graph.set_num_inputs(2)
    buf = torch.zeros(4, 8)
    graph.copy_input(0, buf)
    pinned = torch.randn(16)
    graph.pin_input(1, pinned.data_ptr())
    return graph, buf, pinned


def test_a_graph_refuses_inputs_it_was_not_recorded_for():
    x = torch.randn(4, 8)
    graph, buf, pinned = _graph_with_inputs()
    assert not graph.run([x])  # wrong number of inputs
    assert not graph.run([x, pinned.clone()])  # the pinned input moved
    assert not graph.run([torch.randn(4, 9), pinned])  # another shape than the buffer's
    assert not graph.run([x.double(), pinned])  # another dtype
    assert torch.equal(buf, torch.zeros(4, 8))  # nothing copied by a refused call
    assert graph.run([x.t().contiguous().t(), pinned])  # a strided input is copied by its values
    assert torch.equal(buf, x)


def test_recorded_outputs_of_the_wrong_shape_are_refused():
    nw = _weight(64, 64, 32, 0)
    x = torch.randn(2, 64)
    graph = native.CpuGraph()
    graph.set_num_inputs(0)
    graph.add_qlinear(x, [nw[0]], [nw[1]], [nw[2]], [torch.tensor(4)], [torch.empty(2, 63)])
    with pytest.raises(ValueError, match=r"output 0 must be a contiguous Float CPU tensor of shape \[2, 64\]"):
        graph.run([])
    q, kv = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 16, 8)
    graph = native.CpuGraph()
    graph.set_num_inputs(0)
    graph.add_attention(q, kv, kv, None, 0.3, torch.empty(1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"the output must be a contiguous Float CPU tensor \[1, 4, 1, 8\]"):
        graph.run([])


def test_no_warning_for_a_plain_replayed_graph():
    f = _compiled(lambda x: x.exp() - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cpu_graph.CpuGraphWarning)
        for s in range(3):
            x = torch.randn(5, generator=torch.Generator().manual_seed(s))
            torch.testing.assert_close(f(x), x.exp() - 1)


_WITHOUT_KERNELS = r"""
import warnings, torch
from csd_compile import cpu_graph
from csd_compile.kernels import native
native.disable()
f = torch.compile(lambda x: x.sin() * 2 + 1, backend="csd", mode="reduce-overhead")
g = torch.Generator().manual_seed(0)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        x = torch.randn(7, generator=g)
        torch.testing.assert_close(f(x), x.sin() * 2 + 1)
ours = [str(w.message) for w in caught if issubclass(w.category, cpu_graph.CpuGraphWarning)]
assert len(ours) == 1 and "C++ CPU kernels are not available" in ours[0], ours
assert cpu_graph.live_steps() == []
print("ok")
"""


def test_without_the_cpp_kernels_the_mode_warns_once_and_runs_inductors_wrapper():
    """(In a fresh process: ``native.disable()`` must come before the kernels load.)"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _WITHOUT_KERNELS], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
