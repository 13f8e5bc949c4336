"""Grouped-query attention over a paged KV cache (engine) or over the whole sequence (no cache)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import Linear, RMSNorm, RotaryEmbedding
from pallas_kernels import ops
from sharding import attention_shards, head_parallel
from sharding.attention_shards import AttentionShards

LayerCache = tuple[jax.Array, ...]  # K and V pages [Hkv, num_pages, page_size, D] (MLA: one latent tensor)

# FP8 KV cache (EngineConfig.kv_cache_dtype="fp8_e4m3"), vLLM's per-tensor scheme: a pool stored as
# float8_e4m3fn holds clip(x / KV_SCALE, -448, 448) and is read as fp8 * KV_SCALE. KV_SCALE is the
# one scale of every K, V and MLA latent pool: 1.0, as vLLM without calibration. The clip comes
# before the cast: XLA's CPU cast to e4m3 does not saturate (values past ~464 become NaN).
KV_SCALE = 1.0
FP8_KV_DTYPE = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = float(jnp.finfo(FP8_KV_DTYPE).max)  # 448


def is_fp8_pool(pages: jax.Array) -> bool:
    """Whether a cache tensor is an FP8 pool (stored scaled by KV_SCALE)."""
    return pages.dtype == FP8_KV_DTYPE


def quantize_kv(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """New K/V (or latent) values as the pool stores them: fp8 = clip(x / KV_SCALE) for an FP8
    pool, else a plain cast."""
    if jnp.dtype(dtype) != FP8_KV_DTYPE:
        return x.astype(dtype)
    return jnp.clip(x.astype(jnp.float32) / KV_SCALE, -FP8_MAX, FP8_MAX).astype(FP8_KV_DTYPE)


def pool_scale(pages: jax.Array) -> float:
    """The factor that turns a pool's stored values back into K/V: KV_SCALE for FP8, else 1."""
    return KV_SCALE if is_fp8_pool(pages) else 1.0


def _softmax_scale(q: jax.Array, scale: float | None) -> float:
    """The attention's softmax scale: the given one, else 1/sqrt(head_dim) as the ops default."""
    return q.shape[-1] ** -0.5 if scale is None else scale


def _unscale(out: jax.Array, kv_scale: float) -> jax.Array:
    """Attention over pages holding V / kv_scale, back to V's scale (a no-op for unscaled pools).
    The K side folds kv_scale into the softmax scale, so the ops see plain pages: a researcher's
    replacement for ops.ragged_paged_attention keeps its signature whatever the cache dtype."""
    return out if kv_scale == 1.0 else (out.astype(jnp.float32) * kv_scale).astype(out.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where a ragged step's flat tokens live in the paged cache (ops.ragged_paged_attention).

    slot_mapping: [T] int32 flat cache slot (page * page_size + offset) of each new token;
        padding tokens point into the reserved null page 0.
    query_start_loc: [S+1] int32 sequence s owns tokens query_start_loc[s]:query_start_loc[s+1],
        its last tokens.
    context_lens: [S] int32 tokens in the cache for each sequence, new ones included.
    block_tables: [S, max_pages] int32 page ids of each sequence (padded with 0).
    max_query_len: static bound on any sequence's new tokens (1: a decode step).
    shards: static; with data-parallel attention, the shards whose own metadata every field lays
        end to end (sharding/attention_shards.py: query_start_loc then has D * (S_s + 1) entries,
        local offsets, and the tables and slots local page ids); None: one shard.
    """

    slot_mapping: jax.Array
    query_start_loc: jax.Array
    context_lens: jax.Array
    block_tables: jax.Array
    max_query_len: int = dataclasses.field(default=1, metadata=dict(static=True))
    shards: AttentionShards | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def one_token_per_row(cls, positions: jax.Array, active: jax.Array, block_tables: jax.Array,
                          page_size: int, shards: AttentionShards | None = None) -> AttentionMetadata:
        """A decode step outside the scheduler (multi-step decode, draft proposals): row b's one new
        token at positions[b]; inactive rows write into the null page and attend to nothing. With
        DP attention the rows are `shards.size` equal groups, one per shard (local page ids)."""
        page = jnp.take_along_axis(block_tables, (positions // page_size)[:, None], axis=1, mode="fill", fill_value=0)
        slot = jnp.where(active, page[:, 0] * page_size + positions % page_size, 0)
        groups = 1 if shards is None else shards.size
        query_start_loc = jnp.tile(jnp.arange(positions.shape[0] // groups + 1, dtype=jnp.int32), groups)
        return cls(slot, query_start_loc, jnp.where(active, positions + 1, 0), block_tables, max_query_len=1,
                   shards=shards)

    def real_tokens(self) -> jax.Array:
        """[T] which flat tokens are not padding: padding writes slot 0 of a (shard's) null page,
        which no sequence ever holds."""
        return self.slot_mapping > 0

    def layer_per_shard(self, layer: nnx.Module, x_btd: jax.Array, positions_bt: jax.Array, cache: LayerCache,
                        impl: str) -> tuple[jax.Array, LayerCache] | None:
        """With DP attention and a layer whose weights every device holds whole, the whole layer
        (projections, cache write, attention) on each shard's tokens (attention_shards.
        layer_per_shard); None otherwise (the layer then runs its core per shard: per_shard)."""
        if self.shards is None or not attention_shards.replicated_layer(layer):
            return None
        call = lambda layer, x, pos, cache, metadata: layer(x, pos, cache, metadata, impl)  # noqa: E731
        return attention_shards.layer_per_shard(layer, self.shards, call, x_btd, positions_bt, tuple(cache),
                                                dataclasses.replace(self, shards=None))

    def per_shard(self, fn: Callable, tokens: tuple, pages: tuple, per_head: jax.Array | None = None,
                  heads: tuple | None = None) -> tuple:
        """fn(tokens, pages, per_head, metadata) -> (out, pages), run on each data-parallel attention
        shard's tokens, pages and metadata (self.shards) and on each KV-head shard (`heads`: (mesh,
        axes) from head_parallel.kv_heads_split) inside one shard_map; as one program when neither."""
        if self.shards is None and heads is None:
            return fn(tokens, pages, per_head, self)
        mesh = heads[0] if self.shards is None else self.shards.mesh
        return attention_shards.per_shard(fn, mesh, None if self.shards is None else self.shards.axes,
                                          None if heads is None else heads[1], tokens, pages, per_head,
                                          dataclasses.replace(self, shards=None))

    def attend(self, q_btnh: jax.Array, k_pages: jax.Array, v_pages: jax.Array, impl: str,
               **kwargs) -> jax.Array:
        """q [1, T, Hq, D] of the flat tokens against the pages -> [1, T, Hq, D]."""
        kv_scale = pool_scale(k_pages)
        if kv_scale != 1.0:
            kwargs["scale"] = _softmax_scale(q_btnh, kwargs.get("scale")) * kv_scale
        out = ops.ragged_paged_attention(q_btnh[0], k_pages, v_pages, self.query_start_loc, self.context_lens,
                                         self.block_tables, impl=impl, max_query_len=self.max_query_len, **kwargs)
        return _unscale(out, kv_scale)[None]

    def attend_latent(self, q_btnh: jax.Array, latent_pages: jax.Array, kv_lora_rank: int, impl: str,
                      scale: float) -> jax.Array:
        """MLA: q [1, T, Hq, D] against the latent pages (keys; values their first kv_lora_rank
        columns) -> [1, T, Hq, kv_lora_rank]."""
        kv_scale = pool_scale(latent_pages)
        out = ops.mla_attention(q_btnh[0], latent_pages, self.query_start_loc, self.context_lens, self.block_tables,
                                kv_lora_rank=kv_lora_rank, scale=scale * kv_scale, impl=impl,
                                max_query_len=self.max_query_len)
        return _unscale(out, kv_scale)[None]


def write_pages(pages: jax.Array, new_bqhd: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Scatter new K or V [1, T, Hkv, D] into pages [Hkv, N, P, D] at flat slots [T].

    Indexing (page, offset) directly, not a reshaped flat view: XLA then updates the donated
    cache in place instead of copying the whole layer's pages every step.
    """
    hkv, _, page_size, d = pages.shape
    slots = slot_mapping.reshape(-1)
    new_hnd = quantize_kv(new_bqhd.reshape(-1, hkv, d).transpose(1, 0, 2), pages.dtype)
    return pages.at[:, slots // page_size, slots % page_size].set(new_hnd)


class Attention(nnx.Module):
    """GQA attention: q/k/v/o projections (biases if config.attention_bias), per-head q/k RMSNorm
    before rotary if config.qk_norm (Qwen3), attention through `pallas_kernels.ops`; per-layer
    sliding window and learned sinks (gpt-oss) from config."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs, layer: int = 0):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        kw = dict(bias=config.attention_bias, dtype=dtype, rngs=rngs, fmt=config.packed_format("linear"))
        self.q_proj = Linear((d,), (h, hd), ("embed", "q_heads", "head_dim"), **kw)
        self.k_proj = Linear((d,), (kv, hd), ("embed", "kv_heads", "head_dim"), **kw)
        self.v_proj = Linear((d,), (kv, hd), ("embed", "kv_heads", "head_dim"), **kw)
        self.o_proj = Linear((h, hd), (d,), ("q_heads", "head_dim", "embed"), **kw)
        norm = lambda: RMSNorm(hd, config.rms_norm_eps, dtype=dtype, axis="head_dim")  # noqa: E731
        self.q_norm, self.k_norm = (norm(), norm()) if config.qk_norm else (None, None)
        self.sinks = nnx.Param(jnp.zeros((h,), dtype), logical_axes=("q_heads",)) if config.attention_sinks else None
        self.sliding_window = config.layer_sliding_window(layer)
        self.rotary = RotaryEmbedding(config)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, cache: LayerCache | None,
                 metadata: AttentionMetadata | None, attention_impl: str) -> tuple[jax.Array, LayerCache | None]:
        whole = None if cache is None else metadata.layer_per_shard(self, x_btd, positions_bt, cache, attention_impl)
        if whole is not None:
            return whole
        q, k = self.q_proj(x_btd, attention_impl), self.k_proj(x_btd, attention_impl)  # [B, T, Hq, D], [B, T, Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, positions_bt), self.rotary(k, positions_bt)
        v = self.v_proj(x_btd, attention_impl)
        kwargs = dict(sliding_window=self.sliding_window, sinks=None if self.sinks is None else self.sinks[...],
                      impl=attention_impl)
        if cache is None:
            out = ops.flash_attention(q, k, v, causal=True, **kwargs)
        else:
            out, cache = self._paged(q, k, v, cache, metadata, **kwargs)
        return self.o_proj(out.astype(x_btd.dtype), attention_impl), cache

    def _paged(self, q: jax.Array, k: jax.Array, v: jax.Array, cache: LayerCache, metadata: AttentionMetadata, *,
               sinks: jax.Array | None, impl: str, **kwargs) -> tuple[jax.Array, LayerCache]:
        """Write the new K/V into the pages and attend over them; per DP attention shard, and per
        KV-head shard where a kernel GSPMD cannot partition (or DP attention) meets split heads."""

        def run(tokens, pages, sinks, metadata):
            q, k, v = tokens
            pages = tuple(write_pages(p, x, metadata.slot_mapping) for p, x in zip(pages, (k, v)))
            return metadata.attend(q, *pages, sinks=sinks, impl=impl, **kwargs), pages

        split = metadata.shards is not None or head_parallel.needs_shard_map(impl)
        heads = head_parallel.kv_heads_split(self.k_proj.kernel) if split else None
        return metadata.per_shard(run, (q, k, v), tuple(cache), sinks, heads)
