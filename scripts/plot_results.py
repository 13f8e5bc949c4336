"""Plots of benchmark_serving.py results over one or several result JSONs (benchmarks/plots.py).

    .venv/bin/python scripts/plot_results.py --results=a.json,b.json --output_prefix=benchmarks/results/cpu

writes PREFIX-pareto.png (output tok/s per device vs tok/s per user, one series per system and
dtype, each labelled with its concurrency, and the Pareto frontier over every point of every file)
and PREFIX-latency.png (median TTFT and TPOT vs concurrency).
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from benchmarks.plots import plot_files

_RESULTS = flags.DEFINE_list("results", None, "Result JSON files.")
_PREFIX = flags.DEFINE_string("output_prefix", None, "PNG path prefix (default: the first JSON without .json).")
_LABELS = flags.DEFINE_list("labels", None, "One label per result file, prefixed to its series (e.g. the commit).")


def main(argv: list[str]) -> None:
    del argv
    if not _RESULTS.value:
        raise app.UsageError("--results is required")
    paths = [Path(p) for p in _RESULTS.value]
    prefix = Path(_PREFIX.value) if _PREFIX.value else paths[0].with_suffix("")
    if _LABELS.value and len(_LABELS.value) != len(paths):
        raise app.UsageError(f"--labels has {len(_LABELS.value)} entries for {len(paths)} result files")
    for path in plot_files(paths, prefix, _LABELS.value):
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
