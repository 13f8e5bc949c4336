"""References for checking the engine: random prompts, and greedy continuations through the model's
no-cache forward (what the paged, batched, chunked engine steps must reproduce token for token)."""

import numpy as np

from models import LoadedModel


def random_prompts(seed: int, n: int, vocab: int, low: int, high: int) -> list[list[int]]:
    """n prompts of random ids in [0, vocab), their lengths in [low, high)."""
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, rng.integers(low, high))] for _ in range(n)]


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
