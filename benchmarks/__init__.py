"""Benchmark scripts, run from the checkout (``python benchmarks/<name>.py``); not installed with the package.
See README.md here for what each measures and against which baseline."""
