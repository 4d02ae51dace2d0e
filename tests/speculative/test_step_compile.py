"""The draft-verify step is one compiled graph (plus, for the n-gram draft, a one-token decode graph
for steps without a proposal): no graph break, no recompile as acceptance and max_new_tokens vary;
the compiled engine gives the same tokens as HF greedy."""

import torch
from torch._dynamo.utils import counters

from csd_compile.backend import csd_backend
from csd_compile.speculative import generate
from tests.conftest import make_tiny_llama


class CountingCSD:
    """The csd backend, counting the graphs it is asked to compile."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs, **kwargs):
        self.graphs += 1
        return csd_backend(gm, example_inputs, **kwargs)


def test_one_graph_no_recompile_over_varying_acceptance():
    target = make_tiny_llama(0)
    backend = CountingCSD()
    counters.clear()
    # a repetitive prompt so that prompt lookup is accepted on some steps and rejected on others
    ids = torch.tensor([[5, 9, 17, 5, 9, 17, 40, 5, 9, 17, 41, 5, 9]])
    accepted = []
    for n in (30, 45):  # another max_new_tokens reuses the graph (same cache bucket)
        ref = target.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        out, stats = generate(target, ids, draft="ngram", num_draft_tokens=4, max_new_tokens=n, eos_token_id=[],
                              compile_backend=backend, return_stats=True)
        assert torch.equal(out, ref)
        accepted.append(stats["mean_accepted"])
        assert 0 < stats["mean_accepted"] < 4  # acceptance varied between steps
    assert backend.graphs == 2  # the verify step and the decode step, each compiled once
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 2


def test_explicit_cache_length_serves_every_prompt_with_one_graph():
    """With ``max_cache_len`` given, prompts whose default 256-slot buckets differ share one engine."""
    target = make_tiny_llama(0)
    backend = CountingCSD()
    g = torch.Generator().manual_seed(3)
    for S in (7, 270):  # default buckets: 256 and 512 slots
        ids = torch.randint(3, 128, (1, S), generator=g)
        ref = target.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        out = generate(target, ids, draft="ngram", num_draft_tokens=3, max_new_tokens=12, eos_token_id=[],
                       compile_backend=backend, max_cache_len=320)
        assert torch.equal(out, ref)
        # both steps compile before the first generation, whether or not it ever has a proposal
        assert backend.graphs == 2
    assert len(target.__dict__["_csd_speculative_engines"]) == 1  # one engine: one cache length
