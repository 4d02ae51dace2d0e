"""End to end on the embedded real model: the CLI through backend='csd' vs plain HF eager greedy."""

import re

import torch

from csd_compile import load_model
from csd_compile.cli import main
from csd_compile.models.hf_generate import encode_prompt

PROMPT = "Name three primary colours and say why they are called primary."


def _eager_greedy_text(dtype: str, max_new_tokens: int) -> tuple[str, int]:
    model, tok = load_model(dtype=dtype)
    ids = encode_prompt(tok, PROMPT, chat=True)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True), len(new)


def test_cli_generate_through_csd_backend_equals_eager_greedy(capsys):
    assert main(["generate", "--prompt", PROMPT, "--chat", "--max-new-tokens", "20", "--dtype", "fp32", "--draft", "none"]) == 0
    out, err = capsys.readouterr()
    expected, n_new = _eager_greedy_text("fp32", 20)
    assert len(expected.strip()) > 10
    assert out.strip() == expected.strip()
    stats = re.search(r"prompt tokens (\d+) \| new tokens (\d+) \| ([\d.]+) tok/s \| compile ([\d.]+) s \| backend csd fp32", err)
    assert stats, err
    assert int(stats.group(2)) == n_new and float(stats.group(3)) > 0 and float(stats.group(4)) > 0


def test_cli_generate_eager_streams_text(capsys):
    assert main(["generate", "--prompt", PROMPT, "--chat", "--max-new-tokens", "8", "--no-compile", "--draft", "none"]) == 0
    out, err = capsys.readouterr()
    expected, n_new = _eager_greedy_text("bf16", 8)
    assert out.strip() == expected.strip() and f"new tokens {n_new} |" in err and "backend eager bf16" in err
