"""A wall-clock timer for jitted calls: the median of repeated blocking calls after a compile call,
so kernel and step timings exclude compilation and async dispatch."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def time_ms(fn: Callable[[], Any], iters: int) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up (compile) call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
