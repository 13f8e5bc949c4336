"""Request state, sampling parameters and outputs; parameters validate themselves on construction."""

from __future__ import annotations

import dataclasses
import enum
import time


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
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter) of a request; derived latencies in seconds."""

    arrival: float
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)

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
    logprobs: list[float] | None = None
    error: str | None = None  # finish_reason "error": what failed


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
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    prefill_target: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""
    metrics: RequestMetrics = dataclasses.field(default_factory=lambda: RequestMetrics(time.perf_counter()))

    def __post_init__(self) -> None:
        self.prefill_target = len(self.prompt_token_ids)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.prefill_target

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt_token_ids, self.text, list(self.output_token_ids),
                             self.finish_reason, self.metrics,
                             list(self.output_logprobs) if self.params.logprobs else None, self.error)
