"""Prompt builders for the serving benchmark: seeded random-token prompts and output lengths, so every
system gets the same requests; a shared prefix before every prompt, and multi-turn replays whose
requests resend the conversation so far."""

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


def max_model_len(isl: int, osl: int, shared_prefix_len: int, num_turns: int) -> int:
    """The longest request a workload makes: the prefix, then every turn's input and output."""
    return shared_prefix_len + num_turns * (isl + osl)


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
