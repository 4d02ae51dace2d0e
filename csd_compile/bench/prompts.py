"""Benchmark prompts, for the benchmark scripts (the loaders live in ``csd_compile.data``)."""

from csd_compile.data import humaneval_problems, load_prompts, mtbench_questions

__all__ = ["humaneval_problems", "load_prompts", "mtbench_questions"]
