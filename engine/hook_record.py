"""One request's captured rows (hidden states of the asked layers, routed experts), one per token
position the model computed, in position order: a chunk recomputed after a preemption adds only
the positions not yet held, so nothing is duplicated however the engine chunked or preempted it."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class HookRecord:
    """Rows of positions [0, rows): hidden-state chunks [n, len(layers), D] and routed-expert chunks
    [n, num_moe_layers, k]; each list stays empty when not asked."""

    layers: tuple[int, ...]
    routed: bool
    hidden_chunks: list[np.ndarray] = dataclasses.field(default_factory=list)
    routed_chunks: list[np.ndarray] = dataclasses.field(default_factory=list)
    rows: int = 0

    def extend(self, start: int, hidden: np.ndarray | None, routed: np.ndarray | None) -> None:
        """Add the rows of positions [start, start + n) past those held (start <= rows: no gap)."""
        n = len(hidden) if hidden is not None else len(routed)
        assert start <= self.rows, f"captured rows would skip positions [{self.rows}, {start})"
        skip = self.rows - start
        if skip >= n:
            return
        if self.layers:
            self.hidden_chunks.append(hidden[skip:])
        if self.routed:
            self.routed_chunks.append(routed[skip:])
        self.rows += n - skip

    def inherit(self, parent: HookRecord, rows: int) -> None:
        """Take a parent sequence's first `rows` rows (a sibling of n > 1 shares its prompt pages)."""
        if rows > self.rows:
            hidden = np.concatenate(parent.hidden_chunks)[:rows] if self.layers else None
            routed = np.concatenate(parent.routed_chunks)[:rows] if self.routed else None
            self.extend(0, hidden, routed)

    def hidden_states(self) -> dict[int, np.ndarray] | None:
        """{layer: [rows, D]} (None when no layer was asked)."""
        if not self.layers:
            return None
        stacked = _concat(self.hidden_chunks, (0, len(self.layers), 0))
        return {layer: stacked[:, i] for i, layer in enumerate(self.layers)}

    def routed_experts(self) -> np.ndarray | None:
        """[rows, num_moe_layers, k] int (None when not asked)."""
        return _concat(self.routed_chunks, (0, 0, 0)) if self.routed else None


def _concat(chunks: list[np.ndarray], empty: tuple[int, ...]) -> np.ndarray:
    """The chunks end to end (an empty array of shape `empty` when there are none)."""
    return np.concatenate(chunks) if chunks else np.zeros(empty, np.float32)
