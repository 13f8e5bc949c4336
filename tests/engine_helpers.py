"""Shared helpers for engine tests: a reference greedy decoder through the no-cache forward."""

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
