"""On-device sampling for a whole batch: greedy, temperature, top-k, top-p, min-p, per-request seeds.

A row's randomness is one uniform drawn from key(seed) folded with the position of the token being
sampled, so a request's tokens never depend on which other requests share its batch. Before any of
it a row's own rules apply (`processed_logits`): a host constraint's packed mask (engine/constraints.py),
then its penalties and biases (engine/penalties.py), then the engine's registered logits processors
(engine/logits_processor.py); logprobs stay the unprocessed model's.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from engine import penalties
from engine.logits_processor import ProcessorBatch
from engine.penalties import PenaltyTables
from engine.request import SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters [B]. top_k <= 0 disables top-k. slot: the row's sampling slot
    (engine/penalties.py; 0: none); allowed: a host constraint's packed masks [B, mask_words(V)],
    None when no row of the batch is constrained (a pytree without it: its own compiled variant);
    processors: the registered logits processors' per-row arguments (None: the engine has none)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array
    slot: jax.Array | None = None
    allowed: jax.Array | None = None
    processors: ProcessorBatch | None = None

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], rows: int,
              at: np.ndarray | None = None, slots: list[int] | None = None) -> "SamplingTensors":
        """Host-side arrays for `rows` rows, request i's at row at[i] (default: the first rows in
        order); padding rows are greedy, in the null slot."""
        def column(values: list, fill, dtype) -> np.ndarray:
            out = np.full((rows,), fill, dtype)
            out[np.arange(len(values)) if at is None else at] = values
            return out
        return cls(column([p.temperature for p in params], 0.0, np.float32),
                   column([p.top_k for p in params], -1, np.int32),
                   column([p.top_p for p in params], 1.0, np.float32),
                   column([p.min_p for p in params], 0.0, np.float32),
                   column(seeds, 0, np.uint32),
                   column([0] * len(params) if slots is None else slots, 0, np.int32))


def filtered_logits(logits: jax.Array, s: SamplingTensors) -> jax.Array:
    """Temperature-scaled logits [B, V] with -inf outside top-k, then top-p, then min-p."""
    scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
    needs_cut = jnp.any((s.top_k > 0) | (s.top_p < 1.0))
    scaled = jax.lax.cond(needs_cut, top_k_top_p, lambda x, _: x, scaled, s)
    probs = jax.nn.softmax(scaled, axis=-1)
    keep = probs >= s.min_p[:, None] * probs.max(axis=-1, keepdims=True)
    return jnp.where(keep, scaled, -jnp.inf)


def top_k_top_p(scaled: jax.Array, s: SamplingTensors) -> jax.Array:
    """scaled [B, V] with -inf outside each row's top-k, then outside its top-p nucleus (over the
    top-k's renormalised probabilities), ties at a threshold kept. The thresholds come from a
    32-step bisection over the float order (_smallest_key_below), not a sort: a sort of the
    vocabulary costs a CPU ~30x more, and the bisection is exact."""
    keys = _order_keys(scaled)
    k_on = (s.top_k > 0) & (s.top_k < scaled.shape[-1])
    counts = jnp.ones_like(scaled)
    kth = _smallest_key_below(keys, counts, jnp.where(k_on, s.top_k, scaled.shape[-1]).astype(jnp.float32))
    in_top_k = keys >= kth[:, None]
    masked = jnp.where(in_top_k, scaled, -jnp.inf)
    probs = jnp.exp(masked - jax.nn.logsumexp(masked, axis=-1, keepdims=True))
    nucleus = _smallest_key_below(keys, probs, jnp.where(s.top_p < 1.0, s.top_p, 2.0))
    return jnp.where(in_top_k & (keys >= nucleus[:, None]), scaled, -jnp.inf)


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (negative floats' bits inverted, positives' sign bit set)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _smallest_key_below(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row [B] the smallest key u with sum(weights[keys > u]) < target, by bisection on u's 32
    bits: the rank threshold a sort would find (top-k: weights 1, target k; top-p: probabilities,
    target top_p), 0 when every key qualifies."""

    def step(_, bounds):
        lo, hi = bounds  # sum above lo >= target > sum above hi (lo below every key when none fails)
        mid = lo + (hi - lo) // 2
        fails = jnp.sum(jnp.where(keys > mid[:, None], weights, 0.0), axis=-1) >= target
        return jnp.where(fails, mid, lo), jnp.where(fails, hi, mid)

    rows = keys.shape[0]
    lo, hi = jnp.zeros((rows,), jnp.uint32), jnp.full((rows,), 0xFFFFFFFF, jnp.uint32)
    everything = jnp.sum(weights, axis=-1) < target  # even the smallest key qualifies
    # A fori_loop: unrolled, XLA:CPU took minutes to compile the 32 steps under an eagerly called cond
    # (while the loop costs a CPU decode call ~1 ms of dispatch, measured with scripts/profile_step.py).
    lo, hi = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return jnp.where(everything, jnp.uint32(0), hi)


def uniforms(seeds: jax.Array, positions: jax.Array, tag: int = 0) -> jax.Array:
    """One uniform in (0, 1] per row from key(seed) folded with the position (and a nonzero `tag`
    for speculation's other draws: the accept test, the draft's own sample)."""
    def one(seed, pos):
        key = jax.random.fold_in(jax.random.key(seed), pos)
        return jax.random.uniform(jax.random.fold_in(key, tag) if tag else key)
    return 1.0 - jax.vmap(one)(seeds, positions)  # (0, 1]: never lands on a zero-probability token


def sample_from_probs(probs: jax.Array, u: jax.Array) -> jax.Array:
    """Inverse-CDF sample [B] from (unnormalised) probs [B, V] with uniforms u [B]."""
    cdf = jnp.cumsum(probs, axis=-1)
    index = jnp.sum(cdf < (u * cdf[:, -1])[:, None], axis=-1)
    return jnp.minimum(index, probs.shape[-1] - 1).astype(jnp.int32)


def _inverse_cdf_sample(logits: jax.Array, s: SamplingTensors, positions: jax.Array) -> jax.Array:
    """One uniform per row and a cumulative sum: cheaper than a Gumbel draw per vocab entry."""
    probs = jax.nn.softmax(filtered_logits(logits, s), axis=-1)
    return sample_from_probs(probs, uniforms(s.seed, positions))


def sample(logits: jax.Array, s: SamplingTensors, positions: jax.Array,
           tables: PenaltyTables | None = None) -> tuple[jax.Array, jax.Array]:
    """Token ids [B] and their log-probabilities under the unfiltered model distribution [B].

    positions [B]: the position the sampled token will occupy (its random stream index);
    tables: the penalty tables the rows' slots index (None: no penalties at all).
    """
    processed = processed_logits(logits, s, positions, tables)
    greedy = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    tokens = jax.lax.cond(jnp.all(s.temperature == 0), lambda: greedy,
                          lambda: jnp.where(s.temperature == 0, greedy, _inverse_cdf_sample(processed, s, positions)))
    return tokens, token_logprobs(logits, tokens)


def processed_logits(logits: jax.Array, s: SamplingTensors, positions: jax.Array, tables: PenaltyTables | None,
                     earlier: jax.Array | None = None) -> jax.Array:
    """float32 logits [B, V] under each row's own rules, before temperature and the cuts: -inf where
    its constraint's mask bit is clear, then its slot's biases, bans and penalties (earlier [B, K]:
    tokens generated since its counts were recorded, engine/penalties.apply), then the logits
    processors its request names."""
    logits = logits.astype(jnp.float32)
    if s.allowed is not None:
        logits = jnp.where(unpack_mask(s.allowed, logits.shape[-1]), logits, -jnp.inf)
    if tables is not None and s.slot is not None:
        logits = penalties.apply(logits, s.slot, positions, tables, earlier)
    if s.processors is not None:
        counts = None if tables is None or s.slot is None else partial(penalties.row_counts, tables, s.slot, earlier)
        logits = s.processors.apply(logits, positions, counts)
    return logits


def unpack_mask(words: jax.Array, vocab_size: int) -> jax.Array:
    """Packed bitmasks [B, W] (bit t % 32 of word t // 32: token t allowed) as bool [B, vocab_size]."""
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab_size].astype(bool)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Log-probabilities [B] of `tokens` [B] under the unfiltered model distribution of `logits` [B, V]."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


def top_logprobs(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k (static) most likely token ids [B, k] under the unfiltered distribution, and their logprobs."""
    values, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), k)
    return ids.astype(jnp.int32), values
