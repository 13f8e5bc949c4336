"""Paged attention: the last Q tokens of each sequence against its KV pages.

Layout (engine/kv_cache.py): k/v pages [Hkv, num_pages, page_size, D]; block_tables [B, max_pages] int32
maps a sequence's logical page i to a physical page (padding entries point at the null page 0);
context_lens [B] int32 counts every token of the sequence including the Q new ones, which are
already written into the pages. Query i of sequence b sits at position context_lens[b] - Q + i.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import blocked_attention as ba

from pallas_kernels import hopper
from pallas_kernels.blocked_attention import check_attention_args, masked_softmax_ref, visible_mask


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    sliding_window: int | None = None,
    sinks: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Gathers each sequence's pages and attends with a position mask (jit-friendly, static shapes).

    q [B, Q, Hq, D]; returns [B, Q, Hq, D] in q.dtype. A row with context_len 0 (or a query whose
    position is negative because context_len < Q) gives zeros.
    """
    b, q_len, hq, d = q.shape
    hkv, _, page_size, _ = k_pages.shape
    check_attention_args(hq, hkv, sliding_window, sinks)
    scale = d**-0.5 if scale is None else scale
    s_len = block_tables.shape[1] * page_size
    k = k_pages[:, block_tables].reshape(hkv, b, s_len, d)  # [Hkv, B, S, D]
    v = v_pages[:, block_tables].reshape(hkv, b, s_len, d)
    # Batch axes (Hkv, B) lead in both matmuls, as in the gathered pages, so XLA never transposes
    # the gathered K/V (that copy doubled this function's time at batch 32 on CPU); only the much
    # smaller queries and scores are transposed.
    q_kbgqd = q.reshape(b, q_len, hkv, hq // hkv, d).transpose(2, 0, 3, 1, 4)
    s = jnp.einsum("kbgqd,kbsd->kbgqs", q_kbgqd, k, preferred_element_type=jnp.float32) * scale
    s = s.transpose(1, 0, 2, 3, 4)  # [B, Hkv, G, Q, S]
    lens = context_lens.astype(jnp.int32)[:, None, None]  # [B, 1, 1]
    q_pos = lens - q_len + jnp.arange(q_len)[None, :, None]  # [B, Q, 1]
    k_pos = jnp.arange(s_len)[None, None, :]  # [1, 1, S]
    mask = visible_mask(q_pos, k_pos, True, sliding_window) & (k_pos < lens) & (q_pos >= 0)
    sinks_kg = None if sinks is None else sinks.astype(jnp.float32).reshape(hkv, hq // hkv)
    p = masked_softmax_ref(s, mask[:, None, None], sinks_kg)  # [B, Hkv, G, Q, S]
    o = jnp.einsum("kbgqs,kbsd->kbgqd", p.transpose(1, 0, 2, 3, 4), v.astype(jnp.float32))
    return o.transpose(1, 3, 0, 2, 4).reshape(b, q_len, hq, d).astype(q.dtype)


def paged_attention_blocked(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            block_tables: jax.Array, context_lens: jax.Array, *,
                            sliding_window: int | None = None,
                            sinks: jax.Array | None = None,
                            scale: float | None = None,
                            pages_per_step: int = 4) -> jax.Array:
    """The XLA path the engine runs off-GPU: an online softmax over the block table,
    `pages_per_step` pages of every sequence per loop step, up to the longest context in the batch.

    Same contract as `paged_attention_reference`, which gathers every page of every sequence at
    once; on CPU that gather and its copy took ~40% of a batch-32 SmolLM2 decode step. A step of a
    few pages keeps the gathered block in cache; one page per step lost to the loop's overhead.
    """
    b, q_len, hq, d = q.shape
    hkv, _, page_size, _ = k_pages.shape
    check_attention_args(hq, hkv, sliding_window, sinks)
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    q_kbgqd = q.reshape(b, q_len, hkv, g, d).transpose(2, 0, 3, 1, 4).astype(jnp.float32) * scale
    lens = context_lens.astype(jnp.int32)
    q_pos = lens[:, None, None] - q_len + jnp.arange(q_len)[None, :, None]  # [B, Q, 1]

    block = pages_per_step * page_size
    tables = jnp.pad(block_tables, ((0, 0), (0, -block_tables.shape[1] % pages_per_step)))
    tables = tables.reshape(b, -1, pages_per_step)  # [B, steps, pages_per_step]

    def step(j, carry):
        m_i, l_i, acc = carry  # [Hkv, B, G, Q], [Hkv, B, G, Q], [Hkv, B, G, Q, D]
        pages = tables[:, j]  # [B, pages_per_step]
        k = k_pages[:, pages].reshape(hkv, b, block, d).astype(jnp.float32)  # [Hkv, B, block, D]
        v = v_pages[:, pages].reshape(hkv, b, block, d).astype(jnp.float32)
        s = jnp.einsum("kbgqd,kbpd->kbgqp", q_kbgqd, k)
        k_pos = (j * block + jnp.arange(block))[None, None, :]  # [1, 1, block]
        mask = visible_mask(q_pos, k_pos, True, sliding_window) & (k_pos < lens[:, None, None]) & (q_pos >= 0)
        s = jnp.where(mask[None, :, None], s, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(m_i - m_safe)
        p = jnp.exp(s - m_safe[..., None])
        acc = acc * alpha[..., None] + jnp.einsum("kbgqp,kbpd->kbgqd", p, v)
        return m_new, l_i * alpha + p.sum(axis=-1), acc

    stats = (hkv, b, g, q_len)
    init = (jnp.full(stats, -jnp.inf), jnp.zeros(stats), jnp.zeros((*stats, d)))
    num_steps = jnp.minimum((lens.max() + block - 1) // block, tables.shape[1])
    m_i, l_i, acc = jax.lax.fori_loop(0, num_steps, step, init)
    if sinks is not None:  # the sink joins the denominator only
        sink = sinks.astype(jnp.float32).reshape(hkv, 1, g, 1)
        m_fin = jnp.maximum(m_i, sink)
        rescale = jnp.exp(m_i - m_fin)
        l_i = l_i * rescale + jnp.exp(sink - m_fin)
        acc = acc * rescale[..., None]
    out = acc / jnp.where(l_i > 0, l_i, 1.0)[..., None]
    return out.transpose(1, 3, 0, 2, 4).reshape(b, q_len, hq, d).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Mosaic GPU kernel (H100): flash_attention.attention_program with a paged load_kv. A KV block of
# block_kv tokens is pages_per_block pages, one TMA each onto the slot's barrier, at the page
# index read from the block table. Programs per (sequence, KV head, row tile, split): at small
# batch the KV range is split so the programs fill the SMs (flash-decoding); the partials merge
# in jnp. Pages wholly outside the sliding window are never read.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PagedAttentionConfig:
    """Block sizes of the paged kernel.

    block_rows: query rows (Q x query heads per KV head) per program; wgmma wants M % 64 == 0.
    block_kv: tokens per KV step, a whole number of pages; bf16 PV wants a multiple of 64.
    num_sms: streaming multiprocessors to fill when choosing the number of KV splits; None: the
        target device's (hopper.target_num_sms()).
    max_splits: upper bound on KV splits per (sequence, KV head, row tile).
    """

    block_rows: int = 64
    block_kv: int = 128
    num_sms: int | None = None
    max_splits: int = 16

    def __post_init__(self):
        if self.block_rows % 64 or self.block_kv % 64:
            raise ValueError(f"block_rows and block_kv must be multiples of 64: {self}")
        if (self.num_sms is not None and self.num_sms < 1) or self.max_splits < 1:
            raise ValueError(f"num_sms (or None) and max_splits must be positive: {self}")


def paged_attention_config(device_kind: str) -> PagedAttentionConfig:
    """The frozen block sizes per device kind (H100 and H200 share them; CPU interprets them)."""
    if "H200" in device_kind or "H100" in device_kind:
        return PagedAttentionConfig(block_rows=64, block_kv=128, max_splits=16)
    return PagedAttentionConfig()


def num_kv_splits(programs: int, max_blocks: int, num_sms: int, max_splits: int) -> int:
    """KV splits so that programs x splits roughly fills the SMs (flash-decoding at small batch)."""
    return max(1, min(-(-num_sms // programs), max_splits, max_blocks))


def _paged_body(
    q_ref, k_ref, v_ref, tables_ref, lens_ref, o_ref, lse_ref, *scratch, st: ba.BlockedAttention, page_size: int
):
    """Paged KV: block blk of sequence b is its pages blk*ppb .. blk*ppb+ppb-1 of KV head h."""
    b, h = lax.axis_index("batch"), lax.axis_index("kv_head")
    pages_per_block = st.block_kv // page_size

    def load_kv(blk, slot, k_smem, v_smem, k_bars, v_bars):
        for i in range(pages_per_block):
            page = tables_ref[b, blk * pages_per_block + i]
            dst = pl.ds(i * page_size, page_size)
            plgpu.copy_gmem_to_smem(k_ref.at[h, page], k_smem.at[slot, dst], k_bars.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[h, page], v_smem.at[slot, dst], v_bars.at[slot])

    ba.attention_program(q_ref, o_ref, lse_ref, scratch, load_kv=load_kv, length=lens_ref[b], st=st)


def paged_attention_kernel(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    sliding_window: int | None = None,
    sinks: jax.Array | None = None,
    scale: float | None = None,
    interpret: Any = None,
    config: PagedAttentionConfig | None = None,
) -> jax.Array:
    """Paged attention on the Mosaic GPU kernel (same contract as paged_attention_reference).

    interpret: None to compile for the GPU, or plgpu.InterpretGPUParams to interpret on CPU.
    Reads the KV pool in place (ba.kv_pool: compiled, bf16/f16 with head_dim a multiple of 64; a
    ValueError otherwise) and multiplies in its dtype, q cast to it, with f32 softmax. page_size
    must divide block_kv or be a multiple of 64.
    """
    b, q_len, hq, d = q.shape
    hkv, _, page_size, _ = k_pages.shape
    check_attention_args(hq, hkv, sliding_window, sinks)
    config = config or paged_attention_config(hopper.target_device_kind())
    block_kv = max(config.block_kv, page_size)
    if block_kv % page_size or block_kv % 64:
        raise ValueError(f"page_size {page_size} must divide {block_kv} or be a multiple of 64")
    k_pages, v_pages = (ba.kv_pool(x, interpret) for x in (k_pages, v_pages))
    dtype = k_pages.dtype
    q_pad = hopper.pad_last(q.astype(dtype), ba.HEAD_DIM_MULTIPLE)
    q_rows = ba.to_rows(q_pad, hkv, config.block_rows)
    pages_per_block = block_kv // page_size
    max_blocks = pl.cdiv(block_tables.shape[1], pages_per_block)
    programs = b * hkv * (q_rows.shape[2] // config.block_rows)
    splits = num_kv_splits(programs, max_blocks, config.num_sms or hopper.target_num_sms(), config.max_splits)
    st = ba.BlockedAttention(
        q_len=q_len,
        group=hq // hkv,
        block_rows=config.block_rows,
        block_kv=block_kv,
        num_splits=splits,
        scale=d**-0.5 if scale is None else scale,
        window=sliding_window,
        causal=True,
        dtype=dtype,
    )
    # Whole blocks of table entries: the last block may read padding entries (the null page).
    tables = jnp.pad(
        block_tables.astype(jnp.int32), ((0, 0), (0, max_blocks * pages_per_block - block_tables.shape[1]))
    )
    operands = (k_pages, v_pages, tables, context_lens.astype(jnp.int32))
    o_part, lse = ba.run_blocked_attention(
        functools.partial(_paged_body, st=st, page_size=page_size),
        q_rows,
        operands,
        st,
        pages_per_block,
        "paged_attention",
        interpret,
    )
    out = ba.from_rows(ba.merge_partials(o_part, lse, sinks), q_pad.shape)
    return out[..., :d].astype(q.dtype)
