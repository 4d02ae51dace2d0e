"""CUDA-only tests: collected only by ``make gpu-check`` (``--cuda``); the CPU suite never sees them."""
