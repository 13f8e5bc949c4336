"""The synthetic proposer (benchmarks only, not lossless): every reserved slot gets a copy of the
last token; the verify step then accepts `acceptance_length - 1` drafts on average regardless
(engine/speculative/verify.py), so a run costs what a model of that acceptance would."""

from __future__ import annotations

from engine.scheduler import ScheduledRequest


class SyntheticProposer:
    def propose(self, scheduled: list[ScheduledRequest], slots: list[int]) -> tuple[list[list[int]], None]:
        return [[s.request.last_token] * n for s, n in zip(scheduled, slots)], None

    def observe(self, *args) -> None:
        del args

    def warmup(self) -> int:
        return 0
