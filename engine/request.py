"""Request state, sampling parameters and outputs; parameters validate themselves on construction."""

from __future__ import annotations

import dataclasses
import enum
import math
import time
import numpy as np

from engine.constraints import TokenConstraint
from engine.hook_params import Intervention, checked_fields
from engine.hook_record import HookRecord
from engine.logits_processor import checked_form
from engine.penalties import LogitsRow
from engine.speculative.metrics import SpecMetrics
from engine.structured_output import StructuredOutputs

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
    n: int = 1  # sequences returned per prompt (engine/parallel_sampling.py)
    best_of: int | None = None  # sequences generated per prompt (None: n): the n of highest cumulative logprob return
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # per generated token: its logprob and the top-k alternatives' (vLLM)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    # Penalties and biases (engine/penalties.py): OpenAI's presence/frequency over generated tokens,
    # vLLM's repetition over prompt + generated (1: off), logit_bias {token id: bias} clamped to
    # [-100, 100]; min_tokens before EOS, stop_token_ids or a stop string may end the output;
    # bad_words never generated (engine/bad_words.py); allowed_token_ids: the only tokens sampled.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    min_tokens: int = 0
    bad_words: tuple[str, ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    structured_outputs: StructuredOutputs | None = None  # the output held to a JSON schema, regex, choice or grammar
    # vLLM's: False keeps special tokens in the text (tool-call and reasoning markers some formats
    # make special, e.g. gpt-oss harmony's); the token that stops the output is never in it.
    skip_special_tokens: bool = True
    # {processor name: {argument: value}}: the engine's registered logits processors this request
    # runs and their per-row arguments (engine/logits_processor.py; checked by LLM.add_request).
    logits_processor_args: dict[str, dict] = dataclasses.field(default_factory=dict)
    # Research hooks (engine/hook_params.py, models/hooks.py): the residual stream of these layers
    # (transformers' output_hidden_states numbering) in RequestOutput.hidden_states; edits of it;
    # the experts each token was routed to (a MoE model) in RequestOutput.routed_experts.
    capture_layers: tuple[int, ...] = ()
    interventions: tuple[Intervention, ...] = ()
    return_routed_experts: bool = False

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p"):
            object.__setattr__(self, name, _checked_float(name, getattr(self, name)))
        for name in ("top_k", "max_tokens"):
            object.__setattr__(self, name, _checked_int(name, getattr(self, name)))
        object.__setattr__(self, "ignore_eos", _checked_bool("ignore_eos", self.ignore_eos))
        object.__setattr__(self, "skip_special_tokens", _checked_bool("skip_special_tokens", self.skip_special_tokens))
        for name in ("logprobs", "prompt_logprobs"):
            object.__setattr__(self, name, _checked_num_logprobs(name, getattr(self, name)))
        if self.seed is not None:
            object.__setattr__(self, "seed", _checked_int("seed", self.seed))
        object.__setattr__(self, "stop", _checked_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _checked_stop_token_ids(self.stop_token_ids))
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise ValueError(f"structured_outputs must be StructuredOutputs, got {self.structured_outputs!r:.80}")
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
        self._check_parallel()
        self._check_penalties()
        for name, value in zip(("capture_layers", "interventions", "return_routed_experts"),
                               checked_fields(self.capture_layers, self.interventions, self.return_routed_experts)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "logits_processor_args", checked_form(self.logits_processor_args))

    @property
    def hooked(self) -> bool:
        """Whether it asks for a research hook: such a request runs one token per call, computes its
        whole prompt (no prefix-cache hits) and, with interventions, never shares its pages."""
        return bool(self.capture_layers or self.interventions or self.return_routed_experts)

    def _check_parallel(self) -> None:
        """n >= 1 and best_of (None: n) >= n, as ints: a ValueError names the field."""
        object.__setattr__(self, "n", _checked_int("n", self.n))
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.best_of is not None:
            object.__setattr__(self, "best_of", _checked_int("best_of", self.best_of))
            if self.best_of < self.n:
                raise ValueError(f"best_of must be >= n ({self.n}), got {self.best_of}")

    def _check_penalties(self) -> None:
        """Penalties in range, logit_bias {int: clamped float}, min_tokens <= max_tokens, bad_words as
        non-empty strings, allowed_token_ids non-empty: a ValueError names the field (token ids'
        upper bound, the vocabulary, is checked by LLM.add_request)."""
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            object.__setattr__(self, name, _checked_float(name, getattr(self, name)))
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}")
        object.__setattr__(self, "logit_bias", _checked_logit_bias(self.logit_bias))
        object.__setattr__(self, "min_tokens", _checked_int("min_tokens", self.min_tokens))
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        object.__setattr__(self, "bad_words", _checked_strings("bad_words", self.bad_words))
        if self.allowed_token_ids is not None:
            ids = _checked_token_ids("allowed_token_ids", self.allowed_token_ids)
            if not ids:
                raise ValueError("allowed_token_ids must not be empty (None: every token)")
            object.__setattr__(self, "allowed_token_ids", ids)

    def logits_row(self, banned: tuple[int, ...], eos: tuple[int, ...], track_counts: bool = False) -> LogitsRow | None:
        """This request's penalties and biases for its device row (engine/penalties.py), given its
        single-token bad words, the model's EOS ids and whether a logits processor it names reads its
        token counts; None when it asks for none (no slot)."""
        row = LogitsRow(self.presence_penalty, self.frequency_penalty, self.repetition_penalty,
                        dict(self.logit_bias), self.allowed_token_ids, self.min_tokens, tuple(banned),
                        tuple(self.stop_token_ids) + (() if self.ignore_eos else tuple(eos)), track_counts)
        return row if row.asks() else None


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
    return _checked_token_ids("stop_token_ids", ids)


def _checked_token_ids(name: str, ids: object) -> tuple[int, ...]:
    """A list field of non-negative int token ids (the vocabulary bound is LLM.add_request's)."""
    checked = tuple(_checked_int(name, t) for t in _items(name, ids))
    bad = next((t for t in checked if t < 0), None)
    if bad is not None:
        raise ValueError(f"{name} must be >= 0, got {bad} in {name}={ids!r}")
    return checked


def _checked_strings(name: str, value: object) -> tuple[str, ...]:
    """A list field of non-empty strings (one str is a list of one)."""
    strings = (value,) if isinstance(value, str) else _items(name, value)
    for s in strings:
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"{name} must be non-empty strings, got {s!r} in {name}={value!r}")
    return strings


LOGIT_BIAS_LIMIT = 100.0  # a bias beyond +-100 is clamped to it (OpenAI's range, vLLM's clamp)


def _checked_logit_bias(bias: object) -> dict[int, float]:
    """{token id >= 0: bias clamped to [-100, 100]} from a dict of int ids and finite numbers (None: {})."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict {{token id: bias}}, got {bias!r} ({type(bias).__name__})")
    checked = {}
    for token, value in bias.items():
        token = _checked_token_ids("logit_bias", [token])[0]
        value = _checked_float("logit_bias", value)
        checked[token] = min(max(value, -LOGIT_BIAS_LIMIT), LOGIT_BIAS_LIMIT)
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
    index: int = 0  # its place among its prompt's n outputs (engine/parallel_sampling.py)
    cumulative_logprob: float | None = None  # the sum of its tokens' logprobs, when they were computed
    # params.capture_layers: {layer: [tokens, D]} per computed position (prompt, then each generated
    # token but the last, which no step fed back), as transformers' output_hidden_states
    hidden_states: dict[int, np.ndarray] | None = None
    routed_experts: np.ndarray | None = None  # params.return_routed_experts: [tokens, num_moe_layers, k]


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
    index: int = 0  # its place among its prompt's sequences (n or best_of > 1; seeded seed + index)
    parent: Request | None = dataclasses.field(default=None, repr=False)  # index > 0: its prompt's first
    # sequence, whose prompt pages it shares (engine/scheduler.py)
    constraint: TokenConstraint | None = None  # host state restricting its next token (engine/constraints.py)
    logits_row: LogitsRow | None = None  # its penalties and biases, when it asks for any (engine/penalties.py)
    sampling_slot: int = 0  # its row of the device penalty tables while running (0: the null row)
    slot_lease: int = 0  # which holding of sampling_slot this is (the runner writes a new lease's row)
    hook_record: HookRecord | None = None  # its captured rows, when it asks (engine/hook_record.py)

    def __post_init__(self) -> None:
        self.prefill_target = len(self.prompt_token_ids)
        if self.params.capture_layers or self.params.return_routed_experts:
            self.hook_record = HookRecord(self.params.capture_layers, self.params.return_routed_experts)

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
                             self.error, list(self.prompt_logprobs) if asked[1] else None, index=self.index,
                             cumulative_logprob=cumulative_logprob(self.output_logprobs) if asked[0] else None,
                             hidden_states=self.hook_record and self.hook_record.hidden_states(),
                             routed_experts=self.hook_record and self.hook_record.routed_experts())


def cumulative_logprob(entries: list[dict[int, float]]) -> float:
    """The sum of the chosen tokens' logprobs: each entry's first item (engine/output_processor.py)."""
    return sum(next(iter(e.values())) for e in entries)
