"""Measurement tools of the benchmark scripts, notebooks and tests (not used by the engine): the
serving sweep and its report, workloads, serving metrics, roofline costs, kernel timing, mesh-layout
runs, compilation counting, plots, and servers started in subprocesses for the side-by-side with
vLLM. Results live in benchmarks/results/."""
