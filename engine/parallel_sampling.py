"""Parallel sampling: a prompt's `n` (or `best_of`) sequences, and which of them it returns.

A request with n > 1 or best_of > 1 runs best_of (default n) sequences. Sequence i is seeded
`seed + i` (mod 2**32) when the params fix a seed, so it equals a single request with that seed;
without one each draws its own. They share one prefill: sequence 0 computes the prompt, and the
others, admitted once it has, take its full prompt pages by reference and compute only the tail
past the last full page (engine/scheduler.py; no prefix cache needed). With best_of > n the n of
highest cumulative logprob return, best first, re-indexed 0..n-1 (vLLM's former best_of); with
best_of == n (or None) all return in index order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from engine.request import Request, RequestOutput, SamplingParams


def num_sequences(params: SamplingParams) -> int:
    """How many sequences the params run: best_of, else n."""
    return params.best_of or params.n


def sequence_seed(seed: int, index: int) -> int:
    """Sequence `index`'s seed: the request's seed + index, wrapped into the sampler's uint32."""
    return (seed + index) % 2**32


def sequence_params(params: SamplingParams) -> SamplingParams:
    """The params each sequence runs with: best_of > n ranks by cumulative logprob, so it needs the
    chosen tokens' logprobs (logprobs=0, free: the sampler always computes them)."""
    if num_sequences(params) > params.n and params.logprobs is None:
        return dataclasses.replace(params, logprobs=0)
    return params


def selected(scores: Sequence[float | None], n: int) -> list[int]:
    """Which of a prompt's sequences return, in order: all in index order when there are n, else
    the n with the highest scores (cumulative logprobs), best first, None (a failed one) last."""
    if len(scores) == n:
        return list(range(n))
    return sorted(range(len(scores)), key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))[:n]


def outputs(sequences: list[Request], params: SamplingParams) -> list[RequestOutput]:
    """A finished prompt's n outputs, ordered and indexed by `selected` (logprobs computed only for
    ranking are dropped)."""
    finished = [r.output() for r in sequences]
    scores = [None if o.finish_reason == "error" else o.cumulative_logprob for o in finished]
    chosen = [finished[i] for i in selected(scores, params.n)]
    keep = params.logprobs is not None
    return [dataclasses.replace(o, index=rank, logprobs=o.logprobs if keep else None,
                                cumulative_logprob=o.cumulative_logprob if keep else None)
            for rank, o in enumerate(chosen)]
