"""ModelRunner: turns scheduled work into bucketed flat arrays and runs the jitted, cache-donating steps.

A mixed step is one ragged batch (vLLM V1): the scheduled tokens of every request laid end to end,
`tokens [T]`, `positions [T]`, `slot_mapping [T]`, and per sequence slot `query_start_loc [S+1]`,
`context_lens [S]`, `block_tables [S, P]`; logits only at each sequence's last token, or with
speculation at every verify position (engine/speculative/verify.py). T and P are shape buckets, S is
max_num_seqs. A decode-only step runs `decode_steps` steps with sampling inside one call (rows of one token each, the same ragged metadata with query_start_loc = 0..B).

With data-parallel attention (EngineConfig.attention_shards = D) the rows and the flat tokens are D
equal groups, shard d's requests in the d-th (Placement), the metadata each shard's own with local
page ids (sharding/attention_shards.py); results come back to the host in scheduled order.

Top-k logprobs are a static variant: a call computes MAX_LOGPROBS alternatives only when one of its
requests asks (compiled on first use, not by warmup), so other calls run the functions they always did.
So is a host constraint's mask (SamplingTensors.allowed): a mixed step holding a constrained request.
So are the research hooks (MixedBatch.hooks, models/hooks.py, engine/model_hooks.py): a mixed step
holding a request that captures residuals, edits them or asks for its routed experts.

Penalties and biases live in device tables (engine/penalties.py) that every step takes and returns,
donated like the cache: the runner writes a request's row when it first runs in a new sampling
slot, and the steps count each kept token in it on device.
"""

from __future__ import annotations

import dataclasses
import functools
from functools import partial
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine import batch_invariance, kv_cache, penalties
from engine.config import EngineConfig, bucket
from engine import model_hooks
from engine.logits_processor import LogitsProcessor, ProcessorBatch
from engine.penalties import PenaltyTables
from engine.request import MAX_LOGPROBS, Request, SamplingParams
from engine.sampler import SamplingTensors, sample, token_logprobs, top_logprobs
from engine.scheduler import ScheduledRequest
from engine.speculative import verify as spec_verify
from models.hooks import ModelHooks
from models.attention import AttentionMetadata, LayerCache
from models.loading.progress import progress
from sharding.attention_shards import AttentionShards


@dataclasses.dataclass(frozen=True)
class StepResult:
    """Host copies of what a step sampled: tokens and logprobs [rows, steps]; when asked, the top
    MAX_LOGPROBS alternatives [rows, steps, K], and per flat token [T] the logprob of the prompt token
    it predicts (and the top alternatives [T, K]); for a verify step how many of each row's tokens
    are real (accepted drafts + 1) [rows]."""

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    prompt_logprobs: np.ndarray | None = None
    prompt_top_ids: np.ndarray | None = None
    prompt_top_logprobs: np.ndarray | None = None
    counts: np.ndarray | None = None
    hooks: dict[str, np.ndarray] | None = None  # the asked research-hook reads, per flat token (models/hooks.py)
    prompt_starts: np.ndarray | None = None  # each scheduled request's first flat token (Placement.gather)
    wait_s: float = 0.0  # seconds the host blocked for these results (fetch): the call's device time as it saw it


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a step's scheduled requests sit in its arrays, in scheduled order: each one's row
    (sequence slot), first flat token and token count. Shard d's requests fill, in order, the d-th
    of D equal groups of rows and of flat tokens (one group without DP attention)."""

    rows: np.ndarray
    starts: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, requests: list[Request], counts: list[int], shards: int, rows: int, tokens: int) -> Placement:
        next_row = [d * (rows // shards) for d in range(shards)]
        next_token = [d * (tokens // shards) for d in range(shards)]
        out_rows, starts = [], []
        for r, n in zip(requests, counts):
            out_rows.append(next_row[r.shard])
            starts.append(next_token[r.shard])
            next_row[r.shard] += 1
            next_token[r.shard] += n
        return cls(np.asarray(out_rows, np.int64), np.asarray(starts, np.int64), np.asarray(counts, np.int64))

    def gather(self, result: StepResult) -> StepResult:
        """`result`'s rows, and its per flat token arrays, in scheduled order (request i's flat
        tokens from prompt_starts[i]: the one place that layout is decided)."""
        flat = np.concatenate([np.arange(s, s + n) for s, n in zip(self.starts, self.counts)] or [np.zeros(0, int)])
        arrays = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)
                  if f.name not in ("prompt_starts", "hooks", "wait_s")}
        gathered = {name: None if x is None else x[flat if name.startswith("prompt") else self.rows]
                    for name, x in arrays.items()}
        read = None if result.hooks is None else {name: x[flat] for name, x in result.hooks.items()}
        return StepResult(**gathered, hooks=read, prompt_starts=np.cumsum(self.counts) - self.counts,
                          wait_s=result.wait_s)


@dataclasses.dataclass(frozen=True)
class DecodeInputs:
    """A decode call's host arrays: the fed tokens [rows, steps] (in the last column) and their
    positions [rows], block tables, which rows are real, and sampling parameters; host-only,
    where its requests sit (`placement`)."""

    tokens: np.ndarray
    positions: np.ndarray
    block_tables: np.ndarray
    active: np.ndarray
    sampling: SamplingTensors
    num_logprobs: int = 0  # static: 0 or MAX_LOGPROBS
    placement: Placement | None = None

    def args(self, tokens: jax.Array | np.ndarray | None = None) -> tuple:
        """The decode function's arguments; `tokens` (on device) replaces the host tokens."""
        return (self.tokens if tokens is None else tokens, self.positions, self.block_tables, self.active,
                self.sampling, self.num_logprobs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MixedBatch:
    """A mixed step's inputs: flat tokens [T] with their metadata, the flat indices of the tokens
    it takes logits at (each sequence slot's last [S], or with `verify` every verify position
    [L]), and per sequence slot [S] its sampling parameters; when a request asks for prompt
    logprobs, per flat token the prompt token it predicts (prompt_targets [T])."""

    tokens: jax.Array
    positions: jax.Array
    metadata: AttentionMetadata
    logits_indices: jax.Array
    sampling: SamplingTensors
    num_logprobs: int = dataclasses.field(default=0, metadata=dict(static=True))  # 0 or MAX_LOGPROBS
    prompt_targets: jax.Array | None = None
    verify: spec_verify.VerifyRows | None = None
    hooks: ModelHooks | None = None  # research hooks' edits: the hooked variant (engine/model_hooks.py)


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


SAMPLE_ROW_TIERS = (8,)  # a mixed step with at most this many sequences samples only that many rows


def _mixed_step(graphdef: nnx.GraphDef, impl: str, synthetic_accepts: float | None, state: nnx.State,
                cache: list[LayerCache], batch: MixedBatch, tables: PenaltyTables | None = None, *,
                all_rows: bool = False) -> tuple:
    """One ragged step: every scheduled token through the model, one sample per sequence slot (a
    verify step: its accepted drafts and next token per slot, their count, and the hidden states
    [T, D] an MTP proposer continues from); the cache, and the penalty tables with the kept tokens
    counted (rows whose sample is discarded are in the null slot). all_rows: sample every slot
    (batch-invariant mode, engine/batch_invariance.py)."""
    model = nnx.merge(graphdef, state)
    # batch.hooks None: the plain step; else the research hooks' variant (edits applied, residuals and routing read)
    hidden, cache, read = model.hooked(batch.tokens[None], batch.positions[None], cache, batch.metadata, impl,
                                       batch.hooks)
    if batch.verify is not None:
        logits = model.logits(hidden[0, batch.logits_indices])  # [L, V]
        positions = batch.positions[batch.logits_indices] + 1
        tokens, logprobs, counts = spec_verify.verify(logits, batch.sampling, positions, batch.verify,
                                                      synthetic_accepts, tables)
        if tables is not None:
            kept = jnp.arange(tokens.shape[1])[None, :] < counts[:, None]
            tables = penalties.record(tables, batch.sampling.slot, tokens, kept)
        return tokens, logprobs, {"counts": counts}, hidden[0], cache, tables
    next_tokens, logprobs, extras = _sample_rows(model, hidden[0], batch, tables, all_rows)
    if tables is not None:
        tables = penalties.record(tables, batch.sampling.slot, next_tokens)
    extras = jax.tree.map(lambda x: x[:, None], extras)
    if batch.prompt_targets is not None:
        extras |= _prompt_logprobs(model.logits(hidden[0]), batch.prompt_targets)
    if read:
        extras["hooks"] = read
    return next_tokens[:, None], logprobs[:, None], extras, cache, tables


def _sample_rows(model: nnx.Module, hidden: jax.Array, batch: MixedBatch,
                 tables: PenaltyTables | None, all_rows: bool = False) -> tuple[jax.Array, jax.Array, dict]:
    """A sample (and the asked top-k) at each sequence slot's last token [S]. The LM head and sampler
    run over the fewest rows of SAMPLE_ROW_TIERS (or all S) that hold the step's sequences, picked
    on device by a switch inside one executable: at S = 64, one 256-token prompt spent ~7% of its
    prefill on the 63 empty slots' logits (SmolLM2), and a shape bucket per tier would multiply
    compilations. all_rows: always all S (the decode call's row count: batch-invariant mode)."""
    slots = batch.logits_indices.shape[0]
    tiers = tuple(t for t in SAMPLE_ROW_TIERS if t < slots) + (slots,)

    def rows(n: int) -> tuple[jax.Array, jax.Array, dict]:
        index = batch.logits_indices[:n]
        sampling = jax.tree.map(lambda x: x[:n], batch.sampling)
        logits = model.logits(hidden[index])
        outputs = (*sample(logits, sampling, batch.positions[index] + 1, tables), _top(logits, batch.num_logprobs))
        return jax.tree.map(lambda x: jnp.pad(x, [(0, slots - n)] + [(0, 0)] * (x.ndim - 1)), outputs)

    if batch.metadata.shards is not None or all_rows:  # DP attention (every shard's slots hold sequences) or the mode
        return rows(slots)
    qsl = batch.metadata.query_start_loc
    num_seqs = jnp.sum(qsl[1:] > qsl[:-1])  # scheduled sequences fill the first slots, each >= 1 token
    return jax.lax.switch(jnp.searchsorted(jnp.asarray(tiers), num_seqs), [partial(rows, n) for n in tiers])


def _decode_loop(graphdef: nnx.GraphDef, impl: str, page_size: int, num_steps: int,
                 shards: AttentionShards | None, state: nnx.State,
                 cache: list[LayerCache], tokens: jax.Array, positions: jax.Array, block_tables: jax.Array,
                 active: jax.Array, sampling: SamplingTensors, num_logprobs: int = 0,
                 tables: PenaltyTables | None = None, *, model_rows: int | None = None
                 ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], list[LayerCache], PenaltyTables | None]:
    """num_steps decode steps; step i feeds token i at positions + i. Inactive rows write page 0.

    tokens [B, num_steps]: the first fed token is its last column (so the previous call's sampled
    tokens feed a call dispatched before they reach the host, without an op outside the jit).
    num_logprobs (static): top alternatives per sampled token, [B, num_steps, k] (none when 0).
    tables: the penalty tables, each step's tokens counted before the next step samples.
    model_rows: the model runs these many rows, the B rows padded (batch-invariant mode), and the
    LM head and sampler the B rows."""
    model = nnx.merge(graphdef, state)
    b = tokens.shape[0]

    def step(i, carry):
        cache, tables, token, outs = carry
        pos = positions + i
        fed, fed_pos, fed_active, fed_tables = batch_invariance.pad_rows((token, pos, active, block_tables), model_rows)
        metadata = AttentionMetadata.one_token_per_row(fed_pos, fed_active, fed_tables, page_size, shards)
        hidden, cache = model(fed[None], fed_pos[None], cache, metadata, attention_impl=impl)
        logits = model.logits(hidden[0, :b])
        token, logprob = sample(logits, sampling, pos + 1, tables)
        if tables is not None:
            tables = penalties.record(tables, sampling.slot, token)
        new = {"tokens": token, "logprobs": logprob, **_top(logits, num_logprobs)}
        return cache, tables, token, {name: outs[name].at[:, i].set(value) for name, value in new.items()}

    outs = {"tokens": jnp.zeros((b, num_steps), jnp.int32), "logprobs": jnp.zeros((b, num_steps), jnp.float32)}
    if num_logprobs:
        outs |= {"top_ids": jnp.zeros((b, num_steps, num_logprobs), jnp.int32),
                 "top_logprobs": jnp.zeros((b, num_steps, num_logprobs), jnp.float32)}
    cache, tables, _, outs = jax.lax.fori_loop(0, num_steps, step, (cache, tables, tokens[:, -1], outs))
    return outs.pop("tokens"), outs.pop("logprobs"), outs, cache, tables


@functools.lru_cache(maxsize=None)
def jitted_steps(graphdef: nnx.GraphDef, decode_impl: str, mixed_impl: str, page_size: int, num_steps: int,
                 synthetic_accepts: float | None = None, shards: AttentionShards | None = None,
                 model_rows: int | None = None):
    """The jitted mixed and decode functions with the static arguments closed over (shards: the
    DP attention shards, which a mixed step's metadata carries itself; model_rows: batch-invariant
    mode's rows of every model call, engine/batch_invariance.py). Each donates the cache and
    the penalty tables (its last argument: None runs without penalties) and returns them last.

    Cached, so engines over the same model share compilations; closing over the GraphDef (rather
    than passing it as a static argument) spares hashing it on every call (~5 ms per call).
    """
    mixed = jax.jit(partial(_mixed_step, graphdef, mixed_impl, synthetic_accepts, all_rows=model_rows is not None),
                    donate_argnums=(1, 3))
    decode = jax.jit(partial(_decode_loop, graphdef, decode_impl, page_size, num_steps, shards, model_rows=model_rows),
                     donate_argnums=(1, 8), static_argnums=(7,))
    return mixed, decode


def block_table(requests: list[Request], rows: int, width: int, pages_per_shard: int | None = None,
                at: np.ndarray | None = None) -> np.ndarray:
    """[rows, width] page ids of each request (padded with the null page 0), request i's at row
    at[i] (default i); with DP attention its shard's local ids (page % pages_per_shard)."""
    table = np.zeros((rows, width), np.int32)
    for i, r in enumerate(requests):
        pages = np.asarray(r.pages[:width], np.int64)
        table[i if at is None else at[i], :len(pages)] = pages if pages_per_shard is None else pages % pages_per_shard
    return table


def max_query_len(config: EngineConfig, decode_only: bool) -> int:
    """The static bound on one sequence's tokens in a mixed step: a chunk, or a verify's 1 + K;
    batch-invariant: 1, so the jnp attention computes prefill rows per token, as it does decode rows."""
    if config.batch_invariant:
        return 1
    return config.num_speculative_tokens + 1 if decode_only and config.num_speculative_tokens else config.prefill_chunk


def verify_buckets(config: EngineConfig) -> tuple[int, ...]:
    """Token buckets a decodes-only verify step can take: up to S (K + 1) tokens (none without speculation)."""
    if not config.num_speculative_tokens:
        return ()
    most = min(config.max_num_seqs * (config.num_speculative_tokens + 1), config.max_num_batched_tokens)
    return tuple(t for t in config.token_buckets if t <= bucket(most, config.token_buckets))


def warmup_shapes(config: EngineConfig) -> list[tuple[str, int, int]]:
    """Every compiled shape of an engine as (run, size, pages): decode calls by rows, mixed steps by
    tokens, and with speculation decodes-only verify steps by tokens (the runner's and the
    proposers' warm-ups walk the same list)."""
    return [(run, n, pages) for pages in config.page_buckets
            for run, sizes in (("decode", config.batch_buckets), ("mixed", config.token_buckets),
                               ("verify", verify_buckets(config))) for n in sizes]


def padding_metadata(config: EngineConfig, num_tokens: int, pages: int, decode_only: bool,
                     shards: AttentionShards | None = None) -> AttentionMetadata:
    """The metadata of `num_tokens` padding tokens and no sequence (they write the null page's slot
    0), for compiling a mixed step's (tokens, pages) bucket."""
    rows, zeros = config.max_num_seqs, np.zeros((num_tokens,), np.int32)
    return AttentionMetadata(zeros, np.zeros((rows + config.attention_shards,), np.int32), np.zeros((rows,), np.int32),
                             np.zeros((rows, pages), np.int32), max_query_len=max_query_len(config, decode_only),
                             shards=shards)


def mixed_batch(scheduled: list[ScheduledRequest], config: EngineConfig, draft_probs: jax.Array | None = None,
                shards: AttentionShards | None = None, masks: list[np.ndarray | None] | None = None,
                processors: tuple[LogitsProcessor, ...] = ()) -> tuple[MixedBatch, Placement]:
    """The flat, bucketed numpy arrays of one mixed step (padding tokens write the null page's slot 0)
    and where its requests sit; with speculation on, the verify rows too (draft_probs [S, K, V]: the
    draft model's q), and a step of decodes only bounds each sequence's queries by 1 + K (attention
    works per that bound). With DP attention (`shards`) each shard's group of rows and its segment
    of tokens hold its own requests, and query_start_loc its D local offset lists end to end.
    masks (engine/constrained_step.py): per scheduled request its constraint's masks [1 + drafts, W]
    or None; None when no request is constrained. A row whose sample is discarded (mid-prompt)
    samples in the null slot, so that nothing is counted for it. processors: the engine's logits
    processors (engine/logits_processor.py), each row's arguments riding in its sampling tensors."""
    d, requests, counts = config.attention_shards, [s.request for s in scheduled], [s.num_tokens for s in scheduled]
    per_shard = np.bincount([r.shard for r in requests], weights=counts, minlength=d).astype(np.int32)
    t, rows = bucket(d * int(per_shard.max()), config.token_buckets), config.max_num_seqs
    placement = Placement.of(requests, counts, d, rows, t)
    pages = config.table_width(max(s.end for s in scheduled))
    pages_per_shard = config.num_pages // d
    tokens, positions, slots = (np.zeros((t,), np.int32) for _ in range(3))
    seqs = rows // d  # sequence slots per shard: shard k's offsets are query_start_loc[k * (seqs + 1):][:seqs + 1]
    query_start_loc = np.repeat(per_shard, seqs + 1).astype(np.int32)
    context_lens = np.zeros((rows,), np.int32)
    for s, row, start in zip(scheduled, placement.rows, placement.starts):
        pos = np.arange(s.start, s.end)
        span = slice(start, start + s.num_tokens)
        tokens[span] = s.token_ids
        positions[span] = pos
        page = np.asarray(s.request.pages)[pos // config.page_size] % pages_per_shard
        slots[span] = page * config.page_size + pos % config.page_size
        query_start_loc[row + row // seqs] = start - s.request.shard * (t // d)
        context_lens[row] = s.end
    metadata = AttentionMetadata(slots, query_start_loc, context_lens,
                                 block_table(requests, rows, pages, pages_per_shard, placement.rows),
                                 max_query_len=max_query_len(config, all(not r.is_prefilling for r in requests)),
                                 shards=shards)
    params = [r.params for r in requests]
    sampling = SamplingTensors.build(params, [r.seed for r in requests], rows, placement.rows,
                                     [s.request.sampling_slot if s.samples else 0 for s in scheduled])
    sampling = dataclasses.replace(sampling, processors=ProcessorBatch.of(processors, requests, rows, placement.rows))
    ends = placement.starts + placement.counts
    if config.num_speculative_tokens:  # logprobs are refused with speculation (LLM._checked)
        indices, verify = spec_verify.build(list(ends), [s.drafts for s in scheduled], rows,
                                            config.num_speculative_tokens, t, draft_probs, masks)
        return MixedBatch(tokens, positions, metadata, indices, sampling, verify=verify), placement
    if masks is not None:
        sampling = dataclasses.replace(sampling, allowed=first_masks(masks, rows, placement.rows))
    logits_indices = np.zeros((rows,), np.int32)
    logits_indices[placement.rows] = ends - 1
    return MixedBatch(tokens, positions, metadata, logits_indices, sampling, num_logprobs(params),
                      prompt_targets(scheduled, t, placement)), placement


def first_masks(masks: list[np.ndarray | None], rows: int, at: np.ndarray) -> np.ndarray:
    """[rows, W] each constrained request's mask (its first position's) at its row; others allow all."""
    words = next(m for m in masks if m is not None).shape[1]
    allowed = np.full((rows, words), 0xFFFFFFFF, np.uint32)
    for m, row in zip(masks, at):
        if m is not None:
            allowed[row] = m[0]
    return allowed


def wants_prompt_logprobs(s: ScheduledRequest) -> bool:
    """Whether this chunk holds positions whose prompt logprobs the request asked for and lacks."""
    prompt_len = len(s.request.prompt_token_ids)
    return (s.request.params.prompt_logprobs is not None and len(s.request.prompt_logprobs) < prompt_len
            and s.start + 1 < prompt_len)


def prompt_targets(scheduled: list[ScheduledRequest], num_tokens: int, placement: Placement) -> np.ndarray | None:
    """[T] the prompt token each flat position predicts (position p: prompt token p + 1, across chunk
    boundaries too; 0 where none), or None when no scheduled chunk needs prompt logprobs."""
    if not any(wants_prompt_logprobs(s) for s in scheduled):
        return None
    targets = np.zeros((num_tokens,), np.int32)
    for s, offset in zip(scheduled, placement.starts):
        prompt = s.request.prompt_token_ids
        following = prompt[s.start + 1:s.start + 1 + s.num_tokens]
        targets[offset:offset + len(following)] = following
    return targets


def _variants(run: str, logprobs: bool) -> list[tuple[int, bool]]:
    """A step's compiled variants as (top-k logprobs, prompt logprobs): the plain one, and with
    `logprobs` the others (prompt logprobs only where prompts run: mixed steps)."""
    if not logprobs:
        return [(0, False)]
    return [(top, prompt) for top in (0, MAX_LOGPROBS) for prompt in (False, True) if run == "mixed" or not prompt]


def padding_sampling(rows: int, processors: tuple[LogitsProcessor, ...] = ()) -> SamplingTensors:
    """The sampling tensors of `rows` padding rows (with the logits processors' default arguments,
    so that warm-up compiles the programs requests run)."""
    return dataclasses.replace(SamplingTensors.build([], [], rows), processors=ProcessorBatch.of(processors, [], rows))


def padding_decode(config: EngineConfig, rows: int, pages: int, processors: tuple[LogitsProcessor, ...] = ()) -> tuple:
    """A decode call's arguments for `rows` padding rows (no request), for compiling its bucket."""
    zeros = np.zeros((rows,), np.int32)
    return (np.zeros((rows, config.decode_steps), np.int32), zeros, np.zeros((rows, pages), np.int32),
            np.zeros((rows,), bool), padding_sampling(rows, processors), 0)


def padding_mixed(config: EngineConfig, num_tokens: int, pages: int, decode_only: bool = False,
                  shards: AttentionShards | None = None, draft_probs: jax.Array | None = None,
                  processors: tuple[LogitsProcessor, ...] = ()) -> MixedBatch:
    """A mixed batch of `num_tokens` padding tokens (no sequence), for compiling its bucket."""
    rows = config.max_num_seqs
    zeros = np.zeros((num_tokens,), np.int32)
    metadata = padding_metadata(config, num_tokens, pages, decode_only, shards)
    sampling = padding_sampling(rows, processors)
    if config.num_speculative_tokens:
        indices, verify = spec_verify.padding(num_tokens, rows, config.num_speculative_tokens, draft_probs)
        return MixedBatch(zeros, zeros, metadata, indices, sampling, verify=verify)
    return MixedBatch(zeros, zeros, metadata, np.zeros((rows,), np.int32), sampling)


class ModelRunner:
    """Owns the device state (params, KV cache, penalty tables) and the two jitted step functions."""

    def __init__(self, model: nnx.Module, cache: list[LayerCache], config: EngineConfig,
                 decode_impl: str, mixed_impl: str, synthetic_accepts: float | None = None,
                 padding_draft_probs: jax.Array | None = None, shards: AttentionShards | None = None,
                 processors: tuple[LogitsProcessor, ...] = ()):
        """synthetic_accepts: the synthetic speculation mode's mean accepted drafts per step;
        padding_draft_probs: a [S, K, V] q for warm-up when a draft model supplies one;
        shards: the DP attention shards (config.attention_shards of them), None without;
        processors: the engine's logits processors (engine/logits_processor.py)."""
        graphdef, self.state = nnx.split(model)
        self.cache = cache
        self.config = config
        self.padding_draft_probs = padding_draft_probs
        self.shards = shards
        self.processors = processors
        self.mixed_fn, self.decode_fn = jitted_steps(graphdef, decode_impl, mixed_impl, config.page_size,
                                                      config.decode_steps, synthetic_accepts, shards,
                                                      batch_invariance.model_rows(config))
        # A verify step of decodes only (1 + k tokens each) runs the decode attention impl (on a CPU
        # the C++ kernel, measured faster for short queries than the jnp path chosen for chunks).
        self.verify_fn = (jitted_steps(graphdef, decode_impl, decode_impl, config.page_size, config.decode_steps,
                                       synthetic_accepts)[0] if config.num_speculative_tokens else None)
        self.vocab_size = model.config.vocab_size
        self.hidden_size = model.config.hidden_size
        self.expert_counts = model_hooks.expert_counter(model.config, config.count_experts)  # None: dense
        self.count_experts = config.count_experts
        self.penalties = PenaltyTables.allocate(config.sampling_slots, self.vocab_size)
        self._row_leases = np.zeros((config.sampling_slots,), np.int64)  # the lease each slot's row was written for
        self._write_row = jax.jit(penalties.write_row, donate_argnums=(0,))

    def write_rows(self, requests: list[Request]) -> None:
        """Write the penalty-table row of each request holding a sampling slot under a lease whose
        row is not written yet (from its host tokens: a request back after preemption counts anew)."""
        for r in requests:
            if r.sampling_slot and self._row_leases[r.sampling_slot] != r.slot_lease:
                row = r.logits_row.values(r.prompt_token_ids, r.output_token_ids, self.vocab_size)
                self.penalties = self._write_row(self.penalties, np.int32(r.sampling_slot), row)
                self._row_leases[r.sampling_slot] = r.slot_lease

    def recover_penalties(self) -> None:
        """Reallocate the penalty tables if a failed call consumed them (every row is rewritten
        from its request's host tokens when it next runs)."""
        if not kv_cache.is_intact(self.penalties):
            self.penalties = PenaltyTables.allocate(self.config.sampling_slots, self.vocab_size)
            self._row_leases[:] = 0

    def decode_inputs(self, requests: list[Request], steps_ahead: int = 0) -> DecodeInputs:
        """Host arrays of a decode call for `requests`, `steps_ahead` tokens past their last one
        (a call dispatched before the previous call's tokens reach the host feeds them on device)."""
        cfg, d = self.config, self.config.attention_shards
        rows = bucket(d * int(np.bincount([r.shard for r in requests], minlength=d).max()), cfg.batch_buckets)
        at = Placement.of(requests, [1] * len(requests), d, rows, rows)
        positions = np.zeros((rows,), np.int32)
        positions[at.rows] = [r.num_tokens - 1 + steps_ahead for r in requests]
        tokens = np.zeros((rows, cfg.decode_steps), np.int32)
        tokens[at.rows, -1] = [r.last_token for r in requests]
        pages = cfg.table_width(int(positions.max()) + cfg.decode_steps)
        active = np.zeros((rows,), bool)
        active[at.rows] = True
        params = [r.params for r in requests]
        sampling = SamplingTensors.build(params, [r.seed for r in requests], rows, at.rows,
                                         [r.sampling_slot for r in requests])
        sampling = dataclasses.replace(sampling, processors=ProcessorBatch.of(self.processors, requests, rows, at.rows))
        return DecodeInputs(tokens, positions, block_table(requests, rows, pages, cfg.num_pages // d, at.rows), active,
                            sampling, num_logprobs(params), at)

    def warmup(self, logprobs: bool = False) -> int:
        """Compile every (rows, pages) decode bucket and (tokens, pages) mixed bucket with all-padding
        inputs (they write page 0 only), and wait for those runs: dispatch is asynchronous, so the
        first request would wait instead. logprobs: each bucket's logprob variants too (top-k
        alternatives; a prefill's prompt logprobs), which otherwise compile on first use. Then the
        penalty tables' row writer (it rewrites the null row)."""
        programs = 0
        for run, n, pages in progress(warmup_shapes(self.config), "compiling shapes"):
            for top, prompt in _variants(run, logprobs):
                if run == "decode":
                    self.run_decode_arrays(*padding_decode(self.config, n, pages, self.processors)[:-1], top)
                else:
                    batch = padding_mixed(self.config, n, pages, run == "verify", self.shards, self.padding_draft_probs,
                                          self.processors)
                    batch = dataclasses.replace(batch, num_logprobs=top,
                                                prompt_targets=np.zeros((n,), np.int32) if prompt else None)
                    self.run_mixed_arrays(batch, run == "verify")
                programs += 1
            jax.block_until_ready(self.cache)  # each bar step is one compiled (and run) shape
        self.penalties = self._write_row(self.penalties, np.int32(0), PenaltyTables.null(self.vocab_size))
        return programs + 1

    def run_mixed_arrays(self, batch: MixedBatch, decode_only: bool = False) -> tuple:
        """(tokens, logprobs, extras) and for a verify step its hidden states [T, D]; decode_only:
        every sequence is a decode (with drafts), which the verify function runs."""
        fn = self.verify_fn if decode_only and self.verify_fn is not None else self.mixed_fn
        *outputs, self.cache, self.penalties = fn(self.state, self.cache, batch, self.penalties)
        return tuple(outputs)

    def run_decode_arrays(self, *inputs) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """inputs: DecodeInputs.args() (num_logprobs last)."""
        *outputs, self.cache, self.penalties = self.decode_fn(self.state, self.cache, *inputs, self.penalties)
        return tuple(outputs)

    def mixed(self, scheduled: list[ScheduledRequest], masks: list[np.ndarray | None] | None = None) -> StepResult:
        """Run one (non-verify) mixed step; masks: its requests' constraint masks (mixed_batch)."""
        batch, placement = mixed_batch(scheduled, self.config, shards=self.shards, masks=masks,
                                       processors=self.processors)
        batch = dataclasses.replace(batch, hooks=model_hooks.build(scheduled, placement.starts, len(batch.tokens),
                                                                   self.hidden_size, self.count_experts))
        outputs = model_hooks.keep_asked(self.run_mixed_arrays(batch),
                                         model_hooks.asked_outputs(scheduled, self.count_experts))
        result = placement.gather(fetch(outputs))
        model_hooks.count(self.expert_counts, result.hooks, int(placement.counts.sum()))
        return result


def fetch(outputs: tuple) -> StepResult:
    """The one host sync of a step: the sampled tokens, their logprobs and whatever logprobs were
    asked (or a verify step's counts); a verify step's hidden states stay on the device. Records
    how long the host blocked on it (engine/step_costs.py)."""
    start = time.perf_counter()
    tokens, logprobs, extras = jax.device_get(outputs[:3])
    return StepResult(tokens, logprobs, **extras, wait_s=time.perf_counter() - start)
