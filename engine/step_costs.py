"""What the engine's steps cost, measured as they run: a line fitted to a step's seconds against its
flat tokens, and the seconds per token of decode-only calls of one step and of decode_steps steps,
per batch bucket, over the engine's whole cycle (the step, then whatever its caller does before
the next one: a server publishing tokens). The scheduler's two adaptive policies read it: how many
prefill tokens a step may carry beside decodes (their inter-token latency), and whether a
decode-only call runs one step (each token streamed as soon as it is sampled) or decode_steps
(bursts of tokens, fewer host round trips). Pure Python: no JAX; LLM.step records every step.
"""

from __future__ import annotations

import dataclasses

MIN_OBSERVATIONS = 8  # steps seen before a policy trusts the measurements
_FREE_TOKENS = 1e6  # a step whose per-token cost times this is within its fixed cost: tokens cost nothing
_DECODE_EMA = 0.1  # weight of the newest decode-only call in its averages (host, device, cycle)
MIN_DECODE_CALLS = 3  # calls of a (batch bucket, steps) timed before the policy compares it
EXPLORE_EVERY = 32  # decode calls per batch bucket between re-timings of the slower kind


@dataclasses.dataclass
class StepCosts:
    """Exponentially weighted statistics of recent steps (weight `decay` per newer step): a least-squares
    line seconds = fixed + per_token * tokens over every step (a multi-step call counts as its steps,
    each of `rows` tokens), the host and device seconds of decode-only calls (reported), and their
    whole cycles' seconds per token by (batch bucket, steps) (the multi-step choice)."""

    decay: float = 0.97
    observations: int = 0
    _w: float = 0.0  # weighted sums for the line
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0
    _decode_calls: int = 0
    _host_s: float = 0.0  # EMA of a decode-only call's host seconds
    _device_s: float = 0.0  # EMA of a decode-only call's device seconds per step
    _cycles: dict = dataclasses.field(default_factory=dict)  # (rows bucket, steps) -> [EMA s per token-step, calls]

    def observe(self, tokens: int, seconds: float, wait_s: float, steps: int = 1, decode_only: bool = False) -> None:
        """One call of `steps` steps of `tokens` flat tokens each, `seconds` wall, `wait_s` of them
        blocked on the device's results."""
        per_step = seconds / steps
        self._w = self.decay * self._w + 1.0
        self._x = self.decay * self._x + tokens
        self._y = self.decay * self._y + per_step
        self._xx = self.decay * self._xx + tokens * tokens
        self._xy = self.decay * self._xy + tokens * per_step
        self.observations += 1
        if decode_only:
            a = 1.0 if self._decode_calls == 0 else _DECODE_EMA
            host, device = max(0.0, seconds - wait_s), wait_s / steps
            self._host_s += a * (host - self._host_s)
            self._device_s += a * (device - self._device_s)
            self._decode_calls += 1

    def line(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token) of a step, None until enough steps of different sizes."""
        if self.observations < MIN_OBSERVATIONS:
            return None
        var = self._xx / self._w - (self._x / self._w) ** 2
        if var <= 1.0:  # every step had (nearly) the same tokens: no slope to read
            return None
        slope = (self._xy / self._w - self._x * self._y / self._w ** 2) / var
        fixed = self._y / self._w - slope * self._x / self._w
        return max(fixed, 0.0), slope

    def max_tokens(self, decode_tokens: int, ratio: float) -> float | None:
        """Most flat tokens a step may hold to take at most `ratio` times a step of `decode_tokens`:
        (ratio - 1) * fixed / per_token + ratio * decode_tokens. None: no bound (not measured yet, or
        tokens cost nothing measurable)."""
        line = self.line()
        if line is None or line[1] * _FREE_TOKENS <= line[0]:
            return None
        fixed, per_token = line
        return (ratio - 1.0) * fixed / per_token + ratio * decode_tokens

    def observe_cycle(self, rows: int, steps: int, seconds: float) -> None:
        """A decode-only call of `steps` steps over `rows` (its batch bucket) and `seconds` from its
        start to the next step's start, the engine busy all along. The first of each kind is only
        counted: it may have compiled."""
        ema = self._cycles.setdefault((rows, steps), [0.0, 0])
        ema[0] = seconds / steps if ema[1] == 1 else ema[0] + _DECODE_EMA * (seconds / steps - ema[0])
        ema[1] += 1

    def decode_steps(self, rows: int, most: int, min_gain: float) -> int:
        """The steps a decode-only call over `rows` should run: `most` where that was measured at least
        `min_gain` faster per token than one step, else 1; a kind timed fewer than MIN_DECODE_CALLS
        times runs first (one step before `most`), and every EXPLORE_EVERY calls the other kind runs
        once, so the choice follows the machine's load."""
        one, many = self._cycles.get((rows, 1), [0.0, 0]), self._cycles.get((rows, most), [0.0, 0])
        for steps, (_, calls) in ((1, one), (most, many)):
            if calls < MIN_DECODE_CALLS:
                return steps
        best, other = (most, 1) if many[0] * (1.0 + min_gain) < one[0] else (1, most)
        return other if (one[1] + many[1]) % EXPLORE_EVERY == 0 else best

    def host_share(self) -> float | None:
        """The host's share of a one-step decode call (what running decode_steps steps per call could
        save at most; scripts/profile_serving.py reports it), None before MIN_OBSERVATIONS decode-only
        calls."""
        if self._decode_calls < MIN_OBSERVATIONS:
            return None
        total = self._host_s + self._device_s
        return self._host_s / total if total > 0 else None
