"""N-gram (prompt lookup) proposer: the tokens that followed the latest earlier occurrence of the
sequence's last n tokens in prompt + output, n from prompt_lookup_max down to prompt_lookup_min."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from engine.scheduler import ScheduledRequest


def propose(tokens: np.ndarray, k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k draft tokens for `tokens` [L] (host-side, numpy); [] when no n-gram recurs."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        windows = sliding_window_view(tokens[:length - 1], n)  # starts 0..L-1-n: each has a follower
        hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


class NgramProposer:
    """Prompt-lookup drafts on the host; deterministic, so the verify step takes q one-hot."""

    def __init__(self, n_max: int, n_min: int):
        self.n_max, self.n_min = n_max, n_min

    def propose(self, scheduled: list[ScheduledRequest], slots: list[int]) -> tuple[list[list[int]], None]:
        return [propose(np.asarray(s.request.tokens, np.int32), n, self.n_max, self.n_min) if n else []
                for s, n in zip(scheduled, slots)], None

    def observe(self, *args) -> None:
        del args

    def warmup(self) -> int:
        return 0
