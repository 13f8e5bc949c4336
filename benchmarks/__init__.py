"""Measurement tools of the benchmark scripts and tests (not used by the engine): roofline costs,
serving metrics, compilation counting and plots. Results live in benchmarks/results/."""
