"""ModelRunner: turns scheduled work into bucketed flat arrays and runs the jitted, cache-donating steps.

A mixed step is one ragged batch (vLLM V1): the scheduled tokens of every request laid end to end,
`tokens [T]`, `positions [T]`, `slot_mapping [T]`, and per sequence slot `query_start_loc [S+1]`,
`context_lens [S]`, `block_tables [S, P]`; logits only at each sequence's last token, or with
speculation at every verify position (engine/spec/verify.py). T and P are shape buckets, S is
max_num_seqs. A decode-only step runs `decode_steps` steps with sampling
inside one call (rows of one token each, the same ragged metadata with query_start_loc = 0..B).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine.config import EngineConfig, bucket
from engine.request import Request
from engine.sampler import SamplingTensors, sample
from engine.scheduler import ScheduledRequest
from engine.spec import verify as spec_verify
from models.attention import AttentionMetadata, LayerCache


@dataclasses.dataclass(frozen=True)
class StepResult:
    """Host copies of what a step sampled: tokens and logprobs [rows, steps], and for a verify
    step how many of each row's tokens are real (accepted drafts + 1) [rows]."""

    tokens: np.ndarray
    logprobs: np.ndarray
    counts: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class DecodeInputs:
    """A decode call's host arrays: the fed tokens [rows, steps] (in the last column) and their
    positions [rows], block tables, which rows are real, and sampling parameters."""

    tokens: np.ndarray
    positions: np.ndarray
    block_tables: np.ndarray
    active: np.ndarray
    sampling: SamplingTensors

    def args(self, tokens: jax.Array | np.ndarray | None = None) -> tuple:
        """The decode function's arguments; `tokens` (on device) replaces the host tokens."""
        return (self.tokens if tokens is None else tokens, self.positions, self.block_tables, self.active,
                self.sampling)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MixedBatch:
    """A mixed step's inputs: flat tokens [T] with their metadata, the flat indices of the tokens
    it takes logits at (each sequence slot's last [S], or with `verify` every verify position
    [L]), and per sequence slot [S] its sampling parameters."""

    tokens: jax.Array
    positions: jax.Array
    metadata: AttentionMetadata
    logits_indices: jax.Array
    sampling: SamplingTensors
    verify: spec_verify.VerifyRows | None = None


SAMPLE_ROW_TIERS = (8,)  # a mixed step with at most this many sequences samples only that many rows


def _mixed_step(graphdef: nnx.GraphDef, impl: str, synthetic_accepts: float | None, state: nnx.State,
                cache: list[LayerCache], batch: MixedBatch) -> tuple:
    """One ragged step: every scheduled token through the model, one sample per sequence slot (a
    verify step: its accepted drafts and next token per slot, their count, and the hidden states
    [T, D] an MTP proposer continues from)."""
    model = nnx.merge(graphdef, state)
    hidden, cache = model(batch.tokens[None], batch.positions[None], cache, batch.metadata, attention_impl=impl)
    if batch.verify is not None:
        logits = model.logits(hidden[0, batch.logits_indices])  # [L, V]
        positions = batch.positions[batch.logits_indices] + 1
        return (*spec_verify.verify(logits, batch.sampling, positions, batch.verify, synthetic_accepts), hidden[0],
                cache)
    next_tokens, logprobs = _sample_rows(model, hidden[0], batch)
    return next_tokens[:, None], logprobs[:, None], cache


def _sample_rows(model: nnx.Module, hidden: jax.Array, batch: MixedBatch) -> tuple[jax.Array, jax.Array]:
    """A sample at each sequence slot's last token [S]. The LM head and sampler run over the fewest
    rows of SAMPLE_ROW_TIERS (or all S) that hold the step's sequences, picked on device by a
    switch inside one executable: at S = 64, one 256-token prompt spent ~7% of its prefill on the
    63 empty slots' logits (SmolLM2), and a shape bucket per tier would multiply compilations."""
    slots = batch.logits_indices.shape[0]
    tiers = tuple(t for t in SAMPLE_ROW_TIERS if t < slots) + (slots,)

    def rows(n: int) -> tuple[jax.Array, jax.Array]:
        index = batch.logits_indices[:n]
        sampling = jax.tree.map(lambda x: x[:n], batch.sampling)
        tokens, logprobs = sample(model.logits(hidden[index]), sampling, batch.positions[index] + 1)
        return jnp.pad(tokens, (0, slots - n)), jnp.pad(logprobs, (0, slots - n))

    qsl = batch.metadata.query_start_loc
    num_seqs = jnp.sum(qsl[1:] > qsl[:-1])  # scheduled sequences fill the first slots, each >= 1 token
    return jax.lax.switch(jnp.searchsorted(jnp.asarray(tiers), num_seqs), [partial(rows, n) for n in tiers])


def _decode_loop(graphdef: nnx.GraphDef, impl: str, page_size: int, num_steps: int, state: nnx.State,
                 cache: list[LayerCache], tokens: jax.Array, positions: jax.Array, block_tables: jax.Array,
                 active: jax.Array, sampling: SamplingTensors) -> tuple[jax.Array, jax.Array, list[LayerCache]]:
    """num_steps decode steps; step i feeds token i at positions + i. Inactive rows write page 0.

    tokens [B, num_steps]: the first fed token is its last column (so the previous call's sampled
    tokens feed a call dispatched before they reach the host, without an op outside the jit)."""
    model = nnx.merge(graphdef, state)
    b = tokens.shape[0]
    query_start_loc = jnp.arange(b + 1, dtype=jnp.int32)  # one query per row

    def step(i, carry):
        cache, token, out_tokens, out_logprobs = carry
        pos = positions + i
        page = jnp.take_along_axis(block_tables, (pos // page_size)[:, None], axis=1, mode="fill", fill_value=0)
        slot = jnp.where(active, page[:, 0] * page_size + pos % page_size, 0)
        metadata = AttentionMetadata(slot, query_start_loc, jnp.where(active, pos + 1, 0), block_tables,
                                     max_query_len=1)
        hidden, cache = model(token[None], pos[None], cache, metadata, attention_impl=impl)
        token, logprob = sample(model.logits(hidden[0]), sampling, pos + 1)
        return cache, token, out_tokens.at[:, i].set(token), out_logprobs.at[:, i].set(logprob)

    init = (cache, tokens[:, -1], jnp.zeros((b, num_steps), jnp.int32), jnp.zeros((b, num_steps), jnp.float32))
    cache, _, out_tokens, out_logprobs = jax.lax.fori_loop(0, num_steps, step, init)
    return out_tokens, out_logprobs, cache


@functools.lru_cache(maxsize=None)
def jitted_steps(graphdef: nnx.GraphDef, decode_impl: str, mixed_impl: str, page_size: int, num_steps: int,
                 synthetic_accepts: float | None = None):
    """The jitted mixed and decode functions with the static arguments closed over.

    Cached, so engines over the same model share compilations; closing over the GraphDef (rather
    than passing it as a static argument) spares hashing it on every call (~5 ms per call).
    """
    mixed = jax.jit(partial(_mixed_step, graphdef, mixed_impl, synthetic_accepts), donate_argnums=(1,))
    decode = jax.jit(partial(_decode_loop, graphdef, decode_impl, page_size, num_steps), donate_argnums=(1,))
    return mixed, decode


def block_table(requests: list[Request], rows: int, width: int) -> np.ndarray:
    """[rows, width] page ids of each request (padded with the null page 0)."""
    table = np.zeros((rows, width), np.int32)
    for i, r in enumerate(requests):
        table[i, :len(r.pages)] = r.pages[:width]
    return table


def max_query_len(config: EngineConfig, decode_only: bool) -> int:
    """The static bound on one sequence's tokens in a mixed step: a chunk, or a verify's 1 + K."""
    return config.num_speculative_tokens + 1 if decode_only and config.num_speculative_tokens else config.prefill_chunk


def verify_buckets(config: EngineConfig) -> tuple[int, ...]:
    """Token buckets a decodes-only verify step can take: up to S (K + 1) tokens (none without speculation)."""
    if not config.num_speculative_tokens:
        return ()
    most = min(config.max_num_seqs * (config.num_speculative_tokens + 1), config.max_num_batched_tokens)
    return tuple(t for t in config.token_buckets if t <= bucket(most, config.token_buckets))


def mixed_batch(scheduled: list[ScheduledRequest], config: EngineConfig,
                draft_probs: jax.Array | None = None) -> MixedBatch:
    """The flat, bucketed numpy arrays of one mixed step (padding tokens write the null page's slot 0);
    with speculation on, the verify rows too (draft_probs [S, K, V]: the draft model's q), and a
    step of decodes only bounds each sequence's queries by 1 + K (attention works per that bound)."""
    num_tokens = sum(s.num_tokens for s in scheduled)
    t, rows = bucket(num_tokens, config.token_buckets), config.max_num_seqs
    pages = bucket(max(-(-(s.start + s.num_tokens) // config.page_size) for s in scheduled), config.page_buckets)
    tokens, positions, slots = (np.zeros((t,), np.int32) for _ in range(3))
    query_start_loc = np.full((rows + 1,), num_tokens, np.int32)
    context_lens = np.zeros((rows,), np.int32)
    offset = 0
    for i, s in enumerate(scheduled):
        pos = np.arange(s.start, s.start + s.num_tokens)
        span = slice(offset, offset + s.num_tokens)
        tokens[span] = s.token_ids
        positions[span] = pos
        slots[span] = np.asarray(s.request.pages)[pos // config.page_size] * config.page_size + pos % config.page_size
        query_start_loc[i] = offset
        context_lens[i] = s.start + s.num_tokens
        offset += s.num_tokens
    requests = [s.request for s in scheduled]
    metadata = AttentionMetadata(slots, query_start_loc, context_lens, block_table(requests, rows, pages),
                                 max_query_len=max_query_len(config, all(not r.is_prefilling for r in requests)))
    sampling = SamplingTensors.build([r.params for r in requests], [r.seed for r in requests], rows)
    if config.num_speculative_tokens:
        ends = [int(query_start_loc[i]) + s.num_tokens for i, s in enumerate(scheduled)]
        indices, verify = spec_verify.build(ends, [s.drafts for s in scheduled], rows,
                                            config.num_speculative_tokens, t, draft_probs)
        return MixedBatch(tokens, positions, metadata, indices, sampling, verify)
    logits_indices = np.maximum(query_start_loc[1:] - 1, 0)
    return MixedBatch(tokens, positions, metadata, logits_indices, sampling)


class ModelRunner:
    """Owns the device state (params, KV cache) and the two jitted step functions."""

    def __init__(self, model: nnx.Module, cache: list[LayerCache], config: EngineConfig,
                 decode_impl: str, mixed_impl: str, synthetic_accepts: float | None = None,
                 padding_draft_probs: jax.Array | None = None):
        """synthetic_accepts: the synthetic speculation mode's mean accepted drafts per step;
        padding_draft_probs: a [S, K, V] q for warm-up when a draft model supplies one."""
        graphdef, self.state = nnx.split(model)
        self.cache = cache
        self.config = config
        self.padding_draft_probs = padding_draft_probs
        self.mixed_fn, self.decode_fn = jitted_steps(graphdef, decode_impl, mixed_impl, config.page_size,
                                                      config.decode_steps, synthetic_accepts)
        # A verify step of decodes only (1 + k tokens each) runs the decode attention impl (on a CPU
        # the C++ kernel, measured faster for short queries than the jnp path chosen for chunks).
        self.verify_fn = (jitted_steps(graphdef, decode_impl, decode_impl, config.page_size, config.decode_steps,
                                       synthetic_accepts)[0] if config.num_speculative_tokens else None)

    def cache_intact(self) -> bool:
        """False when a failed call consumed the cache: its buffers were donated (deleted) or hold the error."""
        try:
            jax.block_until_ready(self.cache)
        except Exception:  # noqa: BLE001 (a deleted or errored buffer raises here)
            return False
        return True

    def decode_inputs(self, requests: list[Request], steps_ahead: int = 0) -> DecodeInputs:
        """Host arrays of a decode call for `requests`, `steps_ahead` tokens past their last one
        (a call dispatched before the previous call's tokens reach the host feeds them on device)."""
        cfg = self.config
        rows = bucket(len(requests), cfg.batch_buckets)
        positions = np.zeros((rows,), np.int32)
        positions[:len(requests)] = [len(r.tokens) - 1 + steps_ahead for r in requests]
        tokens = np.zeros((rows, cfg.decode_steps), np.int32)
        tokens[:len(requests), -1] = [r.tokens[-1] for r in requests]
        pages = bucket(-(-(int(positions.max()) + cfg.decode_steps) // cfg.page_size), cfg.page_buckets)
        active = np.arange(rows) < len(requests)
        sampling = SamplingTensors.build([r.params for r in requests], [r.seed for r in requests], rows)
        return DecodeInputs(tokens, positions, block_table(requests, rows, pages), active, sampling)

    def warmup(self) -> int:
        """Compile every (rows, pages) decode bucket and (tokens, pages) mixed bucket with all-padding
        inputs (they write page 0 only), and wait for those runs: dispatch is asynchronous, so the
        first request would wait instead."""
        cfg, shapes = self.config, 0
        for pages in cfg.page_buckets:
            for rows in cfg.batch_buckets:
                self.run_decode_arrays(*self.padding_decode(rows, pages))
                shapes += 1
            for t in cfg.token_buckets:
                self.run_mixed_arrays(self.padding_mixed(t, pages))
                shapes += 1
                if t in verify_buckets(cfg):
                    self.run_mixed_arrays(self.padding_mixed(t, pages, decode_only=True), decode_only=True)
                    shapes += 1
        jax.block_until_ready(self.cache)
        return shapes

    def padding_decode(self, rows: int, pages: int) -> tuple:
        zeros = np.zeros((rows,), np.int32)
        return (np.zeros((rows, self.config.decode_steps), np.int32), zeros, np.zeros((rows, pages), np.int32),
                np.zeros((rows,), bool), SamplingTensors.build([], [], rows))

    def padding_mixed(self, num_tokens: int, pages: int, decode_only: bool = False) -> MixedBatch:
        """A mixed batch of `num_tokens` padding tokens (no sequence), for compiling its bucket."""
        rows = self.config.max_num_seqs
        zeros = np.zeros((num_tokens,), np.int32)
        metadata = AttentionMetadata(zeros, np.zeros((rows + 1,), np.int32), np.zeros((rows,), np.int32),
                                     np.zeros((rows, pages), np.int32),
                                     max_query_len=max_query_len(self.config, decode_only))
        sampling = SamplingTensors.build([], [], rows)
        if self.config.num_speculative_tokens:
            indices, verify = spec_verify.padding(num_tokens, rows, self.config.num_speculative_tokens,
                                                  self.padding_draft_probs)
            return MixedBatch(zeros, zeros, metadata, indices, sampling, verify)
        return MixedBatch(zeros, zeros, metadata, np.zeros((rows,), np.int32), sampling)

    def run_mixed_arrays(self, batch: MixedBatch, decode_only: bool = False) -> tuple[jax.Array, ...]:
        """decode_only: every sequence is a decode (with drafts): the verify function runs it."""
        fn = self.verify_fn if decode_only and self.verify_fn is not None else self.mixed_fn
        *outputs, self.cache = fn(self.state, self.cache, batch)
        return tuple(outputs)

    def run_decode_arrays(self, *inputs) -> tuple[jax.Array, jax.Array]:
        out_tokens, out_logprobs, self.cache = self.decode_fn(self.state, self.cache, *inputs)
        return out_tokens, out_logprobs

    def mixed(self, scheduled: list[ScheduledRequest]) -> StepResult:
        return fetch(self.run_mixed_arrays(mixed_batch(scheduled, self.config)))


def fetch(outputs: tuple[jax.Array, ...]) -> StepResult:
    """The one host sync of a step: the sampled tokens and their logprobs (and a verify step's counts)."""
    return StepResult(*(np.asarray(x) for x in outputs[:3]))
