"""Our served points beside a baseline server's at the same concurrency (scripts/benchmark_serving.py
--baseline=vllm): ours / theirs for output throughput (above 1: ours serves more) and for the
latencies (below 1: ours is faster), the raw values, and whether the throughput ratio meets the target."""

from __future__ import annotations

TARGET_OUTPUT_TOK_S_RATIO = 1.5
TARGET_ITL_P99_OVER_P50 = 3.0  # smooth cadence: the worst 1% of gaps within 3x the typical one
TARGET_TPOT_OVER_ROOFLINE = 2.0  # TPOT within 2x the roofline decode step at the same concurrency
# The compared quantities: (name, the point's field, its statistic; None for a plain number).
METRICS = (("output_tok_s", "output_tok_s", None), ("ttft_p50_ms", "ttft_ms", "median"),
           ("tpot_p50_ms", "tpot_ms", "median"), ("itl_p50_ms", "itl_ms", "median"), ("itl_p99_ms", "itl_ms", "p99"))


def point_values(point: dict) -> dict[str, float | None]:
    """The compared quantities of one point."""
    return {name: point[field] if stat is None else point[field][stat] for name, field, stat in METRICS}


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs; None where either is missing or theirs is 0."""
    return None if ours is None or not theirs else ours / theirs


def compare_pair(ours: dict, theirs: dict, target: float) -> dict:
    """One concurrency against one baseline: both points' values, the ratios and the target check."""
    a, b = point_values(ours), point_values(theirs)
    ratios = {f"{name}_ratio": ratio(a[name], b[name]) for name, _, _ in METRICS}
    meets = ratios["output_tok_s_ratio"] is not None and ratios["output_tok_s_ratio"] >= target
    return {"concurrency": ours["concurrency"], "baseline": theirs["system"], "ours": a, "theirs": b, **ratios,
            "meets_target": meets}


def compare(points: list[dict], ours: str, baselines: list[str],
            target: float = TARGET_OUTPUT_TOK_S_RATIO) -> dict:
    """The report's `comparison`: a row per concurrency that `ours` and a baseline both ran, per
    baseline; `meets_target` when every row does (and there is one)."""
    mine = {p["concurrency"]: p for p in points if p["system"] == ours}
    rows = [compare_pair(mine[p["concurrency"]], p, target)
            for system in baselines for p in points if p["system"] == system and p["concurrency"] in mine]
    return {"ours": ours, "baselines": baselines,
            "target": {"metric": "output_tok_s_ratio", "min": target},
            "rows": rows, "meets_target": bool(rows) and all(r["meets_target"] for r in rows),
            "own_targets": {"itl_p99_over_p50_max": TARGET_ITL_P99_OVER_P50,
                            "tpot_over_roofline_max": TARGET_TPOT_OVER_ROOFLINE, "rows": own_targets(points, ours)}}


def own_targets(points: list[dict], ours: str) -> list[dict]:
    """Per concurrency of `ours`, the targets that need no baseline: ITL p99 / p50 (None when p50 is 0:
    tokens arrive in bursts), TPOT p50 over the roofline decode step of that many sequences (the
    point's roofline.decode_bound_tok_s), and the XLA compilations seen while it ran."""
    rows = []
    for p in sorted((p for p in points if p["system"] == ours), key=lambda p: p["concurrency"]):
        itl, c = p["itl_ms"], p["concurrency"]
        step_ms = 1e3 * c / p["roofline"]["decode_bound_tok_s"]
        spread = ratio(itl["p99"], itl["median"])
        rows.append({"concurrency": c, "itl_p99_over_p50": spread,
                     "itl_smooth": spread is not None and spread <= TARGET_ITL_P99_OVER_P50,
                     "tpot_p50_ms": p["tpot_ms"]["median"], "roofline_decode_step_ms": step_ms,
                     "tpot_over_roofline": p["tpot_ms"]["median"] / step_ms,
                     "tpot_near_roofline": p["tpot_ms"]["median"] <= TARGET_TPOT_OVER_ROOFLINE * step_ms,
                     "compilations": p.get("compilations")})
    return rows


def _cell(ours: float | None, theirs: float | None, r: float | None, digits: int) -> str:
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.{digits}f}"
    return f"{num(ours)} / {num(theirs)} ({'-' if r is None else f'{r:.2f}x'})"


def format_comparison(comparison: dict) -> str:
    """A Markdown table: per row, ours / theirs (ratio) for each quantity, and the target check."""
    rows = [f"| conc | baseline | out tok/s | TTFT p50 ms | TPOT p50 ms | ITL p50 ms | ITL p99 ms "
            f"| out tok/s >= {comparison['target']['min']}x |", "|---|---|---|---|---|---|---|---|"]
    for r in comparison["rows"]:
        cells = [_cell(r["ours"][name], r["theirs"][name], r[f"{name}_ratio"], 1) for name, _, _ in METRICS]
        rows.append(f"| {r['concurrency']} | {r['baseline']} | " + " | ".join(cells)
                    + f" | {'yes' if r['meets_target'] else 'no'} |")
    own = ["", "| conc | ITL p99 / p50 | TPOT p50 / roofline decode step | compilations |", "|---|---|---|---|"]
    for r in comparison["own_targets"]["rows"]:
        spread = "-" if r["itl_p99_over_p50"] is None else f"{r['itl_p99_over_p50']:.2f}"
        own.append(f"| {r['concurrency']} | {spread} | {r['tpot_p50_ms']:.0f} / {r['roofline_decode_step_ms']:.0f} ms "
                   f"({r['tpot_over_roofline']:.2f}x) | {r['compilations']} |")
    return f"{comparison['ours']} / baseline (ratio):\n" + "\n".join(rows + own)
