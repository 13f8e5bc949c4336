"""Request state, sampling parameters and outputs; parameters validate themselves on construction."""

from __future__ import annotations

import dataclasses
import enum
import math
import time

import numpy as np

from engine.speculative.metrics import SpecMetrics

MAX_LOGPROBS = 20  # the most top-k alternatives a request may ask for: the device computes this many

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 is greedy; top_k -1 (or 0) disables top-k."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # per generated token: its logprob and the top-k alternatives' (vLLM)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p"):
            object.__setattr__(self, name, _checked_float(name, getattr(self, name)))
        for name in ("top_k", "max_tokens"):
            object.__setattr__(self, name, _checked_int(name, getattr(self, name)))
        object.__setattr__(self, "ignore_eos", _checked_bool("ignore_eos", self.ignore_eos))
        for name in ("logprobs", "prompt_logprobs"):
            object.__setattr__(self, name, _checked_num_logprobs(name, getattr(self, name)))
        if self.seed is not None:
            object.__setattr__(self, "seed", _checked_int("seed", self.seed))
        object.__setattr__(self, "stop", _checked_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _checked_stop_token_ids(self.stop_token_ids))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not -1 <= self.top_k < 2**31:  # the sampler holds it as an int32
            raise ValueError(f"top_k must be -1 (disabled) or in [0, 2**31), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


def is_int(value: object) -> bool:
    """A Python or NumPy integer; bools are not (True would silently be token id 1)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _checked_int(name: str, value: object) -> int:
    """value as a Python int, or a ValueError naming the field."""
    if not is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _checked_num_logprobs(name: str, value: object) -> int | None:
    """None (not asked) or a count of alternatives in [0, MAX_LOGPROBS] (0: the chosen token's only)."""
    if value is None:
        return None
    k = _checked_int(name, value)
    if not 0 <= k <= MAX_LOGPROBS:
        raise ValueError(f"{name} must be None or in [0, {MAX_LOGPROBS}], got {k}")
    return k


def _checked_float(name: str, value: object) -> float:
    """value (a real number, not a bool) as a finite Python float, or a ValueError naming the field."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def _checked_bool(name: str, value: object) -> bool:
    """value (a Python or NumPy bool) as a bool: 0, 1 or "no" are refused rather than guessed at."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def is_sequence(value: object) -> bool:
    """A list, tuple or 1-D NumPy array: what a list-valued field or a token-id prompt may be."""
    return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)


def _items(name: str, value: object) -> tuple:
    """The elements of a list-valued field (None is empty)."""
    if value is None:
        return ()
    if is_sequence(value):
        return tuple(value)
    raise ValueError(f"{name} must be a list, got {value!r} ({type(value).__name__})")


def _checked_stop(stop: object) -> tuple[str, ...]:
    """Non-empty stop strings (one str is a list of one): an empty one would stop every output at once."""
    stops = (stop,) if isinstance(stop, str) else _items("stop", stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty str, got {s!r} in stop={stop!r}")
    return stops


def _checked_stop_token_ids(ids: object) -> tuple[int, ...]:
    """Non-negative int ids (the upper bound, the vocabulary, is checked by LLM.add_request)."""
    checked = tuple(_checked_int("stop_token_ids", t) for t in _items("stop_token_ids", ids))
    bad = next((t for t in checked if t < 0), None)
    if bad is not None:
        raise ValueError(f"stop_token_ids must be >= 0, got {bad} in stop_token_ids={ids!r}")
    return checked


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter) of a request; derived latencies in seconds; its
    speculation counters (all zero without speculation)."""

    arrival: float
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    speculation: SpecMetrics = dataclasses.field(default_factory=SpecMetrics)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finished is None or len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


@dataclasses.dataclass
class RequestOutput:
    """What a finished (or streaming) request produced. token_ids are the generated ids only."""

    request_id: int
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    metrics: RequestMetrics
    # params.logprobs set: per generated token {token id: logprob} of it and the top-k alternatives
    logprobs: list[dict[int, float]] | None = None
    error: str | None = None  # finish_reason "error": what failed
    # params.prompt_logprobs set: the same per prompt token, None for the first (vLLM)
    prompt_logprobs: list[dict[int, float] | None] | None = None


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence's engine state. `tokens` = prompt + generated; the cache holds `num_computed`.

    Prefill runs while num_computed < prefill_target (the prompt, or after a preemption the whole
    sequence); then decode keeps num_computed == len(tokens) - 1 (the last token is the next input).
    """

    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    max_total_len: int  # prompt + output tokens this request may reach
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = dataclasses.field(default_factory=lambda: [None])
    pages: list[int] = dataclasses.field(default_factory=list)
    shard: int = 0  # the attention shard holding its pages (chosen at each admission; 0 without DP attention)
    page_keys: list[bytes] = dataclasses.field(default_factory=list)  # prefix keys of its leading full pages
    num_computed: int = 0
    prefill_target: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None  # what failed, when finish_reason is "error"
    text: str = ""
    metrics: RequestMetrics = dataclasses.field(default_factory=lambda: RequestMetrics(time.perf_counter()))

    def __post_init__(self) -> None:
        self.prefill_target = len(self.prompt_token_ids)

    @property
    def tokens(self) -> list[int]:
        """Prompt then output ids: a new list, O(length); the hot paths use num_tokens, last_token
        and tokens_between instead."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def tokens_between(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.prefill_target

    def output(self) -> RequestOutput:
        asked = self.params.logprobs is not None, self.params.prompt_logprobs is not None
        return RequestOutput(self.request_id, self.prompt_token_ids, self.text, list(self.output_token_ids),
                             self.finish_reason, self.metrics, list(self.output_logprobs) if asked[0] else None,
                             self.error, list(self.prompt_logprobs) if asked[1] else None)
