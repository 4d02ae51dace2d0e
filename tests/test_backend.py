import subprocess
import sys
import warnings

import pytest
import torch

import csd_compile.backend as backend_mod
from csd_compile import CSDFallbackWarning
from tests.conftest import make_tiny_llama


def test_backend_works_without_importing_the_package():
    # a fresh interpreter: the entry point alone must resolve backend="csd"
    code = (
        "import sys, torch\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Linear(4, 4); x = torch.randn(2, 4)\n"
        "y = torch.compile(m, backend='csd')(x)\n"
        "assert 'csd_compile' in sys.modules  # loaded lazily through the entry point\n"
        "torch.testing.assert_close(y, m(x)); print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_tiny_llama_fullgraph_matches_eager():
    model = make_tiny_llama(seed=1)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model, backend="csd", fullgraph=True)
        got = compiled(ids).logits
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_unknown_option_raises_value_error_before_compiling(monkeypatch):
    called = []
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", lambda *a, **k: called.append(1))
    fn = torch.compile(lambda x: x * 2, backend="csd", options={"bitz": 4})
    with pytest.raises(ValueError, match=r"unknown csd option 'bitz'; valid options are \['bits'"):
        fn(torch.randn(3))
    assert not called


def _patches_seen(monkeypatch) -> list[dict]:
    """The config patches the backend hands Inductor, recorded, Inductor then compiling as usual."""
    import torch._inductor.compile_fx as cfx

    seen, real = [], cfx.compile_fx

    def spy(gm, example_inputs, config_patches=None, **kw):
        if config_patches:  # (Inductor calls itself again once they are applied, with none)
            seen.append(dict(config_patches))
        return real(gm, example_inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    return seen


@pytest.mark.parametrize("how", ["torch.compile mode", "option"])
def test_reduce_overhead_asks_inductor_for_cuda_graphs(monkeypatch, how):
    seen = _patches_seen(monkeypatch)
    kw = {"mode": "reduce-overhead"} if how == "torch.compile mode" else {"options": {"mode": "reduce-overhead"}}
    fn = torch.compile(lambda x: x * 2 + 1, backend="csd", **kw)
    x = torch.randn(5)
    torch.testing.assert_close(fn(x), x * 2 + 1)  # on CPU the step runs as usual
    assert len(seen) == 1 and seen[0].get("triton.cudagraphs") is True
    assert "post_grad_custom_post_pass" in seen[0]  # the backend's own settings stay


def test_modes_keep_the_quantized_step_and_its_values(monkeypatch):
    seen = _patches_seen(monkeypatch)
    model = make_tiny_llama(seed=5)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = torch.compile(model, backend="csd", options={"bits": 4})(ids).logits
        torch._dynamo.reset()
        graphs = torch.compile(model, backend="csd", options={"bits": 4, "mode": "max-autotune-no-cudagraphs"})(ids).logits
    assert plain.abs().sum() > 0
    torch.testing.assert_close(graphs, plain, rtol=1e-4, atol=1e-4)
    assert seen[-1].get("max_autotune") is True and not seen[-1].get("triton.cudagraphs")
    assert not seen[0].get("max_autotune") and not seen[0].get("triton.cudagraphs")


def test_a_mode_inductor_does_not_have_is_refused_before_compiling(monkeypatch):
    called = []
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", lambda *a, **k: called.append(1))
    fn = torch.compile(lambda x: x + 1, backend="csd", mode="fastest")
    with pytest.raises(ValueError, match=r"torch.compile mode='fastest' is not supported; choose one of \['default'"):
        fn(torch.randn(3))
    fn = torch.compile(lambda x: x + 1, backend="csd", options={"mode": "reduce_overhead"})
    with pytest.raises(ValueError, match=r"option 'mode'='reduce_overhead' is not supported; choose one of"):
        fn(torch.randn(3))
    fn = torch.compile(lambda x: x + 1, backend="csd", options={"mode": 1})
    with pytest.raises(ValueError, match=r"option 'mode'=1 has type int; expected str"):
        fn(torch.randn(3))
    assert not called


def test_mode_given_twice_must_agree():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    with pytest.raises(ValueError, match="mode='max-autotune' and option 'mode'='reduce-overhead' disagree"):
        backend_mod.csd_backend(gm, [torch.randn(3)], options={"mode": "reduce-overhead"}, mode="max-autotune")


def test_failing_pass_falls_back_to_inductor_with_one_warning(monkeypatch):
    seen_graphs = []

    def broken_pass(gm, example_inputs, cfg):
        seen_graphs.append(gm)
        # starts mutating (would give wrong numbers if it leaked), then gives up
        for node in gm.graph.nodes:
            if node.op == "call_function":
                node.target = torch.sin
        gm.recompile()
        raise NotImplementedError("cannot handle this graph")

    monkeypatch.setattr(backend_mod, "pre_aot_passes", lambda cfg: [("broken", broken_pass)])
    model = make_tiny_llama(seed=3)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = torch.compile(model, backend="csd", fullgraph=True)(ids).logits
    ours = [w for w in caught if issubclass(w.category, CSDFallbackWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "'broken'" in str(ours[0].message) and "cannot handle this graph" in str(ours[0].message)
    assert seen_graphs, "the pass ran"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_dynamic_bits_without_a_table_file_names_the_command_that_makes_one():
    fn = torch.compile(lambda x: x + 1, backend="csd", options={"bits": "dynamic", "calibration": "t.json"})
    with pytest.raises(ValueError, match="csd-compile calibrate"):
        fn(torch.randn(3))


def _logits(model, ids, **options):
    with torch.inference_mode():
        return torch.compile(model, backend="csd", options=options)(ids).logits


@pytest.mark.parametrize("options", [{"bits": 8, "group_size": 32}, {"bits": 4, "group_size": 32,
                                                                      "group_linears": False}])
def test_two_instances_of_one_model_class_each_run_their_own_weights(options):
    """Dynamo gives every instance of a module class one graph (parameters are its inputs); the
    quantized weights baked into it are the first instance's, so the second must get its own."""
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    alone = _logits(make_tiny_llama(seed=2), ids, **options)
    torch._dynamo.reset()
    first, second = make_tiny_llama(seed=1), make_tiny_llama(seed=2)
    y1 = _logits(first, ids, **options)
    y2 = _logits(second, ids, **options)
    assert torch.equal(y2, alone)  # as if compiled on its own
    assert (y2 - y1).abs().max() > 0.1 * y1.abs().max()
    assert torch.equal(_logits(first, ids, **options), y1)  # and the first instance still runs its own
    with torch.inference_mode():
        eager = second(ids).logits
    assert (y2 - eager).abs().max() < 0.1 * (y1 - eager).abs().max()


def test_a_replaced_weight_is_quantized_again_and_a_freed_model_is_let_go():
    import gc
    import weakref

    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    model = make_tiny_llama(seed=5)
    options = {"bits": 8, "group_size": 32}
    compiled = torch.compile(model, backend="csd", options=options)
    with torch.inference_mode():
        before = compiled(ids).logits
        proj = model.model.layers[0].mlp.down_proj
        proj.weight = torch.nn.Parameter(torch.randn_like(proj.weight) * 0.5, requires_grad=False)
        after = compiled(ids).logits
    torch._dynamo.reset()
    assert torch.equal(after, _logits(model, ids, **options))  # the new weight, quantized
    assert (after - before).abs().max() > 1e-3
    torch._dynamo.reset()
    gone = make_tiny_llama(seed=6)
    weight = weakref.ref(gone.model.layers[1].self_attn.q_proj.weight)
    kept = torch.compile(make_tiny_llama(seed=7), backend="csd", options=options)
    _logits(gone, ids, **options)
    with torch.inference_mode():
        kept(ids)  # the same compiled code object, bound to another instance as well
    del gone
    gc.collect()
    assert weight() is None  # the compiled graphs hold no reference to a model's weights
