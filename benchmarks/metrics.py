"""Serving metrics over per-token timestamps: TTFT, TPOT, ITL, E2E, throughput, Pareto, cost.

Inputs are plain timestamps (seconds, one clock), so the same functions score the engine and the
baselines. Multi-step decode delivers `decode_steps` tokens per host sync with one timestamp, so
its ITL distribution holds zeros between the tokens of one sync; TPOT (a per-request average)
is unaffected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# $ per device-hour (InferenceMAX's rental rates); CPU and other devices come from a flag.
HOURLY_RATES_USD = {"h100": 1.30, "h200": 1.41, "b200": 1.95}


def hourly_rate(device_kind: str, override: float | None, cpu_rate: float) -> float:
    """$ per device-hour: the override, else the GPU table, else the CPU rate."""
    if override is not None:
        return override
    for key, rate in HOURLY_RATES_USD.items():
        if key in device_kind.lower():
            return rate
    return cpu_rate


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    """One finished request: when it arrived, when each output token arrived, and its prompt length."""

    arrival: float
    token_times: tuple[float, ...]
    num_prompt_tokens: int

    def __post_init__(self) -> None:
        if not self.token_times:
            raise ValueError("a finished request has at least one output token")
        if any(b < a for a, b in zip(self.token_times, self.token_times[1:])) or self.token_times[0] < self.arrival:
            raise ValueError("token times must be non-decreasing and not before arrival")

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for a one-token request)."""
        n = len(self.token_times)
        return None if n < 2 else (self.token_times[-1] - self.token_times[0]) / (n - 1)

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.token_times))


@dataclasses.dataclass(frozen=True)
class Stats:
    """Mean, median and 99th percentile, in milliseconds."""

    mean: float
    median: float
    p99: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> "Stats":
        if len(values) == 0:
            return cls(float("nan"), float("nan"), float("nan"))
        ms = np.asarray(values, np.float64) * 1e3
        return cls(float(ms.mean()), float(np.median(ms)), float(np.percentile(ms, 99)))


@dataclasses.dataclass(frozen=True)
class PointMetrics:
    """One concurrency point of one system. Throughputs are per device."""

    concurrency: int
    num_requests: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    total_tok_s: float
    output_tok_s: float
    interactivity: float  # tok/s/user = 1000 / median TPOT in ms
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats


def interactivity(median_tpot_ms: float) -> float:
    """Tokens per second one user sees: 1000 / median TPOT (ms)."""
    return 1000.0 / median_tpot_ms if median_tpot_ms > 0 else float("nan")


def point_metrics(timings: Sequence[RequestTiming], concurrency: int, num_devices: int = 1,
                  duration_s: float | None = None) -> PointMetrics:
    """Aggregate a point; duration defaults to first arrival .. last token."""
    if not timings:
        raise ValueError("no finished requests to score")
    if duration_s is None:
        duration_s = max(t.token_times[-1] for t in timings) - min(t.arrival for t in timings)
    inputs = sum(t.num_prompt_tokens for t in timings)
    outputs = sum(len(t.token_times) for t in timings)
    tpot = Stats.of_seconds([t.tpot for t in timings if t.tpot is not None])
    per_device = duration_s * num_devices
    return PointMetrics(
        concurrency=concurrency, num_requests=len(timings), duration_s=duration_s, input_tokens=inputs,
        output_tokens=outputs, total_tok_s=(inputs + outputs) / per_device, output_tok_s=outputs / per_device,
        interactivity=interactivity(tpot.median), ttft_ms=Stats.of_seconds([t.ttft for t in timings]),
        tpot_ms=tpot, itl_ms=Stats.of_seconds([x for t in timings for x in t.itls]),
        e2e_ms=Stats.of_seconds([t.e2e for t in timings]))


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better on both).

    A point is dropped only when another is >= on both axes and > on at least one; exact
    duplicates both stay. Indices come back sorted by the first axis, descending.
    """
    keep = []
    for i, (x, y) in enumerate(points):
        dominated = any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in points)
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: -points[i][0])


def cost_per_million_tokens(dollars_per_device_hour: float, tok_s_per_device: float) -> float:
    """$ per 1e6 tokens = $/device-hour / (tok/s x 3600 / 1e6)."""
    if tok_s_per_device <= 0:
        return float("inf")
    return dollars_per_device_hour / (tok_s_per_device * 3600 / 1e6)


@dataclasses.dataclass(frozen=True)
class TurnResult:
    """One request of an agentic session: which session and turn, its timing, and the prompt tokens
    the prefix cache served it (None where unknown: a server that does not report them)."""

    session: int
    turn: int
    timing: RequestTiming
    cached_tokens: int | None = None


def turn_summary(results: Sequence[TurnResult]) -> list[dict]:
    """Per turn (`turn` 1 = the first): requests, mean prompt tokens, TTFT and E2E stats (ms), and the
    prefix-cache tokens asked and found (null when any request's are unknown)."""
    rows = []
    for turn in sorted({r.turn for r in results}):
        mine = [r for r in results if r.turn == turn]
        known = all(r.cached_tokens is not None for r in mine)
        queries = sum(r.timing.num_prompt_tokens for r in mine)
        hits = sum(r.cached_tokens for r in mine) if known else None
        rows.append({"turn": turn + 1, "num_requests": len(mine), "prompt_tokens_mean": queries / len(mine),
                     "ttft_ms": dataclasses.asdict(Stats.of_seconds([r.timing.ttft for r in mine])),
                     "e2e_ms": dataclasses.asdict(Stats.of_seconds([r.timing.e2e for r in mine])),
                     "prefix_cache_queries": queries, "prefix_cache_hits": hits,
                     "prefix_cache_hit_rate": hits / queries if known and queries else None})
    return rows


@dataclasses.dataclass(frozen=True)
class StateSample:
    """The serving engine's state at one moment: KV-cache usage (fraction of pages), running and
    waiting requests, its prefix cache's running totals and the XLA compilations so far (None where
    not exported)."""

    kv_cache_usage: float | None
    running: float | None
    waiting: float | None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None
    compilations: float | None = None


def state_summary(before: StateSample, after: StateSample, samples: Sequence[StateSample], source: str) -> dict:
    """KV-cache usage before, after, mean and max over the samples; running and waiting mean and max;
    the prefix cache's queries and hits between before and after (null where not exported)."""
    def spread(values: list[float | None]) -> dict:
        xs = [x for x in values if x is not None]
        return {"mean": float(np.mean(xs)) if xs else None, "max": float(np.max(xs)) if xs else None}

    out = {"source": source, "num_samples": len(samples),
           "kv_cache_usage": {"before": before.kv_cache_usage, "after": after.kv_cache_usage,
                              **spread([s.kv_cache_usage for s in samples])},
           "num_requests_running": spread([s.running for s in samples]),
           "num_requests_waiting": spread([s.waiting for s in samples])}
    known = None not in (before.prefix_cache_queries, after.prefix_cache_queries,
                         before.prefix_cache_hits, after.prefix_cache_hits)
    queries = int(after.prefix_cache_queries - before.prefix_cache_queries) if known else None
    hits = int(after.prefix_cache_hits - before.prefix_cache_hits) if known else None
    out["prefix_cache"] = {"queries": queries, "hits": hits,
                           "hit_rate": hits / queries if known and queries else None}
    return out
