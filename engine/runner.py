"""ModelRunner: turns scheduled work into bucketed arrays and runs the jitted, cache-donating steps.

Prefill rows are left-padded chunks (the queries are the last tokens of each row, as
ops.paged_attention expects); decode runs `decode_steps` steps with sampling inside one call.
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
from engine.scheduler import PrefillChunk
from models.attention import AttentionMetadata, LayerCache


@dataclasses.dataclass(frozen=True)
class StepResult:
    """Host copies of what a step sampled: tokens and logprobs [rows, steps]."""

    tokens: np.ndarray
    logprobs: np.ndarray


def _prefill_step(graphdef: nnx.GraphDef, impl: str, state: nnx.State, cache: list[LayerCache],
                  tokens: jax.Array, positions: jax.Array, metadata: AttentionMetadata,
                  sampling: SamplingTensors) -> tuple[jax.Array, jax.Array, list[LayerCache]]:
    model = nnx.merge(graphdef, state)
    hidden, cache = model(tokens, positions, cache, metadata, attention_impl=impl)
    next_tokens, logprobs = sample(model.logits(hidden[:, -1]), sampling, positions[:, -1] + 1)
    return next_tokens[:, None], logprobs[:, None], cache


def _decode_loop(graphdef: nnx.GraphDef, impl: str, page_size: int, num_steps: int, state: nnx.State,
                 cache: list[LayerCache], tokens: jax.Array, positions: jax.Array, block_tables: jax.Array,
                 active: jax.Array, sampling: SamplingTensors) -> tuple[jax.Array, jax.Array, list[LayerCache]]:
    """num_steps decode steps; step i feeds token i at positions + i. Inactive rows write page 0."""
    model = nnx.merge(graphdef, state)

    def step(i, carry):
        cache, token, out_tokens, out_logprobs = carry
        pos = positions + i
        page = jnp.take_along_axis(block_tables, (pos // page_size)[:, None], axis=1, mode="fill", fill_value=0)
        slot = jnp.where(active, page[:, 0] * page_size + pos % page_size, 0)
        metadata = AttentionMetadata(slot[:, None], block_tables, jnp.where(active, pos + 1, 0))
        hidden, cache = model(token[:, None], pos[:, None], cache, metadata, attention_impl=impl)
        token, logprob = sample(model.logits(hidden[:, 0]), sampling, pos + 1)
        return cache, token, out_tokens.at[:, i].set(token), out_logprobs.at[:, i].set(logprob)

    b = tokens.shape[0]
    init = (cache, tokens, jnp.zeros((b, num_steps), jnp.int32), jnp.zeros((b, num_steps), jnp.float32))
    cache, _, out_tokens, out_logprobs = jax.lax.fori_loop(0, num_steps, step, init)
    return out_tokens, out_logprobs, cache


@functools.lru_cache(maxsize=None)
def jitted_steps(graphdef: nnx.GraphDef, impl: str, page_size: int, num_steps: int):
    """The jitted prefill and decode functions with the static arguments closed over.

    Cached, so engines over the same model share compilations; closing over the GraphDef (rather
    than passing it as a static argument) spares hashing it on every call (~5 ms per call).
    """
    prefill = jax.jit(partial(_prefill_step, graphdef, impl), donate_argnums=(1,))
    decode = jax.jit(partial(_decode_loop, graphdef, impl, page_size, num_steps), donate_argnums=(1,))
    return prefill, decode


class ModelRunner:
    """Owns the device state (params, KV cache) and the two jitted step functions."""

    def __init__(self, model: nnx.Module, cache: list[LayerCache], config: EngineConfig):
        graphdef, self.state = nnx.split(model)
        self.cache = cache
        self.config = config
        self.prefill_fn, self.decode_fn = jitted_steps(graphdef, config.attention_impl, config.page_size,
                                                        config.decode_steps)

    def warmup(self) -> int:
        """Compile every (rows, width, pages) bucket with all-padding inputs (they write page 0 only),
        and wait for those runs: dispatch is asynchronous, so the first request would wait instead."""
        cfg, shapes = self.config, 0
        for rows, pages in itertools.product(cfg.batch_buckets, cfg.page_buckets):
            sampling = SamplingTensors.build([], [], rows)
            zeros = np.zeros((rows,), np.int32)
            _, _, self.cache = self.decode_fn(self.state, self.cache, zeros, zeros, np.zeros((rows, pages), np.int32),
                                              np.zeros((rows,), bool), sampling)
            shapes += 1
            for width in cfg.chunk_buckets:
                if rows * width > cfg.max_num_batched_tokens and rows > 1:
                    continue
                grid = np.zeros((rows, width), np.int32)
                metadata = AttentionMetadata(grid, np.zeros((rows, pages), np.int32), zeros)
                _, _, self.cache = self.prefill_fn(self.state, self.cache, grid, grid, metadata, sampling)
                shapes += 1
        jax.block_until_ready(self.cache)
        return shapes

    def _block_tables(self, requests: list[Request], rows: int, width: int) -> np.ndarray:
        table = np.zeros((rows, width), np.int32)
        for i, r in enumerate(requests):
            table[i, :len(r.pages)] = r.pages[:width]
        return table

    def prefill(self, chunks: list[PrefillChunk]) -> StepResult:
        cfg = self.config
        rows = bucket(len(chunks), cfg.batch_buckets)
        width = bucket(max(c.length for c in chunks), cfg.chunk_buckets)
        pages = bucket(max(-(-(c.start + c.length) // cfg.page_size) for c in chunks), cfg.page_buckets)
        tokens, positions = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
        slots, lens = np.zeros((rows, width), np.int32), np.zeros((rows,), np.int32)
        for i, c in enumerate(chunks):
            pos = np.arange(c.start, c.start + c.length)
            page_ids = np.asarray(c.request.pages)[pos // cfg.page_size]
            tokens[i, width - c.length:] = c.request.tokens[c.start:c.start + c.length]
            positions[i, width - c.length:] = pos
            slots[i, width - c.length:] = page_ids * cfg.page_size + pos % cfg.page_size
            lens[i] = c.start + c.length
        metadata = AttentionMetadata(slots, self._block_tables([c.request for c in chunks], rows, pages), lens)
        requests = [c.request for c in chunks]
        sampling = SamplingTensors.build([r.params for r in requests], [r.seed for r in requests], rows)
        out_tokens, out_logprobs, self.cache = self.prefill_fn(self.state, self.cache, tokens, positions,
                                                               metadata, sampling)
        return StepResult(np.asarray(out_tokens), np.asarray(out_logprobs))

    def decode(self, requests: list[Request]) -> StepResult:
        cfg = self.config
        rows = bucket(len(requests), cfg.batch_buckets)
        positions = np.zeros((rows,), np.int32)
        positions[:len(requests)] = [len(r.tokens) - 1 for r in requests]
        tokens = np.zeros((rows,), np.int32)
        tokens[:len(requests)] = [r.tokens[-1] for r in requests]
        pages = bucket(-(-(int(positions.max()) + cfg.decode_steps) // cfg.page_size), cfg.page_buckets)
        active = np.arange(rows) < len(requests)
        sampling = SamplingTensors.build([r.params for r in requests], [r.seed for r in requests], rows)
        out_tokens, out_logprobs, self.cache = self.decode_fn(
            self.state, self.cache, tokens, positions, self._block_tables(requests, rows, pages), active, sampling)
        return StepResult(np.asarray(out_tokens), np.asarray(out_logprobs))
