"""Shared helpers for engine tests: a reference greedy decoder and a compilation counter."""

import contextlib

import jax
import numpy as np

from models import LoadedModel


def greedy_reference(model: LoadedModel, prompts: list[list[int]], max_tokens: int, pad_to: int) -> list[list[int]]:
    """Greedy continuations through the no-cache forward; rows right-padded to one length (one compile)."""
    seqs = [list(p) for p in prompts]
    for _ in range(max_tokens):
        batch = np.zeros((len(seqs), pad_to), np.int32)
        for i, s in enumerate(seqs):
            batch[i, :len(s)] = s
        logits = np.asarray(model.forward(batch))
        for i, s in enumerate(seqs):
            s.append(int(logits[i, len(s) - 1].argmax()))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


@contextlib.contextmanager
def count_compilations():
    """Counts XLA backend compilations inside the block: `with count_compilations() as n: ...; n[0]`."""
    count = [0]

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
