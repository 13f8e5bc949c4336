"""The verify step's rows: a speculative decode scores 1 + d tokens (its last token and d drafts)
and needs logits at every one of them; other sequences need logits at their last token only.

Logits rows are flat [L] (L = min(T, S * (K + 1)), a function of the token bucket, so no new
shape); `seq_rows [S, K + 1]` gathers each sequence's rows back for the acceptance prefix.

Penalties apply exactly at every verified position: a row's counts are its slot's plus the drafts
before it (`earlier`), as if those drafts had been sampled one by one. A constrained sequence
brings one mask per verified position (`allowed`, its drafts walked through its constraint).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from engine.penalties import PenaltyTables
from engine.sampler import SamplingTensors, processed_logits, uniforms
from engine.speculative.rejection import accepted_tokens, verify_rows

SYNTHETIC_TAG = 3  # the synthetic mode's per-step accept count: key(seed) folded with the position, this tag


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyRows:
    """Per logits row [L]: its sequence slot, the draft it verifies (-1: none) and that draft's
    index, the drafts before it [L, K] (-1: none); per sequence [S]: its rows [S, K + 1] and draft
    count; the draft's probabilities [S, K, V] (None for deterministic drafts); per logits row the
    constraint's packed mask [L, W] (None when no sequence is constrained)."""

    row_seq: jax.Array
    row_draft: jax.Array
    row_index: jax.Array
    seq_rows: jax.Array
    num_drafts: jax.Array
    draft_probs: jax.Array | None
    earlier: jax.Array
    allowed: jax.Array | None = None


def num_logits_rows(num_tokens: int, rows: int, k: int) -> int:
    return min(num_tokens, rows * (k + 1))


def build(ends: list[int], drafts: list[tuple[int, ...]], rows: int, k: int, num_tokens: int,
          draft_probs: jax.Array | None, masks: list[np.ndarray | None] | None = None
          ) -> tuple[np.ndarray, VerifyRows]:
    """Host arrays: the flat logits indices [L] and the rows of sequences whose last scheduled
    token is at `ends[i] - 1` of the flat batch with drafts[i] as its last len(drafts[i]) tokens;
    masks[i]: sequence i's constraint masks [1 + len(drafts[i]), W] or None (masks None: none is)."""
    size = num_logits_rows(num_tokens, rows, k)
    indices, row_seq, row_index = (np.zeros((size,), np.int32) for _ in range(3))
    row_draft = np.full((size,), -1, np.int32)
    earlier = np.full((size, k), -1, np.int32)
    seq_rows = np.zeros((rows, k + 1), np.int32)
    num_drafts = np.zeros((rows,), np.int32)
    r = 0
    for i, (end, d) in enumerate(zip(ends, drafts)):
        n = len(d) + 1
        indices[r:r + n] = np.arange(end - n, end)
        row_seq[r:r + n] = i
        row_draft[r:r + n - 1] = d
        row_index[r:r + n] = np.minimum(np.arange(n), k - 1)
        for j in range(1, n):
            earlier[r + j, :j] = d[:j]
        seq_rows[i] = r + np.minimum(np.arange(k + 1), n - 1)
        num_drafts[i] = n - 1
        r += n
    return indices, VerifyRows(row_seq, row_draft, row_index, seq_rows, num_drafts, draft_probs, earlier,
                               None if masks is None else _row_masks(masks, drafts, size))


def _row_masks(masks: list[np.ndarray | None], drafts: list[tuple[int, ...]], size: int) -> np.ndarray:
    """Per logits row its sequence's mask at that position [size, W]; unconstrained rows allow all."""
    words = next(m for m in masks if m is not None).shape[1]
    allowed = np.full((size, words), 0xFFFFFFFF, np.uint32)
    r = 0
    for m, d in zip(masks, drafts):
        if m is not None:
            allowed[r:r + len(d) + 1] = m
        r += len(d) + 1
    return allowed


def padding(num_tokens: int, rows: int, k: int, draft_probs: jax.Array | None) -> tuple[np.ndarray, VerifyRows]:
    """The rows of an all-padding batch (for compiling its bucket)."""
    return build([], [], rows, k, num_tokens, draft_probs)


def verify(logits: jax.Array, sampling: SamplingTensors, positions: jax.Array, v: VerifyRows,
           synthetic_accepts: float | None, tables: PenaltyTables | None = None
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Tokens [S, K + 1], their logprobs under the unfiltered model, and counts [S] of one verify step.

    positions [L]: where each row's token lands. synthetic_accepts: accept that many drafts on
    average whatever p and q say (benchmarks only: not lossless). tables: the penalty tables."""
    per_row = jax.tree.map(lambda a: a[v.row_seq], dataclasses.replace(sampling, allowed=None))
    per_row = dataclasses.replace(per_row, allowed=v.allowed)
    q = None if v.draft_probs is None else v.draft_probs[v.row_seq, v.row_index]
    processed = processed_logits(logits, per_row, positions, tables, v.earlier)
    accepted, drawn = verify_rows(processed, per_row, positions, v.row_draft, q)
    forced = jnp.zeros_like(v.num_drafts)
    if synthetic_accepts is not None:
        first = positions[v.seq_rows[:, 0]]
        forced = jnp.floor(synthetic_accepts + 1.0 - uniforms(sampling.seed, first, SYNTHETIC_TAG)).astype(jnp.int32)
    tokens, counts = accepted_tokens(accepted, drawn, v.row_draft, v.seq_rows, v.num_drafts, forced)
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[v.seq_rows, tokens]
    return tokens, logprobs, counts
