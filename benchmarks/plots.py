"""Plots of benchmark_serving.py results (headless matplotlib): the Pareto frontier and latencies."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.metrics import pareto_frontier  # noqa: E402


def load_points(paths: list[Path], labels: list[str] | None = None) -> list[dict]:
    """Every point of every file, each tagged with its series label (prefixed with the file's label,
    e.g. the commit, when given) and its file's device."""
    points = []
    for i, path in enumerate(paths):
        report = json.loads(Path(path).read_text())
        prefix = f"{labels[i]} " if labels else ""
        for p in report["points"]:
            spec = p.get("speculation")  # speculative runs are their own series, labelled with the method
            suffix = f" +{spec['method']} k={spec['num_speculative_tokens']}" if spec else ""
            http = " http" if p.get("client") == "http" else ""  # served points: their own series
            points.append({**p, "series": f"{prefix}{p['system']}{http} {p['dtype']}{suffix}",
                           "device": report["device"]["kind"]})
    return points


def _series(points: list[dict]) -> dict[str, list[dict]]:
    groups = collections.defaultdict(list)
    for p in points:
        if p["interactivity"] is not None:
            groups[p["series"]].append(p)
    return {k: sorted(v, key=lambda p: p["concurrency"]) for k, v in groups.items()}


def plot_pareto(points: list[dict], path: Path) -> Path:
    """Throughput per device vs interactivity, with the frontier across all points."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, series in _series(points).items():
        xs, ys = [p["interactivity"] for p in series], [p["output_tok_s"] for p in series]
        ax.plot(xs, ys, "o-", label=label)
        for p, x, y in zip(series, xs, ys):
            ax.annotate(str(p["concurrency"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    scored = [p for p in points if p["interactivity"] is not None]
    front = pareto_frontier([(p["interactivity"], p["output_tok_s"]) for p in scored])
    ax.plot([scored[i]["interactivity"] for i in front], [scored[i]["output_tok_s"] for i in front], "k--",
            lw=1, label="Pareto frontier")
    ax.set(xlabel="interactivity (tok/s/user)", ylabel="output throughput (tok/s/device)", xscale="log",
           yscale="log", title=f"throughput vs interactivity ({points[0]['device']}); labels: concurrency")
    return _save(fig, [ax], path)


def _save(fig, axes, path: Path) -> Path:
    """Grid and legend on every axis, then write the PNG and free the figure."""
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency(points: list[dict], path: Path) -> Path:
    """Median TTFT and TPOT against concurrency, one line per series."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, series in _series(points).items():
        cs = [p["concurrency"] for p in series]
        axes[0].plot(cs, [p["ttft_ms"]["median"] for p in series], "o-", label=label)
        axes[1].plot(cs, [p["tpot_ms"]["median"] for p in series], "o-", label=label)
    for ax, name in zip(axes, ("TTFT", "TPOT")):
        ax.set(xlabel="concurrency", ylabel=f"median {name} (ms)", xscale="log", yscale="log", title=name)
        ax.set_xscale("log", base=2)
    return _save(fig, axes, path)


def plot_files(paths: list[Path], prefix: Path, labels: list[str] | None = None) -> list[Path]:
    """Both plots for the given result files (series prefixed with `labels`); returns the PNG paths."""
    points = load_points(paths, labels)
    prefix = Path(prefix)
    return [plot_pareto(points, prefix.with_name(prefix.name + "-pareto.png")),
            plot_latency(points, prefix.with_name(prefix.name + "-latency.png"))]
