"""Speculation counters of one request (or, summed, of a benchmark point): drafts proposed and
accepted, overall and by draft position."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SpecMetrics:
    """Verify steps, drafts proposed and accepted; by position i: drafts at i proposed and accepted."""

    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    proposed_by_position: list[int] = dataclasses.field(default_factory=list)
    accepted_by_position: list[int] = dataclasses.field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """One verify step of `num_drafts` drafts, of which the first `num_accepted` were accepted."""
        grow = num_drafts - len(self.proposed_by_position)
        if grow > 0:
            self.proposed_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        self.steps += 1
        self.proposed += num_drafts
        self.accepted += num_accepted
        for i in range(num_drafts):
            self.proposed_by_position[i] += 1
            self.accepted_by_position[i] += i < num_accepted

    def merge(self, other: "SpecMetrics") -> None:
        """Add another request's counts (a benchmark point's totals)."""
        for i in range(len(other.proposed_by_position)):
            if i >= len(self.proposed_by_position):
                self.proposed_by_position.append(0)
                self.accepted_by_position.append(0)
            self.proposed_by_position[i] += other.proposed_by_position[i]
            self.accepted_by_position[i] += other.accepted_by_position[i]
        self.steps += other.steps
        self.proposed += other.proposed
        self.accepted += other.accepted

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens emitted per verify step: 1 + accepted drafts (vLLM's mean acceptance length)."""
        return 1 + self.accepted / self.steps if self.steps else None

    @property
    def acceptance_rate_by_position(self) -> list[float]:
        return [a / p for a, p in zip(self.accepted_by_position, self.proposed_by_position)]

    def summary(self) -> dict:
        """The JSON record: counts and the derived rates."""
        return {**dataclasses.asdict(self), "acceptance_rate": self.acceptance_rate,
                "mean_acceptance_length": self.mean_acceptance_length,
                "acceptance_rate_by_position": self.acceptance_rate_by_position}
