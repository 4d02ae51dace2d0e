"""Side-by-side benchmarks of csd-compile against its peers (run: ``csd-compile bench``)."""
