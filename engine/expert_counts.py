"""Tokens routed to each (MoE layer, expert): running totals, and the sum over the last `window`
steps that computed routing. A token computed twice (recomputed after a preemption) counts twice:
this is the experts' load, not a per-request statistic."""

from __future__ import annotations

import collections

import numpy as np


class ExpertCounts:
    """Counts [num_moe_layers, num_experts] int64, fed one step's routed expert ids at a time."""

    def __init__(self, num_moe_layers: int, num_experts: int, window: int = 1024):
        self.shape = (num_moe_layers, num_experts)
        self.total = np.zeros(self.shape, np.int64)
        self._recent: collections.deque[np.ndarray] = collections.deque(maxlen=window)
        self._window = np.zeros(self.shape, np.int64)  # the sum of _recent, kept as steps come and go

    def add(self, ids: np.ndarray) -> None:
        """One step's routed experts [tokens, num_moe_layers, k] (real tokens only)."""
        layers, experts = self.shape
        flat = (np.arange(layers)[None, :, None] * experts + ids).reshape(-1)
        counts = np.bincount(flat, minlength=layers * experts).reshape(self.shape)
        self.total += counts
        if len(self._recent) == self._recent.maxlen:
            self._window -= self._recent[0]
        self._recent.append(counts)
        self._window += counts

    def window(self) -> np.ndarray:
        """The counts of the last `window` steps [num_moe_layers, num_experts]."""
        return self._window.copy()

    def summary(self) -> list[tuple[int, float, int]]:
        """Per MoE layer, bounded whatever the expert count (what /metrics shows): (token-expert
        assignments since the start, max / mean expert load over the window (1: balanced; 0 when
        nothing was routed), experts given no token in the window)."""
        window, total = self._window, self.total.sum(axis=1)
        means = window.mean(axis=1)
        return [(int(total[i]), float(window[i].max() / means[i]) if means[i] else 0.0, int((window[i] == 0).sum()))
                for i in range(self.shape[0])]
