"""options={"bits": "dynamic"} in the backend: the compiled graph's own logits set the next plan."""

import pytest
import torch

from csd_compile.quant.compiled_policy import module_path
from csd_compile.quant.linear import quantized_linears
from csd_compile.quant.policy import DynamicPrecisionPolicy, next_token_entropy
from tests.conftest import make_tiny_llama
from tests.quant.test_policy import table_for


class CountingCSD:
    def __init__(self, options):
        self.graphs, self.options = 0, options

    def __call__(self, gm, example_inputs):
        from csd_compile.backend import csd_backend

        self.graphs += 1
        return csd_backend(gm, example_inputs, options=self.options)


def _saved_table(model, tmp_path, seed=0, version=1):
    table = table_for(model, seed, version)
    path = tmp_path / "table.json"
    table.save(path)
    return table, str(path)


@pytest.mark.parametrize("version,mode", [(1, None), (2, None), (2, "reduce-overhead")],
                         ids=["spread", "priced", "priced-cpu-graph"])  # the spread rule, the priced plans
def test_dynamic_plan_follows_the_graphs_own_entropy_without_recompiling(tmp_path, version, mode):
    """(With ``mode="reduce-overhead"`` the step is replayed as a CPU graph, which reads the bits each
    plan writes, and the weight changed in place, at every replay.)"""
    model = make_tiny_llama(seed=11)
    table, path = _saved_table(model, tmp_path, version=version)
    backend = CountingCSD({"bits": "dynamic", "calibration": path, "avg_bits": 4.0, **({"mode": mode} if mode else {})})
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    expected_policy = DynamicPrecisionPolicy.from_table(table, 4.0)
    g = torch.Generator().manual_seed(2)
    plans = []
    with torch.no_grad():
        for scale in (0.0, 40.0, 0.05, 40.0, 0.0):  # flat, peaked, ... next-token distributions
            model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * scale)
            out = compiled(input_ids=torch.randint(0, 128, (1, 6), generator=g)).logits
            h = next_token_entropy(out).max()
            expect = expected_policy.plans[torch.bucketize(h, expected_policy.edges)]
            bits = torch.stack([b for _, b in quantized_linears(model)])
            assert torch.equal(bits, expect), (bits, expect)
            plans.append(tuple(expect.tolist()))
    assert len(set(plans)) >= 2  # the plan changed between calls
    assert backend.graphs == 1  # ... and nothing recompiled
    # the quantized linears really run at the plan: same logits as the eager model at those bits
    from csd_compile.quant import quantize_, set_bits

    eager = quantize_(make_tiny_llama(seed=11), bits=8)
    set_bits(eager, list(plans[-1]))
    ids = torch.randint(0, 128, (1, 6), generator=g)
    with torch.no_grad():
        eager.lm_head.weight.copy_(model.lm_head.weight)
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=1e-3, atol=1e-3)


def test_module_paths_come_from_dynamo_sources():
    model = make_tiny_llama(seed=1)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(p for p in (module_path(n) for n in gm.graph.nodes if n.op == "placeholder") if p)
        return gm.forward

    torch.compile(lambda ids: model(ids).logits, backend=backend)(torch.tensor([[1, 2, 3]]))
    assert "model.layers.1.mlp.down_proj" in seen and "lm_head" in seen


@pytest.mark.parametrize("case", ["another model", "missing", "group size", "avg_bits", "corrupt"])
def test_bad_tables_are_clear_errors_before_compiling(tmp_path, case):
    model = make_tiny_llama(seed=12)
    _, path = _saved_table(make_tiny_llama(seed=13) if case == "another model" else model, tmp_path)
    options = {"bits": "dynamic", "calibration": path, "avg_bits": 4.0}
    if case == "missing":
        options["calibration"] = str(tmp_path / "nope.json")
    elif case == "group size":
        options["group_size"] = 32
    elif case == "avg_bits":
        options["avg_bits"] = 9.0  # inside the option's [2, 16] but above the table's ladder
    elif case == "corrupt":
        (tmp_path / "table.json").write_text('{"format": "csd-precision-table", "version": 1, "layers": 3}')
    match = {"another model": "another model", "missing": "csd-compile calibrate", "group size": "group_size=64",
             "avg_bits": "avg_bits=9.0", "corrupt": "corrupt"}[case]
    compiled = torch.compile(model, backend="csd", options=options)
    with torch.no_grad(), pytest.raises(ValueError, match=match):  # (in grad mode the graph is not quantized)
        compiled(input_ids=torch.tensor([[1, 2, 3]]))
