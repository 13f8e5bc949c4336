"""Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023), batched on device.

Draft x_i at a position is accepted with probability min(1, p(x_i) / q(x_i)); at the first
rejection the token is drawn from normalize(max(0, p - q)) and the rest is dropped; when every
draft is accepted a bonus token is drawn from p at the next position. p and q are taken after the
same temperature / top-k / top-p / min-p transforms (engine/sampler.filtered_logits); greedy rows
accept an argmax match; q None means deterministic drafts (n-gram): a one-hot q.

Randomness is a function of (seed, position): the accept test at position P uses key(seed, P, 1),
the residual or bonus draw at P the sampler's own key(seed, P), so a row without a draft samples
exactly as without speculation and a request's tokens never depend on its batch neighbours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from engine.sampler import SamplingTensors, filtered_logits, sample_from_probs, uniforms

ACCEPT_TAG = 1  # the accept test's uniform: key(seed) folded with the position, then this tag


def verify_rows(logits: jax.Array, s: SamplingTensors, positions: jax.Array, drafts: jax.Array,
                q: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Per logits row [L]: whether its draft (-1: none) is accepted, and the token drawn there
    when it is not (the residual's sample after a rejection, p's sample on a row without a draft).

    logits [L, V]: the target's; s: sampling parameters per row; positions [L]: the position the
    drafted (or drawn) token occupies; q [L, V]: the draft's filtered probabilities, or None.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    has_draft = drafts >= 0
    x = jnp.maximum(drafts, 0)
    p = jax.nn.softmax(filtered_logits(logits, s), axis=-1)  # [L, V]
    q = jax.nn.one_hot(x, logits.shape[-1], dtype=p.dtype) if q is None else q
    p_x, q_x = (jnp.take_along_axis(a, x[:, None], axis=-1)[:, 0] for a in (p, q))
    accept = uniforms(s.seed, positions, ACCEPT_TAG) * q_x <= p_x  # P = min(1, p/q); never when p(x) = 0
    residual = jnp.where(has_draft[:, None], jnp.maximum(p - q, 0.0), p)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p)  # p == q: accepted anyway
    drawn = sample_from_probs(residual, uniforms(s.seed, positions))
    sampled = s.temperature > 0
    accepted = has_draft & jnp.where(sampled, accept, drafts == greedy)
    return accepted, jnp.where(sampled, drawn, greedy)


def accepted_tokens(accepted: jax.Array, drawn: jax.Array, drafts: jax.Array, seq_rows: jax.Array,
                    num_drafts: jax.Array, forced: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per sequence: its tokens [S, K+1] (the accepted drafts, then the drawn token) and their count [S].

    seq_rows [S, K+1]: the logits rows of each sequence's verify positions (padded with its last);
    num_drafts [S]; forced [S]: accept at least this many drafts whatever the test said (the
    synthetic benchmark mode; 0 otherwise).
    """
    k1 = seq_rows.shape[1]
    col = jnp.arange(k1)[None, :]
    ok = accepted[seq_rows] & (col < num_drafts[:, None])
    m = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
    m = jnp.minimum(jnp.maximum(m, forced), num_drafts)  # [S] accepted drafts
    last = jnp.take_along_axis(drawn[seq_rows], m[:, None], axis=1)  # [S, 1]
    tokens = jnp.where(col < m[:, None], drafts[seq_rows], jnp.where(col == m[:, None], last, 0))
    return tokens.astype(jnp.int32), (m + 1).astype(jnp.int32)
