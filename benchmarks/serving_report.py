"""The serving benchmark's result JSON (layout in benchmarks/schema.json): its header, its points'
Pareto-frontier flags, the written file with its plots, and a Markdown table of the headline numbers."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.metrics import pareto_frontier
from benchmarks.serving_sweep import Settings
from engine.llm import LLM
from models import ModelConfig, param_counts

SCHEMA_VERSION = 3  # 2: per-point speculation and prefix-cache counters; 3: shapes, agentic sessions, server_state


def mark_frontier(points: list[dict]) -> None:
    """Set `on_frontier` per system: no other point of that system beats it on both axes."""
    for system in {p["system"] for p in points}:
        mine = [p for p in points if p["system"] == system]
        keep = set(pareto_frontier([(p["output_tok_s"], p["interactivity"]) for p in mine]))
        for i, p in enumerate(mine):
            p["on_frontier"] = i in keep


def report_header(llm: LLM, settings: Settings, started: datetime.datetime) -> dict:
    """Model, device, engine and workload sections of the result JSON."""
    device = jax.devices()[0]
    return header_for(llm.model.config, jnp.dtype(llm.model.dtype).name, dataclasses.asdict(llm.config),
                      {"platform": device.platform, "kind": device.device_kind}, settings, started)


def header_for(config: ModelConfig, dtype: str, engine: dict, device: dict, settings: Settings,
               started: datetime.datetime) -> dict:
    """report_header's sections from their parts (a served run gets them from the server)."""
    peaks = settings.peaks
    return {
        "schema_version": SCHEMA_VERSION,
        "started_at": started.isoformat(timespec="seconds"),
        "model": {"name": config.name, "num_params": param_counts(config).total, "dtype": dtype,
                  "config": dataclasses.asdict(config)},
        "device": {"platform": device["platform"], "kind": device["kind"], "count": settings.num_devices,
                   "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                   "hourly_rate_usd": settings.hourly_rate, "peak_bandwidth_gb_s": peaks.bandwidth / 1e9,
                   "peak_tflop_s": peaks.flops / 1e12, "peaks_source": peaks.source},
        "engine": engine,
        "workload": {"kind": settings.workload, "isl": settings.isl, "osl": settings.osl,
                     "range_ratio": settings.range_ratio,
                     "seed": settings.seed, "temperature": settings.temperature, "ignore_eos": True,
                     "warmup": settings.warmup, "shared_prefix_len": settings.shared_prefix_len,
                     "num_turns": settings.num_turns, "scale": settings.scale,
                     **({"tool_result_len": settings.tool_result_len, "num_sessions": settings.num_sessions,
                         "think_time_s": settings.think_time_s, "think_time_dist": settings.think_time_dist}
                        if settings.agentic else {})},
    }


def finish_report(header: dict, points: list[dict], versions: dict, load_at_start: list[float]) -> dict:
    """The header plus points (with their frontier flags), versions, finish time and load averages."""
    points = [dict(p) for p in points]
    mark_frontier(points)
    report = {**header, "versions": versions, "points": points,
              "finished_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    # Other jobs on a shared CPU skew the numbers: keep the 1/5/15-minute load averages beside them.
    report["device"] = {**header["device"], "load_average_at_start": load_at_start,
                        "load_average_at_end": list(os.getloadavg())}
    return report


def write_outputs(report: dict, output: Path, plot: bool) -> None:
    """The JSON, the table on stdout and (plot) PNGs named after the JSON."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(finite_or_null(report), indent=1, allow_nan=False))
    print(format_table(report["points"]))
    if any("agentic" in p for p in report["points"]):
        print(format_turns(report["points"]))
    if plot:
        from benchmarks.plots import plot_files  # noqa: PLC0415 (matplotlib only when plotting)
        for path in plot_files([output], output.with_suffix("")):
            print(f"wrote {path}")
    print(f"wrote {output}")


def finite_or_null(value: Any) -> Any:
    """The report with NaN and infinities as null (JSON has neither)."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def spec_label(point: dict) -> str:
    """"-" without speculation, else method, k and the mean acceptance length."""
    s = point.get("speculation")
    if not s:
        return "-"
    return f"{s['method']} k={s['num_speculative_tokens']} accept {s['mean_acceptance_length'] or 0:.2f}"


def format_table(points: list[dict]) -> str:
    """A Markdown table of the headline numbers of every point."""
    rows = ["| system | dtype | spec | conc | out tok/s/dev | tok/s/user | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
            "| E2E p50 s | roofline | $/M out |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        served = " (http)" if p.get("client") == "http" else ""
        rows.append(f"| {p['system']}{served} | {p['dtype']} | {spec_label(p)} | {p['concurrency']} | "
                    f"{p['output_tok_s']:.1f} | "
                    f"{p['interactivity']:.1f} | {p['ttft_ms']['median']:.0f} | {p['ttft_ms']['p99']:.0f} | "
                    f"{p['tpot_ms']['median']:.1f} | {p['e2e_ms']['median'] / 1e3:.1f} | "
                    f"{100 * p['roofline']['fraction']:.0f}% | {p['cost_per_million_output_tokens_usd']:.2f} |")
    return "\n".join(rows)


def format_turns(points: list[dict]) -> str:
    """A Markdown table of the agentic points per turn: TTFT, prompt length and prefix-cache hits."""
    rows = ["| system | conc | turn | requests | prompt tokens | TTFT p50 ms | TTFT p99 ms | prefix hits |",
            "|---|---|---|---|---|---|---|---|"]
    for p in points:
        for t in p.get("agentic", {}).get("turns", []):
            rate = t["prefix_cache_hit_rate"]
            rows.append(f"| {p['system']} | {p['concurrency']} | {t['turn']} | {t['num_requests']} | "
                        f"{t['prompt_tokens_mean']:.0f} | {t['ttft_ms']['median']:.0f} | {t['ttft_ms']['p99']:.0f} | "
                        f"{'-' if rate is None else f'{100 * rate:.0f}%'} |")
    return "\n".join(rows)
