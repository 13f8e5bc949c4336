"""DeepSeek-V3 multi-token prediction as the proposer (DeepSeek-V3 report, section 2.2; vLLM's
DeepSeekMTP): the MTP module takes the target's hidden state at position t and the embedding of
token t+1 and predicts token t+2 through one more block (its own paged KV cache, on the target's
page ids), shared_head_norm and the shared LM head.

After each target step (observe) the module runs over that batch's accepted positions, each fed
the true next token (the accepted drafts, then the drawn token), which fills its KV and gives the
hidden state at each sequence's last position. At the next step's proposal the first draft comes
from that state, the next k-1 from the module fed its own output and its previous draft, as vLLM
does. k above the number of modules reuses the last one; DeepSeek-V3 ships one and only it runs.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine import kv_cache
from engine.attention_choice import AttentionChoice
from engine.config import EngineConfig, bucket
from engine.runner import MixedBatch, StepResult, block_table
from engine.sampler import SamplingTensors
from engine.scheduler import ScheduledRequest
from engine.speculative.draft_model import draw, warm_up_proposer
from models import LoadedModel
from models.attention import AttentionMetadata, LayerCache


def _module_forward(model: nnx.Module, tokens_bt: jax.Array, hidden_btd: jax.Array, positions_bt: jax.Array,
                    cache: LayerCache, metadata: AttentionMetadata, impl: str) -> tuple[jax.Array, LayerCache]:
    """eh_proj([enorm(embed(token t+1)), hnorm(h_t)]) through the MTP block: its hidden state [B, T, D]."""
    mtp = model.mtp[-1]
    x = mtp.eh_proj(jnp.concatenate([mtp.enorm(model.embed_tokens(tokens_bt)), mtp.hnorm(hidden_btd)], axis=-1))
    return mtp.block(x, positions_bt, cache, metadata, impl)


def _module_logits(model: nnx.Module, hidden: jax.Array) -> jax.Array:
    return model.logits(model.mtp[-1].shared_head_norm(hidden))


def _fill(graphdef: nnx.GraphDef, impl: str, state: nnx.State, cache: list[LayerCache], target_hidden: jax.Array,
          hidden_index: jax.Array, tokens: jax.Array, positions: jax.Array, metadata: AttentionMetadata,
          last_index: jax.Array) -> tuple[jax.Array, list[LayerCache]]:
    """The module over accepted positions (hidden_index [T] into the target's [T, D]): its KV, and
    its hidden state at each sequence's last position [S, D]."""
    model = nnx.merge(graphdef, state)
    hidden, layer = _module_forward(model, tokens[None], target_hidden[hidden_index][None], positions[None], cache[0],
                                    metadata, impl)
    return hidden[0, last_index], [layer]


def _draft_loop(graphdef: nnx.GraphDef, impl: str, page_size: int, k: int, seqs: int, state: nnx.State,
                cache: list[LayerCache], last_hidden: jax.Array, row_map: jax.Array, positions: jax.Array,
                block_tables: jax.Array, active: jax.Array, sampling: SamplingTensors
                ) -> tuple[jax.Array, jax.Array, list[LayerCache]]:
    """k drafts per row from its last hidden state (row_map into last_hidden [S, D]); `positions`
    [B] is each row's last token. Drafts [B, k] and q [seqs, k, V]."""
    model = nnx.merge(graphdef, state)
    b, vocab = positions.shape[0], model.config.vocab_size
    hidden = last_hidden[row_map]
    token, q = draw(_module_logits(model, hidden), sampling, positions + 1)
    drafts = jnp.zeros((b, k), jnp.int32).at[:, 0].set(token)
    probs = jnp.zeros((b, k, vocab), jnp.float32).at[:, 0].set(q)

    def step(i, carry):
        cache, hidden, token, drafts, probs = carry
        pos = positions + i - 1
        metadata = AttentionMetadata.one_token_per_row(pos, active, block_tables, page_size)
        out, layer = _module_forward(model, token[None, :], hidden[None], pos[None], cache[0], metadata, impl)
        token, q = draw(_module_logits(model, out[0]), sampling, pos + 2)
        return [layer], out[0], token, drafts.at[:, i].set(token), probs.at[:, i].set(q)

    cache, _, _, drafts, probs = jax.lax.fori_loop(1, k, step, (cache, hidden, token, drafts, probs))
    return drafts, jnp.zeros((seqs, k, vocab), jnp.float32).at[:b].set(probs), cache


class MTPProposer:
    """Owns the module's paged cache (one layer) and its two jitted calls; shares the target's weights."""

    def __init__(self, target: LoadedModel, config: EngineConfig, attention: AttentionChoice):
        if target.config.mtp is None or not len(getattr(target.model, "mtp", ())):
            raise ValueError(f"speculative_config: method \"mtp\" needs a model with MTP weights; "
                             f"{target.config.name} has none")
        graphdef, self.state = nnx.split(target.model)
        self.config = config
        self.k = config.num_speculative_tokens
        self.one_layer = dataclasses.replace(target.config, num_layers=1)
        self.hidden_size = target.config.hidden_size
        self.dtype = target.dtype
        self.fill_fn = jax.jit(partial(_fill, graphdef, attention.mixed), donate_argnums=(1,))
        self.loop_fn = jax.jit(partial(_draft_loop, graphdef, attention.decode, config.page_size, self.k,
                                       config.max_num_seqs), donate_argnums=(1,))
        self.reset_cache()

    def reset_cache(self) -> None:
        self.cache = kv_cache.allocate(self.one_layer, self.config.num_pages, self.config.page_size, self.dtype)
        self._last_hidden = jnp.zeros((self.config.max_num_seqs, self.hidden_size), self.dtype)
        self._rows: dict[int, int] = {}  # request id -> its row of _last_hidden

    def observe(self, batch: MixedBatch, scheduled: list[ScheduledRequest], result: StepResult,
                hidden: jax.Array) -> None:
        """Run the module over the batch's accepted positions, fed the true next tokens."""
        inputs, self._rows = _fill_inputs(batch, scheduled, result, self.config.max_num_seqs)
        self._last_hidden, self.cache = self.fill_fn(self.state, self.cache, hidden, *inputs)

    def propose(self, scheduled: list[ScheduledRequest], slots: list[int]) -> tuple[list[list[int]], jax.Array]:
        cfg = self.config
        rows = bucket(len(scheduled), cfg.batch_buckets)
        requests = [s.request for s in scheduled]
        known = [s.request.request_id in self._rows and n > 0 for s, n in zip(scheduled, slots)]
        row_map, positions = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
        row_map[:len(scheduled)] = [self._rows.get(r.request_id, 0) for r in requests]
        positions[:len(scheduled)] = [s.start for s in scheduled]
        active = np.zeros((rows,), bool)
        active[:len(scheduled)] = known
        pages = cfg.table_width(int(positions.max()) + self.k)
        sampling = SamplingTensors.build([r.params for r in requests], [r.seed for r in requests], rows)
        drafts, q = self._run_loop(row_map, positions, block_table(requests, rows, pages), active, sampling)
        drafts = np.asarray(drafts)
        return [drafts[i, :n].tolist() if ok else [] for i, (n, ok) in enumerate(zip(slots, known))], q

    def _run_loop(self, *inputs) -> tuple[jax.Array, jax.Array]:
        drafts, q, self.cache = self.loop_fn(self.state, self.cache, self._last_hidden, *inputs)
        return drafts, q

    def warmup(self) -> int:
        """Compile the fill per (tokens, pages) bucket and the loop per (rows, pages) bucket."""
        def fill(zeros, metadata):
            hidden = jnp.zeros((zeros.shape[0], self.hidden_size), self.dtype)
            _, self.cache = self.fill_fn(self.state, self.cache, hidden, zeros, zeros, zeros, metadata,
                                         np.zeros((self.config.max_num_seqs,), np.int32))

        count = warm_up_proposer(self.config, self._run_loop, fill)
        jax.block_until_ready(self.cache)
        return count


def _fill_inputs(batch: MixedBatch, scheduled: list[ScheduledRequest], result: StepResult,
                 seqs: int) -> tuple[tuple, dict[int, int]]:
    """Host arrays of the fill: per sequence its accepted positions (its scheduled tokens, less the
    rejected drafts), each fed the token after it; and each request's row."""
    size = batch.tokens.shape[0]
    hidden_index, tokens, positions, slots = (np.zeros((size,), np.int32) for _ in range(4))
    query_start_loc, context_lens, last_index = (np.zeros((n,), np.int32) for n in (seqs + 1, seqs, seqs))
    source, rows, offset = batch.metadata.query_start_loc, {}, 0
    for i, s in enumerate(scheduled):
        fed = s.num_tokens - len(s.drafts)
        if s.samples:
            new = result.tokens[i, :1 if result.counts is None else result.counts[i]].tolist()
            true = s.token_ids[:fed] + new
        else:
            true = s.token_ids + s.request.tokens_between(s.end, s.end + 1)
        valid = len(true) - 1
        start = int(source[i])
        span = slice(offset, offset + valid)
        hidden_index[span] = np.arange(start, start + valid)
        tokens[span] = true[1:]
        positions[span] = np.arange(s.start, s.start + valid)
        slots[span] = batch.metadata.slot_mapping[start:start + valid]
        query_start_loc[i], context_lens[i], last_index[i] = offset, s.start + valid, offset + valid - 1
        rows[s.request.request_id] = i
        offset += valid
    query_start_loc[len(scheduled):] = offset
    metadata = dataclasses.replace(batch.metadata, slot_mapping=slots, query_start_loc=query_start_loc,
                                   context_lens=context_lens)
    return (hidden_index, tokens, positions, metadata, last_index), rows
