"""Research scripts run from a checkout (``python -m benchmarks.X``); the benchmark that ships with
the package, ``csd-compile bench``, lives in ``csd_compile.bench``."""
