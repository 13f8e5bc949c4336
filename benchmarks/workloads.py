"""Prompt builders for the serving benchmark: seeded random-token prompts and output lengths, so every
system gets the same requests; InferenceMAX's fixed shapes (8k/1k ...), scaled down for a CPU; a
shared prefix before every prompt; multi-turn replays whose requests resend the conversation so far;
and agentic sessions, whose every turn resends the conversation plus a user message and a tool result."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    """Prompts and their output lengths."""

    prompts: list[list[int]]
    output_lens: list[int]


def uniform_lengths(rng: np.random.Generator, n: int, length: int, ratio: float) -> np.ndarray:
    """n integers uniform in [max(1, floor(ratio * length)), length]."""
    return rng.integers(max(1, int(ratio * length)), length + 1, size=n)


def make_workload(seed: int, n: int, isl: int, osl: int, ratio: float, vocab_size: int, stream: int = 0,
                  shared_prefix_len: int = 0, num_turns: int = 1) -> Workload:
    """Deterministic in (seed, stream): the same call gives the same prompts to every system. The
    prompts start with the seed's shared prefix; num_turns > 1 makes them multi-turn replays."""
    rng = np.random.default_rng([seed, stream])
    input_lens = uniform_lengths(rng, n, isl, ratio)
    output_lens = [int(x) for x in uniform_lengths(rng, n, osl, ratio)]
    prompts = [rng.integers(0, vocab_size, size=int(m)).tolist() for m in input_lens]
    if num_turns > 1:
        replies = [rng.integers(0, vocab_size, size=m).tolist() for m in output_lens]
        prompts, output_lens = multi_turn(prompts, replies, num_turns)
    prefix = shared_prefix(seed, shared_prefix_len, vocab_size)
    return Workload([prefix + p for p in prompts], output_lens)


# InferenceMAX's sequence-length shapes: (ISL, OSL) maxima, lengths uniform in [r*L, L] as any random workload.
SHAPES = {"1k1k": (1024, 1024), "1k8k": (1024, 8192), "8k1k": (8192, 1024)}


def shape_lengths(shape: str, scale: float = 1.0) -> tuple[int, int]:
    """A named shape's (ISL, OSL) maxima times `scale` (rounded, at least 1): 8k1k at 1/16 is
    (512, 64), the same 8:1 ratio; the range ratio is the workload's as for any random prompts."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: one of {sorted(SHAPES)}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return tuple(max(1, round(n * scale)) for n in SHAPES[shape])


def max_model_len(isl: int, osl: int, shared_prefix_len: int, num_turns: int, tool_result_len: int = 0) -> int:
    """The longest request a workload makes: the prefix, then every turn's input (and tool result) and output."""
    return shared_prefix_len + num_turns * (isl + tool_result_len + osl)


def shared_prefix(seed: int, length: int, vocab_size: int) -> list[int]:
    """The `length` random tokens every prompt of a workload starts with (a system prompt); one per seed."""
    return np.random.default_rng([seed, 2**31]).integers(0, vocab_size, size=length).tolist()


def multi_turn(user_turns: list[list[int]], replies: list[list[int]],
               num_turns: int) -> tuple[list[list[int]], list[int]]:
    """Replayed conversations of `num_turns` turns (T): conversation c is user_turns[c*T:(c+1)*T]
    answered by the recorded replies[c*T:(c+1)*T]; its turn t resends u_1 a_1 ... u_{t-1} a_{t-1} u_t
    and generates len(a_t) tokens. Returns prompts and output lengths turn by turn (every
    conversation's first turn, then every second ...), so a turn follows its conversation's last."""
    if num_turns < 1:
        raise ValueError(f"num_turns must be >= 1, got {num_turns}")
    prompts = []
    for c in range(0, len(user_turns), num_turns):
        history = []
        for u, a in zip(user_turns[c:c + num_turns], replies[c:c + num_turns]):
            prompts.append(history + u)
            history = history + u + a
    order = turn_major_order(len(prompts), num_turns)
    return [prompts[i] for i in order], [len(replies[i]) for i in order]


def turn_major_order(n: int, num_turns: int) -> list[int]:
    """Indices of n conversation-major requests (T = num_turns per conversation) sorted by turn."""
    return sorted(range(n), key=lambda i: (i % num_turns, i // num_turns))


@dataclasses.dataclass(frozen=True)
class AgentTurn:
    """One turn of an agentic session: the new user message and tool result it sends, the reply
    recorded for it (what later turns resend as the assistant's message; this turn generates
    len(reply) tokens) and the think time before it is sent."""

    user: list[int]
    tool_result: list[int]
    reply: list[int]
    think_s: float


@dataclasses.dataclass(frozen=True)
class AgentSession:
    """A system prompt and T turns; turn t's request is the whole conversation so far,
    system u_0 r_0 a_0 ... u_{t-1} r_{t-1} a_{t-1}, then u_t r_t (user message, tool result; a_t
    the recorded reply). Consecutive requests share all of the earlier one: the prefix cache's to serve."""

    system: list[int]
    turns: list[AgentTurn]

    def prompt(self, t: int) -> list[int]:
        tokens = list(self.system)
        for turn in self.turns[:t]:
            tokens += turn.user + turn.tool_result + turn.reply
        return tokens + self.turns[t].user + self.turns[t].tool_result

    def output_len(self, t: int) -> int:
        return len(self.turns[t].reply)


def think_times(rng: np.random.Generator, n: int, mean_s: float, dist: str) -> list[float]:
    """n think times of mean `mean_s` seconds: all equal (fixed) or exponential."""
    if dist not in ("fixed", "exponential"):
        raise ValueError(f"think time distribution must be fixed or exponential, got {dist!r}")
    if mean_s < 0:
        raise ValueError(f"think time must be >= 0, got {mean_s}")
    if dist == "fixed" or mean_s == 0:
        return [float(mean_s)] * n
    return [float(x) for x in rng.exponential(mean_s, size=n)]


def agentic_sessions(seed: int, num_sessions: int, num_turns: int, user_len: int, tool_result_len: int, osl: int,
                     ratio: float, vocab_size: int, stream: int = 0, shared_prefix_len: int = 0,
                     think_time_s: float = 0.0, think_time_dist: str = "fixed") -> list[AgentSession]:
    """Deterministic in (seed, stream): `num_sessions` sessions of `num_turns` turns, user messages,
    tool results and replies of random tokens with lengths uniform in [r*L, L] (a tool result of
    length 0 is none), every session starting with the seed's shared prefix (the system prompt,
    as make_workload's). The first turn has no think time."""
    if num_turns < 1 or num_sessions < 0:
        raise ValueError(f"need num_turns >= 1 and num_sessions >= 0, got {num_turns}, {num_sessions}")
    rng = np.random.default_rng([seed, stream, 1])
    system = shared_prefix(seed, shared_prefix_len, vocab_size)
    n = num_sessions * num_turns
    user_lens, reply_lens = uniform_lengths(rng, n, user_len, ratio), uniform_lengths(rng, n, osl, ratio)
    tool_lens = uniform_lengths(rng, n, tool_result_len, ratio) if tool_result_len > 0 else np.zeros(n, int)
    thinks = think_times(rng, n, think_time_s, think_time_dist)

    def tokens(m: int) -> list[int]:
        return rng.integers(0, vocab_size, size=int(m)).tolist()

    sessions = []
    for s in range(num_sessions):
        turns = [AgentTurn(tokens(user_lens[i]), tokens(tool_lens[i]), tokens(reply_lens[i]),
                           0.0 if t == 0 else thinks[i])
                 for t, i in enumerate(range(s * num_turns, (s + 1) * num_turns))]
        sessions.append(AgentSession(system, turns))
    return sessions
