"""Draft-model proposer: a second (small) model with the target's vocabulary and its own paged KV
cache, k draft steps on device per verify step.

Its cache uses the target's page ids (same num_pages and page_size), so it rolls back exactly as
the target's does: it holds KV wherever the target does, because it runs over every batch the
target runs (the fill), and positions past a request's computed length are overwritten before they
are read. Drafts are sampled from q = the draft's probabilities after the request's own
temperature / top-k / top-p / min-p transforms, with their own random stream (seed, position, tag).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine import kv_cache
from engine.attention_choice import AttentionChoice
from engine.config import EngineConfig, bucket
from engine.runner import MixedBatch, block_table, padding_metadata, warmup_shapes
from engine.sampler import SamplingTensors, filtered_logits, sample_from_probs, uniforms
from engine.scheduler import ScheduledRequest
from models import LoadedModel, ModelConfig
from models.attention import AttentionMetadata, LayerCache

DRAFT_TAG = 2  # the draft's own sample at a position: key(seed) folded with the position, then this tag


def draw(logits: jax.Array, s: SamplingTensors, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A draft token [B] from q (greedy rows: argmax) and q [B, V] itself."""
    logits = logits.astype(jnp.float32)
    q = jax.nn.softmax(filtered_logits(logits, s), axis=-1)
    drawn = sample_from_probs(q, uniforms(s.seed, positions, DRAFT_TAG))
    return jnp.where(s.temperature > 0, drawn, jnp.argmax(logits, axis=-1).astype(jnp.int32)), q


def _fill(graphdef: nnx.GraphDef, impl: str, state: nnx.State, cache: list[LayerCache], tokens: jax.Array,
          positions: jax.Array, metadata: AttentionMetadata) -> list[LayerCache]:
    """The draft's KV for the target's verify batch (its hidden states are not needed)."""
    _, cache = nnx.merge(graphdef, state)(tokens[None], positions[None], cache, metadata, attention_impl=impl)
    return cache


def _draft_loop(graphdef: nnx.GraphDef, impl: str, page_size: int, k: int, seqs: int, state: nnx.State,
                cache: list[LayerCache], tokens: jax.Array, positions: jax.Array, block_tables: jax.Array,
                active: jax.Array, sampling: SamplingTensors) -> tuple[jax.Array, jax.Array, list[LayerCache]]:
    """k draft steps from each row's last token at `positions`: drafts [B, k] and q [seqs, k, V]."""
    model = nnx.merge(graphdef, state)
    b, vocab = tokens.shape[0], model.config.vocab_size

    def step(i, carry):
        cache, token, drafts, probs = carry
        pos = positions + i
        metadata = AttentionMetadata.one_token_per_row(pos, active, block_tables, page_size)
        hidden, cache = model(token[None], pos[None], cache, metadata, attention_impl=impl)
        token, q = draw(model.logits(hidden[0]), sampling, pos + 1)
        return cache, token, drafts.at[:, i].set(token), probs.at[:, i].set(q)

    init = (cache, tokens, jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k, vocab), jnp.float32))
    cache, _, drafts, probs = jax.lax.fori_loop(0, k, step, init)
    return drafts, jnp.zeros((seqs, k, vocab), jnp.float32).at[:b].set(probs), cache


def check_draft(draft: ModelConfig, target: ModelConfig, max_model_len: int) -> None:
    """A draft must share the target's vocabulary and reach the engine's context."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"speculative_config: the draft {draft.name} has a vocabulary of {draft.vocab_size} "
                         f"tokens, the target {target.name} {target.vocab_size}: they must be the same")
    if draft.max_position_embeddings < max_model_len:
        raise ValueError(f"speculative_config: the draft's context ({draft.max_position_embeddings}) is shorter "
                         f"than max_model_len={max_model_len}")


def warm_up_proposer(config: EngineConfig, run_loop: Callable[..., Any], fill: Callable[..., None]) -> int:
    """Walk runner.warmup_shapes for a proposer (draft model, MTP): its draft loop per decode
    (rows, pages) bucket, fill(zeros [n], metadata) per mixed and verify bucket; returns the count."""
    shapes = warmup_shapes(config)
    for run, n, pages in shapes:
        zeros = np.zeros((n,), np.int32)
        if run == "decode":
            run_loop(zeros, zeros, np.zeros((n, pages), np.int32), np.zeros((n,), bool), SamplingTensors.build([], [], n))
        else:
            fill(zeros, padding_metadata(config, n, pages, run == "verify"))
    return len(shapes)


class DraftModelProposer:
    """Owns the draft's parameters, paged cache and two jitted calls (fill, draft loop)."""

    def __init__(self, draft: LoadedModel, target: ModelConfig, config: EngineConfig, attention: AttentionChoice):
        check_draft(draft.config, target, config.max_model_len)
        graphdef, self.state = nnx.split(draft.model)
        self.config = config
        self.k = config.num_speculative_tokens
        self.draft_config, self.dtype = draft.config, draft.dtype
        self.reset_cache()
        self.fill_fn = jax.jit(partial(_fill, graphdef, attention.mixed), donate_argnums=(1,))
        self.loop_fn = jax.jit(partial(_draft_loop, graphdef, attention.decode, config.page_size, self.k,
                                       config.max_num_seqs), donate_argnums=(1,))

    def propose(self, scheduled: list[ScheduledRequest], slots: list[int]) -> tuple[list[list[int]], jax.Array]:
        """k drafts for every row with slots (the first slots[i] kept) and q [S, K, V]."""
        drafts, q = self._run_loop(*self._loop_inputs(scheduled, slots))
        drafts = np.asarray(drafts)
        return [drafts[i, :n].tolist() for i, n in enumerate(slots)], q

    def _loop_inputs(self, scheduled: list[ScheduledRequest], slots: list[int]) -> tuple:
        """Host arrays of the draft loop: each decode's last token at its position (its pages are
        the target's, allocated for the verify step's 1 + slots tokens)."""
        cfg = self.config
        rows = bucket(len(scheduled), cfg.batch_buckets)
        requests = [s.request for s in scheduled]
        positions, tokens = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
        positions[:len(scheduled)] = [s.start for s in scheduled]
        tokens[:len(scheduled)] = [r.last_token for r in requests]
        active = np.zeros((rows,), bool)
        active[:len(scheduled)] = [n > 0 for n in slots]
        pages = cfg.table_width(int(positions.max()) + self.k)
        sampling = SamplingTensors.build([r.params for r in requests], [r.seed for r in requests], rows)
        return tokens, positions, block_table(requests, rows, pages), active, sampling

    def _run_loop(self, *inputs) -> tuple[jax.Array, jax.Array]:
        drafts, q, self.cache = self.loop_fn(self.state, self.cache, *inputs)
        return drafts, q

    def reset_cache(self) -> None:
        self.cache = kv_cache.allocate(self.draft_config, self.config.num_pages, self.config.page_size, self.dtype)

    def observe(self, batch: MixedBatch, *unused) -> None:
        del unused
        self.cache = self.fill_fn(self.state, self.cache, batch.tokens, batch.positions, batch.metadata)

    def warmup(self) -> int:
        """Compile the fill per (tokens, pages) bucket and the loop per (rows, pages) bucket."""
        def fill(zeros, metadata):
            self.cache = self.fill_fn(self.state, self.cache, zeros, zeros, metadata)

        count = warm_up_proposer(self.config, self._run_loop, fill)
        jax.block_until_ready(self.cache)
        return count
