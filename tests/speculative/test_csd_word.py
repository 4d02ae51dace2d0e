"""CSD as a word: ``generate(..., acceptance="csd", memory=..., tau=..., lam=..., tokenizer=...)``.

Bad values raise before any work, lam=inf is exact greedy, one engine serves repeated calls with the
same settings, a memory file round-trips and a memory of another tokenizer is refused.
The step runs eagerly (compile_backend=None) except in the one compiled test.
"""

import math

import pytest
import torch
from tests.conftest import make_tiny_llama

import csd_compile
from csd_compile import CorrectionMemory, MemoryFileError
from csd_compile.speculative.csd_accept import parse_acceptance
from csd_compile.speculative.memory import tokenizer_fingerprint

ENGINES = "_csd_speculative_engines"
REPEATS = torch.tensor([[5, 9, 17, 5, 9, 17, 40, 5, 9, 17, 41, 5, 9]])  # prompt lookup proposes often


class _Tok:
    """A stand-in tokenizer: a vocabulary (token -> id) and special ids."""

    def __init__(self, shift=0, specials=(0,)):
        self._vocab = {f"t{(i + shift) % 128}": i for i in range(128)}
        self._vocab["``x"] = self._vocab.pop(f"t{(7 + shift) % 128}")  # id 7: a code-fence piece
        self.all_special_ids = list(specials)

    def get_vocab(self):
        return dict(self._vocab)


TOK, OTHER_TOK = _Tok(), _Tok(shift=1)


@pytest.fixture()
def target():
    return make_tiny_llama(0)


def _engines(model):
    return model.__dict__.get(ENGINES, {})


def _hf_greedy(model, ids, n):
    return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(acceptance="lossy"), ValueError, r"acceptance='lossy' is not one of \['exact', 'csd'\]"),
        (dict(acceptance=3), ValueError, r"acceptance=3 must be one of \['exact', 'csd'\]"),
        (dict(acceptance="csd", tau=0), ValueError, r"tau=0 must be a number in \(0, 1\]"),
        (dict(acceptance="csd", tau=1.5), ValueError, r"tau=1.5 must be"),
        (dict(acceptance="csd", tau="0.3"), ValueError, r"tau='0.3' must be"),
        (dict(acceptance="csd", lam=-1), ValueError, r"lam=-1 must be a number >= 0"),
        (dict(acceptance="csd", lam="6"), ValueError, r"lam='6' must be a number"),
        (dict(acceptance="csd", lam=float("nan")), ValueError, r"lam=nan must be"),
        (dict(acceptance="csd", memory=3), TypeError, r"memory must be None, a file path or a CorrectionMemory, got int"),
        (dict(acceptance="csd", memory={"keys": 1}), TypeError, r"got dict"),
        (dict(memory=CorrectionMemory(num_buckets=2, ways=1)), ValueError, r"only with acceptance='csd'"),
        (dict(acceptance="csd", temperature=0.7), ValueError, r"temperature=0.7 > 0 is not supported.*make_csd_sample_accept"),
        (dict(acceptance="csd", memory="/no/such/memory.ocm"), MemoryFileError, r"does not exist"),
        (dict(acceptance="csd", memory=CorrectionMemory(num_buckets=2, ways=1, device="meta")), ValueError, "is on meta"),
    ],
)
def test_bad_input_raises_before_work(target, kwargs, err, match):
    kw = dict(draft="ngram", max_new_tokens=5, compile_backend=None)
    kw.update(kwargs)
    with pytest.raises(err, match=match):
        csd_compile.generate(target, REPEATS, **kw)
    assert len(_engines(target)) == 0  # nothing built


@pytest.mark.parametrize("draft", ["ngram", "self"])
def test_csd_runs_and_lam_inf_is_exact_greedy(target, draft):
    ref = _hf_greedy(target, REPEATS, 24)
    kw = dict(draft=draft, max_new_tokens=24, eos_token_id=[], compile_backend=None, return_stats=True)
    out, _ = csd_compile.generate(target, REPEATS, acceptance="csd", lam=float("inf"), **kw)
    assert torch.equal(out, ref)
    out, stats = csd_compile.generate(target, REPEATS, acceptance="csd", **kw)  # the defaults: tau 0.3, lam 6
    assert out.shape == ref.shape and stats["new_tokens"] == 24


def test_csd_rescues_through_the_word(target):
    kw = dict(draft="ngram", num_draft_tokens=4, max_new_tokens=30, eos_token_id=[], compile_backend=None,
              return_stats=True)
    _, exact = csd_compile.generate(target, REPEATS, acceptance="exact", **kw)
    mem = CorrectionMemory(num_buckets=64, ways=4)
    _, csd = csd_compile.generate(target, REPEATS, acceptance="csd", memory=mem, lam=0, tau=1e-4, **kw)
    assert csd["mean_accepted"] > exact["mean_accepted"] and int(mem.counts.sum()) > 0


def test_same_settings_reuse_one_engine_and_its_memory_learns(target):
    kw = dict(draft="ngram", max_new_tokens=24, eos_token_id=[], compile_backend=None)
    csd_compile.generate(target, REPEATS, acceptance="csd", **kw)
    assert len(_engines(target)) == 1
    (engine,) = _engines(target).values()
    first = int(engine.memory.counts.sum())
    assert first > 0  # memory=None: the engine's own memory counted the rejections
    csd_compile.generate(target, REPEATS, acceptance="csd", **kw)
    assert list(_engines(target).values()) == [engine]  # same settings, same engine
    assert int(engine.memory.counts.sum()) > first  # and the memory learns across calls
    csd_compile.generate(target, REPEATS, acceptance="csd", tau=0.01, **kw)  # other settings: another engine
    assert len(_engines(target)) == 2
    mem = CorrectionMemory(num_buckets=64, ways=4)
    for _ in range(2):
        csd_compile.generate(target, REPEATS, acceptance="csd", memory=mem, **kw)
    assert len(_engines(target)) == 3
    for tau in (0.3, 0.9):  # exact ignores tau and lam: one engine
        csd_compile.generate(target, REPEATS, acceptance="exact", tau=tau, **kw)
    assert len(_engines(target)) == 4


def test_compiled_csd_reuses_one_compiled_step(target):
    from torch._dynamo.utils import counters

    kw = dict(draft="ngram", num_draft_tokens=4, max_new_tokens=16, eos_token_id=[], compile_backend="csd")
    ref = _hf_greedy(target, REPEATS, 16)
    out = csd_compile.generate(target, REPEATS, acceptance="csd", lam=float("inf"), **kw)
    assert torch.equal(out, ref)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # the verify step and the one-token decode step
    csd_compile.generate(target, REPEATS, acceptance="csd", lam=float("inf"), **kw)
    assert counters["stats"]["unique_graphs"] == graphs and len(_engines(target)) == 1
    assert sum(counters["graph_break"].values()) == 0


def test_ngram_draft_that_never_proposes_runs_exactly(target):
    ids = torch.arange(20, 40).unsqueeze(0)  # no token repeats: prompt lookup has nothing to propose
    ref = _hf_greedy(target, ids, 6)
    out = csd_compile.generate(target, ids, draft="ngram", acceptance="csd", max_new_tokens=6, eos_token_id=[],
                               compile_backend=None)
    assert torch.equal(out, ref)  # 6 tokens: no pair can pass lam=6 yet


def test_memory_file_round_trips(target, tmp_path):
    mem = CorrectionMemory(num_buckets=64, ways=4, fingerprint=tokenizer_fingerprint(TOK))
    mem.record(torch.tensor([3, 3, 4]), torch.tensor([8, 8, 9]))
    path = tmp_path / "seed.ocm"
    mem.save(path)
    kw = dict(draft="ngram", max_new_tokens=8, eos_token_id=[], compile_backend=None)
    ref = _hf_greedy(target, REPEATS, 8)
    out = csd_compile.generate(target, REPEATS, acceptance="csd", memory=str(path), tokenizer=TOK,
                               lam=float("inf"), **kw)
    assert torch.equal(out, ref)
    (engine,) = _engines(target).values()
    assert int(engine.memory.count(torch.tensor(3), torch.tensor(8))) >= 2  # the file's counts, then learning
    csd_compile.generate(target, REPEATS, acceptance="csd", memory=path, tokenizer=TOK, lam=float("inf"), **kw)
    assert len(_engines(target)) == 1  # the same file: the same engine
    again = CorrectionMemory.load(path, TOK)  # the file itself is never written
    assert torch.equal(again.keys, mem.keys) and torch.equal(again.counts, mem.counts)
    csd_compile.generate(target, REPEATS, acceptance="csd", memory=path, **kw)  # no tokenizer: unchecked


def test_memory_of_another_tokenizer_is_refused(target, tmp_path):
    kw = dict(draft="ngram", max_new_tokens=5, compile_backend=None, acceptance="csd", tokenizer=TOK)
    other = CorrectionMemory(num_buckets=8, ways=2, fingerprint=tokenizer_fingerprint(OTHER_TOK))
    with pytest.raises(ValueError, match="another tokenizer"):
        csd_compile.generate(target, REPEATS, memory=other, **kw)
    path = tmp_path / "other.ocm"
    other.save(path)
    with pytest.raises(MemoryFileError, match="another tokenizer"):
        csd_compile.generate(target, REPEATS, memory=path, **kw)
    assert len(_engines(target)) == 0


def test_protected_tokens_default(target):
    args = dict(memory=None, tau=0.3, lam=6, temperature=0.0)
    no_tok = parse_acceptance(target, "csd", tokenizer=None, **args)
    assert no_tok.protected == (1, 2)  # LlamaConfig's bos and eos
    with_tok = parse_acceptance(target, "csd", tokenizer=TOK, **args)
    assert with_tok.protected == (0, 1, 2, 7)  # + the special id and the fence piece
    assert with_tok.fingerprint == tokenizer_fingerprint(TOK) and (no_tok.tau, no_tok.lam) == (0.3, 6.0)
    assert math.isinf(parse_acceptance(target, "csd", tokenizer=None, **(args | {"lam": float("inf")})).lam)


def test_hf_custom_generate_with_the_word(target):
    ref = _hf_greedy(target, REPEATS, 12)
    out = target.generate(REPEATS, custom_generate=csd_compile.generate, draft="ngram", acceptance="csd",
                          lam=float("inf"), max_new_tokens=12, eos_token_id=[], compile_backend=None, pad_token_id=0)
    assert torch.equal(out, ref)
