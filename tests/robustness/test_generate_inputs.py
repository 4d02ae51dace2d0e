"""``csd_compile.generate`` refuses bad input with its own error, naming the value, before any work:
no engine is built, no cache allocated, nothing compiled, and the arguments are left as they were."""

import math

import pytest
import torch
from tests.conftest import make_tiny_llama

from csd_compile import generate
from csd_compile.config import OptionError

V = 128  # the tiny model's vocabulary


@pytest.fixture(scope="module")
def target():
    return make_tiny_llama(0)


def _ids(B=1, S=8, seed=0):
    return torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(seed))


# (case id, keyword arguments over the defaults, error type, phrase naming the bad input)
CASES = [
    # a draft model that cannot run beside the fp32 target
    ("bf16 draft, fp32 target", dict(draft=lambda: make_tiny_llama(1, dtype=torch.bfloat16)), ValueError,
     r"draft model's dtype torch.bfloat16 differs from the target's torch.float32"),
    ("fp16 draft, fp32 target", dict(draft=lambda: make_tiny_llama(1, dtype=torch.float16)), ValueError,
     r"dtype torch.float16 differs from the target's torch.float32"),
    ("draft on another device", dict(draft=lambda: make_tiny_llama(1).to("meta")), ValueError,
     "draft model is on meta, the target on cpu"),
    ("draft with a shorter context", dict(draft=lambda: make_tiny_llama(1, max_position_embeddings=16)), ValueError,
     r"draft model's context \(16 positions\) is shorter than the cache"),
    ("draft with another vocabulary", dict(draft=lambda: make_tiny_llama(1, vocab_size=96)), ValueError,
     r"draft model vocabulary \(96 tokens\) differs from the target's \(128"),
    # sampling settings
    ("temperature inf", dict(temperature=math.inf), ValueError, "temperature=inf must be a finite number"),
    ("temperature nan", dict(temperature=math.nan), ValueError, "temperature=nan must be a finite number"),
    ("temperature negative", dict(temperature=-0.5), ValueError, r"temperature=-0.5 must be a finite number >= 0"),
    ("top_p nan", dict(temperature=1.0, top_p=math.nan), ValueError, r"top_p=nan must be in \(0, 1\]"),
    ("top_p 0", dict(temperature=1.0, top_p=0.0), ValueError, r"top_p=0.0 must be in \(0, 1\]"),
    # prompts
    ("batch of 0 rows", dict(input_ids=torch.zeros(0, 5, dtype=torch.int64)), ValueError, r"no rows \(shape \(0, 5\)\)"),
    ("prompt of 0 tokens", dict(input_ids=torch.zeros(1, 0, dtype=torch.int64)), ValueError, r"S >= 1, got shape \(1, 0\)"),
    ("ids >= vocab", dict(input_ids=lambda: _ids() + V), ValueError, r"token id \d+, outside the model's vocabulary \[0, 127\]"),
    ("negative ids", dict(input_ids=lambda: _ids() - V), ValueError, r"token id -\d+, outside the model's vocabulary"),
    ("float ids in a list", dict(input_ids=[[5, 6.5, 7]]), TypeError, r"token ids \(ints\), got 6.5 \(float\)"),
    ("text in a list", dict(input_ids=[["hello"]]), TypeError, r"token ids \(ints\), got 'hello' \(str\)"),
    ("id past int64", dict(input_ids=[[2**70]]), ValueError, "token id 1180591620717411303424, outside the int64 range"),
    ("float tensor", dict(input_ids=lambda: _ids().float()), ValueError, "integer tensor .* torch.float32"),
    ("mask of 0.5", dict(attention_mask=lambda: torch.full((1, 8), 0.5)), ValueError, "attention_mask must hold only 0 and 1"),
    # lengths against the context and the machine
    ("max_new_tokens 1e9, ngram", dict(max_new_tokens=10**9), ValueError,
     "max_new_tokens=1000000000 does not fit the static cache"),
    ("max_new_tokens 1e9, self", dict(draft="self", max_new_tokens=10**9), ValueError,
     "max_new_tokens=1000000000 does not fit"),
    ("max_new_tokens 0", dict(max_new_tokens=0), ValueError, "max_new_tokens=0 must be an int >= 1"),
    ("prompt longer than the context", dict(input_ids=lambda: _ids(S=300)), ValueError,
     r"prompt \(300 tokens\) is longer than the static cache \(256 slots"),
    ("cache larger than memory", dict(max_cache_len=10**12), ValueError,
     r"static cache for 1 row\(s\) x 1000000000000 slots needs [\d.]+ GiB, more than"),
    ("num_draft_tokens 100", dict(num_draft_tokens=100), ValueError, r"num_draft_tokens=100 must be an int in \[1, 64\]"),
    # settings the step would otherwise ignore or reject late
    ("eos id outside the vocabulary", dict(eos_token_id=10**6), ValueError, "eos_token_id=1000000 holds 1000000, outside"),
    ("negative eos id", dict(eos_token_id=[3, -1]), ValueError, r"eos_token_id=\[3, -1\] holds -1, outside"),
    ("draft_bits 5 with ngram", dict(draft_bits=5), ValueError, r"draft_bits=5 is not supported"),
    ("unknown backend", dict(compile_backend="warp"), ValueError, "compile_backend='warp' is not a torch.compile backend"),
    ("bad backend option", dict(compile_backend="csd", compile_options={"bits": 5}), OptionError, "'bits'=5 is not supported"),
    ("dynamic bits, random table", dict(compile_backend="csd", compile_options={"bits": "dynamic", "calibration": __file__}),
     ValueError, r"precision table '.*test_generate_inputs.py' is corrupt"),
    ("options without a backend", dict(compile_options={"bits": 4}), ValueError, "compile_options needs a compile_backend"),
    ("csd tau nan", dict(acceptance="csd", tau=math.nan), ValueError, r"tau=nan must be a number in \(0, 1\]"),
    ("csd with temperature", dict(acceptance="csd", temperature=0.7), ValueError, "temperature=0.7 > 0 is not supported"),
    ("memory with exact", dict(memory="m.ocm"), ValueError, "memory= is used only with acceptance='csd'"),
]


@pytest.mark.parametrize("overrides, error, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_generate_input_is_refused_before_any_work(target, overrides, error, phrase):
    kw = dict(input_ids=_ids(), draft="ngram", max_new_tokens=4, eos_token_id=[], compile_backend=None)
    kw.update({k: v() if callable(v) and not isinstance(v, torch.nn.Module) else v for k, v in overrides.items()})
    draft = kw["draft"]
    before = {n: p.clone() for n, p in draft.named_parameters()} if isinstance(draft, torch.nn.Module) else None
    ids = kw["input_ids"]
    ids_before = ids.clone() if isinstance(ids, torch.Tensor) else None
    with pytest.raises(error, match=phrase):
        generate(target, kw.pop("input_ids"), **kw)
    assert "_csd_speculative_engines" not in target.__dict__  # no engine: no cache, no compile
    if before is not None:  # the user's draft is untouched (dtype, device and values)
        after = dict(draft.named_parameters())
        assert all(after[n].dtype == p.dtype and after[n].device == p.device for n, p in before.items())
        assert all(torch.equal(after[n], p) for n, p in before.items() if p.device.type != "meta")
    if ids_before is not None:
        assert torch.equal(ids, ids_before)


def test_a_matching_draft_still_runs():
    """The draft checks refuse only what cannot run: a same-dtype draft with another width works."""
    target = make_tiny_llama(0)
    draft = make_tiny_llama(1, hidden_size=32, intermediate_size=64)
    out = generate(target, _ids(), draft=draft, max_new_tokens=6, eos_token_id=[], compile_backend=None)
    assert out.shape == (1, 14)
    ref = target.generate(_ids(), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref)  # greedy: the target's own output, whatever the draft
