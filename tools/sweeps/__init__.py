"""One-off sweeps run on a GPU machine from a checkout (``python -m tools.sweeps.<name>``),
built on the installed benchmarks."""
