"""Prompt builders for prefix-sharing benchmark workloads: a shared prefix before every prompt, and
multi-turn replays whose requests resend the conversation so far."""

from __future__ import annotations

import numpy as np


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
