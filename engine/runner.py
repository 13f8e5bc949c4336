"""ModelRunner: turns scheduled work into bucketed flat arrays and runs the jitted, cache-donating steps.

A mixed step is one ragged batch (vLLM V1): the scheduled tokens of every request laid end to end,
`tokens [T]`, `positions [T]`, `slot_mapping [T]`, and per sequence slot `query_start_loc [S+1]`,
`context_lens [S]`, `block_tables [S, P]`; logits only at each sequence's last token. T and P are
shape buckets, S is max_num_seqs. A decode-only step runs `decode_steps` steps with sampling
inside one call (rows of one token each, the same ragged metadata with query_start_loc = 0..B).

Top-k logprobs are a static variant: a call computes MAX_LOGPROBS alternatives only when one of its
requests asks (compiled on first use, not by warmup), so other calls run the functions they always did.
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
from engine.request import MAX_LOGPROBS, Request, SamplingParams
from engine.sampler import SamplingTensors, sample, token_logprobs, top_logprobs
from engine.scheduler import ScheduledRequest
from models.attention import AttentionMetadata, LayerCache
from models.loading.progress import progress


@dataclasses.dataclass(frozen=True)
class StepResult:
    """Host copies of what a step sampled: tokens and logprobs [rows, steps]; when asked, the top
    MAX_LOGPROBS alternatives [rows, steps, K], and per flat token [T] the logprob of the prompt token
    it predicts (and the top alternatives [T, K])."""

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    prompt_logprobs: np.ndarray | None = None
    prompt_top_ids: np.ndarray | None = None
    prompt_top_logprobs: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class DecodeInputs:
    """A decode call's host arrays: the fed tokens [rows, steps] (in the last column) and their
    positions [rows], block tables, which rows are real, and sampling parameters."""

    tokens: np.ndarray
    positions: np.ndarray
    block_tables: np.ndarray
    active: np.ndarray
    sampling: SamplingTensors
    num_logprobs: int = 0  # static: 0 or MAX_LOGPROBS

    def args(self, tokens: jax.Array | np.ndarray | None = None) -> tuple:
        """The decode function's arguments; `tokens` (on device) replaces the host tokens."""
        return (self.tokens if tokens is None else tokens, self.positions, self.block_tables, self.active,
                self.sampling, self.num_logprobs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MixedBatch:
    """A mixed step's inputs: flat tokens [T] with their metadata, and per sequence slot [S] the
    index of its last token (where it samples) and its sampling parameters; when a request asks for
    prompt logprobs, per flat token the prompt token it predicts (prompt_targets [T])."""

    tokens: jax.Array
    positions: jax.Array
    metadata: AttentionMetadata
    logits_indices: jax.Array
    sampling: SamplingTensors
    num_logprobs: int = dataclasses.field(default=0, metadata=dict(static=True))  # 0 or MAX_LOGPROBS
    prompt_targets: jax.Array | None = None


def num_logprobs(params: list[SamplingParams]) -> int:
    """The static top-k of a call: MAX_LOGPROBS when one of its requests asks for alternatives, else 0."""
    return MAX_LOGPROBS if any((p.logprobs or 0) > 0 for p in params) else 0


def _top(logits: jax.Array, k: int) -> dict[str, jax.Array]:
    """The sampled rows' top-k alternatives [B, k] (nothing when k is 0)."""
    if not k:
        return {}
    ids, values = top_logprobs(logits, k)
    return {"top_ids": ids, "top_logprobs": values}


def _prompt_logprobs(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """Per flat token's logits [T, V]: the logprob of the prompt token it predicts, and the top alternatives."""
    ids, values = top_logprobs(logits, MAX_LOGPROBS)
    return {"prompt_logprobs": token_logprobs(logits, targets), "prompt_top_ids": ids, "prompt_top_logprobs": values}


def _mixed_step(graphdef: nnx.GraphDef, impl: str, state: nnx.State, cache: list[LayerCache],
                batch: MixedBatch) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], list[LayerCache]]:
    """One ragged step: every scheduled token through the model, one sample per sequence slot."""
    model = nnx.merge(graphdef, state)
    hidden, cache = model(batch.tokens[None], batch.positions[None], cache, batch.metadata, attention_impl=impl)
    logits = model.logits(hidden[0, batch.logits_indices])  # [S, V]
    next_tokens, logprobs = sample(logits, batch.sampling, batch.positions[batch.logits_indices] + 1)
    extras = jax.tree.map(lambda x: x[:, None], _top(logits, batch.num_logprobs))
    if batch.prompt_targets is not None:
        extras |= _prompt_logprobs(model.logits(hidden[0]), batch.prompt_targets)
    return next_tokens[:, None], logprobs[:, None], extras, cache


def _decode_loop(graphdef: nnx.GraphDef, impl: str, page_size: int, num_steps: int, state: nnx.State,
                 cache: list[LayerCache], tokens: jax.Array, positions: jax.Array, block_tables: jax.Array,
                 active: jax.Array, sampling: SamplingTensors, num_logprobs: int = 0
                 ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], list[LayerCache]]:
    """num_steps decode steps; step i feeds token i at positions + i. Inactive rows write page 0.

    tokens [B, num_steps]: the first fed token is its last column (so the previous call's sampled
    tokens feed a call dispatched before they reach the host, without an op outside the jit).
    num_logprobs (static): top alternatives per sampled token, [B, num_steps, k] (none when 0)."""
    model = nnx.merge(graphdef, state)
    b = tokens.shape[0]
    query_start_loc = jnp.arange(b + 1, dtype=jnp.int32)  # one query per row

    def step(i, carry):
        cache, token, outs = carry
        pos = positions + i
        page = jnp.take_along_axis(block_tables, (pos // page_size)[:, None], axis=1, mode="fill", fill_value=0)
        slot = jnp.where(active, page[:, 0] * page_size + pos % page_size, 0)
        metadata = AttentionMetadata(slot, query_start_loc, jnp.where(active, pos + 1, 0), block_tables,
                                     max_query_len=1)
        hidden, cache = model(token[None], pos[None], cache, metadata, attention_impl=impl)
        logits = model.logits(hidden[0])
        token, logprob = sample(logits, sampling, pos + 1)
        new = {"tokens": token, "logprobs": logprob, **_top(logits, num_logprobs)}
        return cache, token, {name: outs[name].at[:, i].set(value) for name, value in new.items()}

    outs = {"tokens": jnp.zeros((b, num_steps), jnp.int32), "logprobs": jnp.zeros((b, num_steps), jnp.float32)}
    if num_logprobs:
        outs |= {"top_ids": jnp.zeros((b, num_steps, num_logprobs), jnp.int32),
                 "top_logprobs": jnp.zeros((b, num_steps, num_logprobs), jnp.float32)}
    cache, _, outs = jax.lax.fori_loop(0, num_steps, step, (cache, tokens[:, -1], outs))
    return outs.pop("tokens"), outs.pop("logprobs"), outs, cache


@functools.lru_cache(maxsize=None)
def jitted_steps(graphdef: nnx.GraphDef, decode_impl: str, mixed_impl: str, page_size: int, num_steps: int):
    """The jitted mixed and decode functions with the static arguments closed over.

    Cached, so engines over the same model share compilations; closing over the GraphDef (rather
    than passing it as a static argument) spares hashing it on every call (~5 ms per call).
    """
    mixed = jax.jit(partial(_mixed_step, graphdef, mixed_impl), donate_argnums=(1,))
    decode = jax.jit(partial(_decode_loop, graphdef, decode_impl, page_size, num_steps), donate_argnums=(1,),
                     static_argnums=(7,))
    return mixed, decode


def block_table(requests: list[Request], rows: int, width: int) -> np.ndarray:
    """[rows, width] page ids of each request (padded with the null page 0)."""
    table = np.zeros((rows, width), np.int32)
    for i, r in enumerate(requests):
        table[i, :len(r.pages)] = r.pages[:width]
    return table


def mixed_batch(scheduled: list[ScheduledRequest], config: EngineConfig) -> MixedBatch:
    """The flat, bucketed numpy arrays of one mixed step (padding tokens write the null page's slot 0)."""
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
        tokens[span] = s.request.tokens[s.start:s.start + s.num_tokens]
        positions[span] = pos
        slots[span] = np.asarray(s.request.pages)[pos // config.page_size] * config.page_size + pos % config.page_size
        query_start_loc[i] = offset
        context_lens[i] = s.start + s.num_tokens
        offset += s.num_tokens
    requests = [s.request for s in scheduled]
    metadata = AttentionMetadata(slots, query_start_loc, context_lens, block_table(requests, rows, pages),
                                 max_query_len=config.prefill_chunk)
    logits_indices = np.maximum(query_start_loc[1:] - 1, 0)
    params = [r.params for r in requests]
    sampling = SamplingTensors.build(params, [r.seed for r in requests], rows)
    return MixedBatch(tokens, positions, metadata, logits_indices, sampling, num_logprobs(params),
                      prompt_targets(scheduled, t))


def wants_prompt_logprobs(s: ScheduledRequest) -> bool:
    """Whether this chunk holds positions whose prompt logprobs the request asked for and lacks."""
    prompt_len = len(s.request.prompt_token_ids)
    return (s.request.params.prompt_logprobs is not None and len(s.request.prompt_logprobs) < prompt_len
            and s.start + 1 < prompt_len)


def prompt_targets(scheduled: list[ScheduledRequest], num_tokens: int) -> np.ndarray | None:
    """[T] the prompt token each flat position predicts (position p: prompt token p + 1, across chunk
    boundaries too; 0 where none), or None when no scheduled chunk needs prompt logprobs."""
    if not any(wants_prompt_logprobs(s) for s in scheduled):
        return None
    targets, offset = np.zeros((num_tokens,), np.int32), 0
    for s in scheduled:
        prompt = s.request.prompt_token_ids
        following = prompt[s.start + 1:s.start + 1 + s.num_tokens]
        targets[offset:offset + len(following)] = following
        offset += s.num_tokens
    return targets


class ModelRunner:
    """Owns the device state (params, KV cache) and the two jitted step functions."""

    def __init__(self, model: nnx.Module, cache: list[LayerCache], config: EngineConfig,
                 decode_impl: str, mixed_impl: str):
        graphdef, self.state = nnx.split(model)
        self.cache = cache
        self.config = config
        self.mixed_fn, self.decode_fn = jitted_steps(graphdef, decode_impl, mixed_impl, config.page_size,
                                                      config.decode_steps)

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
        params = [r.params for r in requests]
        sampling = SamplingTensors.build(params, [r.seed for r in requests], rows)
        return DecodeInputs(tokens, positions, block_table(requests, rows, pages), active, sampling,
                            num_logprobs(params))

    def warmup(self) -> int:
        """Compile every (rows, pages) decode bucket and (tokens, pages) mixed bucket with all-padding
        inputs (they write page 0 only), and wait for those runs: dispatch is asynchronous, so the
        first request would wait instead."""
        cfg = self.config
        shapes = [(run, n, pages) for pages in cfg.page_buckets
                  for run, sizes in (("decode", cfg.batch_buckets), ("mixed", cfg.token_buckets)) for n in sizes]
        for run, n, pages in progress(shapes, "compiling shapes"):
            if run == "decode":
                self.run_decode_arrays(*self.padding_decode(n, pages))
            else:
                self.run_mixed_arrays(self.padding_mixed(n, pages))
            jax.block_until_ready(self.cache)  # each bar step is one compiled (and run) shape
        return len(shapes)

    def padding_decode(self, rows: int, pages: int) -> tuple:
        zeros = np.zeros((rows,), np.int32)
        return (np.zeros((rows, self.config.decode_steps), np.int32), zeros, np.zeros((rows, pages), np.int32),
                np.zeros((rows,), bool), SamplingTensors.build([], [], rows), 0)

    def padding_mixed(self, num_tokens: int, pages: int) -> MixedBatch:
        """A mixed batch of `num_tokens` padding tokens (no sequence), for compiling its bucket."""
        rows = self.config.max_num_seqs
        zeros = np.zeros((num_tokens,), np.int32)
        metadata = AttentionMetadata(zeros, np.zeros((rows + 1,), np.int32), np.zeros((rows,), np.int32),
                                     np.zeros((rows, pages), np.int32), max_query_len=self.config.prefill_chunk)
        return MixedBatch(zeros, zeros, metadata, np.zeros((rows,), np.int32), SamplingTensors.build([], [], rows))

    def run_mixed_arrays(self, batch: MixedBatch) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        *outputs, self.cache = self.mixed_fn(self.state, self.cache, batch)
        return tuple(outputs)

    def run_decode_arrays(self, *inputs) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        *outputs, self.cache = self.decode_fn(self.state, self.cache, *inputs)
        return tuple(outputs)

    def mixed(self, scheduled: list[ScheduledRequest]) -> StepResult:
        return fetch(self.run_mixed_arrays(mixed_batch(scheduled, self.config)))


def fetch(outputs: tuple[jax.Array, jax.Array, dict[str, jax.Array]]) -> StepResult:
    """The one host sync of a step: the sampled tokens, their logprobs and whatever logprobs were asked."""
    tokens, logprobs, extras = jax.device_get(outputs)
    return StepResult(tokens, logprobs, **extras)
