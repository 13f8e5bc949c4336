"""Penalties and biases on device: each request's row of persistent tables, found by its sampling slot.

A request asking for a presence, frequency or repetition penalty, a logit bias, allowed token ids,
single-token bad words or min_tokens (a `LogitsRow`) holds a sampling slot while it runs
(engine/sampling_slots.py). The runner writes the slot's row once per holding, from the host's
prompt and output tokens (so a preempted request, recomputed, never counts a token twice), and each
step adds the tokens it keeps to the row's counts on device (`record`), between the steps of a
multi-step decode call too. Rows without a slot read the null row 0 (no effect), and a batch in
which no row holds a slot skips the arithmetic (a lax.cond): it pays one tiny scatter per step.

The order is vLLM's: logit bias and bans (allowed ids, single-token bad words, stop ids before
min_tokens), then the repetition penalty (a token seen in the prompt or the output: its logit
divided by p if positive, else multiplied), then OpenAI's frequency (times the token's output
count) and presence (once it occurs in the output) penalties, subtracted.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

PROMPT, STOP = 1, 2  # flag bits: the token is in the prompt; it is a stop id (banned before min_tokens)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PenaltyTables:
    """Per slot [N, V] and [N] (or, as one row to write, [V] and scalars); slot 0 is the null row."""

    counts: jax.Array  # int32: how often each token was generated
    flags: jax.Array  # uint8: PROMPT | STOP bits
    bias: jax.Array  # float32: logit_bias; -inf outside allowed_token_ids and for single-token bad words
    presence: jax.Array  # float32
    frequency: jax.Array  # float32
    repetition: jax.Array  # float32 (1: off)
    min_end: jax.Array  # int32: stop ids are banned at positions below it (prompt length + min_tokens)

    @classmethod
    def null(cls, vocab: int, slots: tuple[int, ...] = ()) -> PenaltyTables:
        """Null rows (no effect): one row when `slots` is (), else the device tables of that many."""
        def zeros(dtype: type, *shape: int) -> np.ndarray:
            return np.zeros((*slots, *shape), dtype)
        return cls(zeros(np.int32, vocab), zeros(np.uint8, vocab), zeros(np.float32, vocab),
                   zeros(np.float32), zeros(np.float32), np.ones(slots, np.float32), zeros(np.int32))

    @classmethod
    def allocate(cls, slots: int, vocab: int) -> PenaltyTables:
        """The device tables of `slots` rows, every one null."""
        return jax.tree.map(jnp.asarray, cls.null(vocab, (slots,)))


@dataclasses.dataclass(frozen=True)
class LogitsRow:
    """What a request's slot holds besides its counts (SamplingParams' fields of those names): the
    single-token bad words it bans always, the stop ids it bans before min_tokens (EOS unless
    ignore_eos, stop_token_ids)."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    allowed_token_ids: tuple[int, ...] | None = None
    min_tokens: int = 0
    banned: tuple[int, ...] = ()
    stop_ids: tuple[int, ...] = ()
    track_counts: bool = False  # a logits processor it names reads its counts (engine/logits_processor.py)

    def asks(self) -> bool:
        """Whether the row does anything (else the request takes no slot)."""
        return (self.track_counts or self.presence != 0 or self.frequency != 0 or self.repetition != 1 or bool(self.logit_bias)
                or self.allowed_token_ids is not None or bool(self.banned)
                or (self.min_tokens > 0 and bool(self.stop_ids)))

    def values(self, prompt: list[int], output: list[int], vocab: int) -> PenaltyTables:
        """The row to write (host arrays): counts of `output`, flags of `prompt`, the bias row."""
        flags = np.zeros((vocab,), np.uint8)
        flags[np.asarray(prompt, np.int64)] |= PROMPT
        if self.min_tokens:
            flags[np.asarray(self.stop_ids, np.int64)] |= STOP
        bias = np.zeros((vocab,), np.float32)
        bias[list(self.logit_bias)] = list(self.logit_bias.values())
        if self.allowed_token_ids is not None:
            allowed = np.zeros((vocab,), bool)
            allowed[list(self.allowed_token_ids)] = True
            bias[~allowed] = -np.inf
        bias[list(self.banned)] = -np.inf
        counts = np.bincount(np.asarray(output, np.int64), minlength=vocab).astype(np.int32)
        scalars = [np.float32(self.presence), np.float32(self.frequency), np.float32(self.repetition),
                   np.int32(len(prompt) + self.min_tokens if self.min_tokens else 0)]
        return PenaltyTables(counts, flags, bias, *scalars)


def write_row(tables: PenaltyTables, slot: jax.Array, row: PenaltyTables) -> PenaltyTables:
    """`tables` with row `slot` replaced by `row` (jitted by the runner, the tables donated)."""
    return jax.tree.map(lambda table, value: table.at[slot].set(value), tables, row)


def apply(logits: jax.Array, slots: jax.Array, positions: jax.Array, tables: PenaltyTables,
          earlier: jax.Array | None = None) -> jax.Array:
    """float32 logits [B, V] with each row's slot's biases, bans and penalties (none when no row
    holds a slot). positions [B]: where the sampled token lands (min_tokens); earlier [B, K]: tokens
    generated after the row's counts were recorded (a verify step's earlier drafts; -1: none)."""

    def penalised(logits: jax.Array) -> jax.Array:
        counts = row_counts(tables, slots, earlier)
        flags = tables.flags[slots]
        logits = logits + tables.bias[slots]
        before_min = (positions < tables.min_end[slots])[:, None]
        logits = jnp.where(before_min & ((flags & STOP) != 0), -jnp.inf, logits)
        seen = ((flags & PROMPT) != 0) | (counts > 0)
        repetition = jnp.where(seen, tables.repetition[slots][:, None], 1.0)
        logits = jnp.where(logits > 0, logits / repetition, logits * repetition)
        return (logits - tables.frequency[slots][:, None] * counts.astype(jnp.float32)
                - tables.presence[slots][:, None] * (counts > 0))

    return jax.lax.cond(jnp.any(slots > 0), penalised, lambda x: x, logits)


def row_counts(tables: PenaltyTables, slots: jax.Array, earlier: jax.Array | None = None) -> jax.Array:
    """Each row's generated-token counts [B, V] int32: its slot's, plus `earlier` [B, K] (a verify
    step's drafts before the position; -1: none)."""
    counts = tables.counts[slots]
    if earlier is not None:
        rows = jnp.arange(counts.shape[0])[:, None]
        counts = counts.at[rows, jnp.where(earlier >= 0, earlier, counts.shape[1])].add(1, mode="drop")
    return counts


def record(tables: PenaltyTables, slots: jax.Array, tokens: jax.Array, valid: jax.Array | None = None) -> PenaltyTables:
    """`tables` with each row's kept tokens counted in its slot: tokens [B] or [B, n] (valid [B, n]:
    which of them were kept); rows of the null slot count nowhere."""
    tokens = tokens.reshape(tokens.shape[0], -1)
    rows = jnp.broadcast_to(jnp.where(slots > 0, slots, tables.counts.shape[0])[:, None], tokens.shape)
    if valid is not None:
        rows = jnp.where(valid, rows, tables.counts.shape[0])
    return dataclasses.replace(tables, counts=tables.counts.at[rows, tokens].add(1, mode="drop"))
