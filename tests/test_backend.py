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


def test_mode_is_rejected():
    fn = torch.compile(lambda x: x + 1, backend="csd", mode="max-autotune")
    with pytest.raises(ValueError, match="mode='max-autotune' is not supported"):
        fn(torch.randn(3))


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
