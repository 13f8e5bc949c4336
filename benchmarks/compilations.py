"""Counting XLA compilations: steady state must compile nothing (tests and the benchmark check)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # a compilation, or a persistent-cache load
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def on_compilation(callback: Callable[[], None]) -> Callable[[], None]:
    """Calls `callback` at every XLA backend compilation from now on (a server's counter); returns the
    function that stops it."""
    def listener(event: str, duration: float, **kwargs) -> None:
        del duration, kwargs
        if event == COMPILE_EVENT:
            callback()

    jax.monitoring.register_event_duration_secs_listener(listener)
    return lambda: jax.monitoring.unregister_event_duration_listener(listener)


@contextlib.contextmanager
def count_compilations() -> Iterator[list[int]]:
    """Counts XLA backend compilations inside the block: `with count_compilations() as n: ...; n[0]`
    (an executable loaded from the persistent compilation cache counts too: see count_cache_hits)."""
    count = [0]

    def counted() -> None:
        count[0] += 1

    stop = on_compilation(counted)
    try:
        yield count
    finally:
        stop()


@contextlib.contextmanager
def count_cache_hits() -> Iterator[list[int]]:
    """Counts executables loaded from the persistent compilation cache inside the block."""
    count = [0]

    def listener(event: str, **kwargs) -> None:
        del kwargs
        count[0] += event == CACHE_HIT_EVENT

    jax.monitoring.register_event_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_listener(listener)
