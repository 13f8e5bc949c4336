"""Counting XLA compilations: steady state must compile nothing (tests and the benchmark check)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations() -> Iterator[list[int]]:
    """Counts XLA backend compilations inside the block: `with count_compilations() as n: ...; n[0]`."""
    count = [0]

    def listener(event: str, duration: float, **kwargs) -> None:
        del duration, kwargs
        count[0] += event == COMPILE_EVENT

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
