"""Ragged paged attention as one Mosaic GPU kernel (H100): ops.ragged_paged_attention's contract.

Work items are tiles of one sequence's last rows, right-aligned on its last token, of two shapes:
  query tiles (ragged_paged_attention.query_tiles) cut a prefill chunk into tiles of block_q =
    block_rows // G tokens; a program's wgmma M rows are the tile's tokens x the G query heads
    of its KV head (row = token * G + head), and each tile reads the context once;
  decode tiles (sequence_tiles), one per sequence with at most decode_rows // G new tokens
    (decode, speculative verify): A/B swapped, the 64 keys of a KV block in M and the tile's
    rows in N (16 for G <= 16), so a decode step's G real rows are not padded to wgmma's M of 64
    (for Llama-3-8B's G = 4, 16x less QK work and softmax than a 64-row tile).
A program owns one (tile, KV head, KV split). K/V stream through a `stages`-slot TMA ring (3
where SMEM allows); the page ids of the next block to issue are read one step ahead, while the
current block's wgmmas run. KV splits are chosen by SM waves over the static tile bound and
divide each program's actual block range, so a short sequence's extra splits exit at once; the
split partials merge by log-sum-exp in jnp (sinks join there once): an in-kernel merge needs
atomics, which interpret mode cannot run.
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
from pallas_kernels import paged_attention as pa
from pallas_kernels import ragged_paged_attention as rpa
from pallas_kernels.blocked_attention import check_attention_args

@dataclasses.dataclass(frozen=True)
class RaggedAttentionConfig:
    """Block sizes: block_rows (tokens x group heads) per program, block_kv keys per step, up to
    max_stages K/V ring slots, the SM count (None: the target device's, hopper.target_num_sms()) and
    split cap for the KV splits, and decode_rows: the rows (tokens x group heads, a multiple of
    16) of the A/B-swapped decode tile; 0 turns it off."""

    block_rows: int = 64
    block_kv: int = 64
    max_stages: int = 3
    num_sms: int | None = None
    max_splits: int = 16
    decode_rows: int = 16

    def __post_init__(self):
        if self.block_rows % 64 or self.block_kv % 64:
            raise ValueError(f"block_rows and block_kv must be multiples of 64 (wgmma): {self}")
        if self.decode_rows % 16 or not 0 <= self.decode_rows < self.block_rows:
            raise ValueError(f"decode_rows must be a multiple of 16 (wgmma N, a 32-byte row) below block_rows: {self}")
        if self.max_stages < 2 or (self.num_sms is not None and self.num_sms < 1) or self.max_splits < 1:
            raise ValueError(f"max_stages must be >= 2, num_sms (or None) and max_splits positive: {self}")


def smem_bytes(block_rows: int, block_kv: int, head_dim: int, stages: int, itemsize: int,
               kv_itemsize: int | None = None) -> int:
    """Shared memory of one program: q, P (mma dtype), the K and V rings (pool dtype; an FP8 pool
    adds one dequantized K and V tile in the mma dtype); output and lse (f32)."""
    kv_itemsize = itemsize if kv_itemsize is None else kv_itemsize
    mma = block_rows * head_dim + block_rows * block_kv + (2 * block_kv * head_dim if kv_itemsize != itemsize else 0)
    ring = 2 * stages * block_kv * head_dim
    return itemsize * mma + kv_itemsize * ring + 4 * (block_rows * head_dim + block_rows)


def ring_stages(config: RaggedAttentionConfig, block_rows: int, block_kv: int, head_dim: int,
                itemsize: int, kv_itemsize: int | None = None) -> int | None:
    """The deepest ring (max_stages down to 2) that fits in SMEM, or None when none does."""
    fits = [s for s in range(config.max_stages, 1, -1)
            if smem_bytes(block_rows, block_kv, head_dim, s, itemsize, kv_itemsize) + hopper.SMEM_SLACK <= hopper.SMEM_BYTES]
    return fits[0] if fits else None


def kernel_block_kv(config: RaggedAttentionConfig, page_size: int) -> int:
    """Tokens per KV step: config.block_kv, or one page where pages are larger."""
    return max(config.block_kv, page_size)


def decode_tokens(config: RaggedAttentionConfig, group: int) -> int:
    """New tokens a sequence may have to take the decode tile (decode_rows // G; 0: never)."""
    return config.decode_rows // group


def supported(head_dim: int, q_heads: int, kv_heads: int, page_size: int,
              config: RaggedAttentionConfig | None = None) -> bool:
    """Whether the kernel takes these shapes: a group fits a tile, pages land on whole (8, 64) SMEM
    tiles and divide the KV block (or are whole multiples of 64), and a 2-slot ring fits in SMEM."""
    config = config or RaggedAttentionConfig()
    block_kv = kernel_block_kv(config, page_size)
    padded = hopper.round_up(head_dim, ba.HEAD_DIM_MULTIPLE)
    return (kv_heads > 0 and q_heads % kv_heads == 0 and q_heads // kv_heads <= config.block_rows
            and page_size % 8 == 0 and block_kv % page_size == 0 and block_kv % 64 == 0
            and ring_stages(config, config.block_rows, block_kv, padded, 2) is not None)


def _ragged_body(q_ref, k_ref, v_ref, lens_ref, tables_ref, o_ref, lse_ref, q_smem, k_smem, v_smem,
                 p_smem, o_smem, lse_smem, q_bar, k_bars, v_bars, k_tile=None, v_tile=None, *, st: ba.BlockedAttention, page_size: int,
                 stages: int, keys_axis: int):
    """Program (tile, kv_head, split): the tile's rows of q against its sequence's KV blocks.

    keys_axis 1: logits [rows, keys] = q @ k^T, out = p @ v (rows in wgmma's M, >= 64).
    keys_axis 0, A/B swapped: logits [keys, rows] = k @ q^T and out^T = v^T @ p^T, so the block's
    64 keys fill M and a decode tile's few rows sit in N (16 for G <= 16): no rows padded to 64.
    k_tile / v_tile (an FP8 pool): where each block is dequantized for wgmma (ba.dequantize_block).
    """
    tile, h, split = lax.axis_index("tile"), lax.axis_index("kv_head"), lax.axis_index("split")
    length = lens_ref[tile]  # position of the tile's last token + 1 (0: an unused tile)

    @pl.when(length > 0)  # a spare tile of the static bound reads and writes nothing
    def _():
        first, last = ba.kv_block_range(length, jnp.int32(0), split, st)
        pages_per_block = st.block_kv // page_size
        last_entry = tables_ref.shape[1] - 1
        swapped = keys_axis == 0

        def page_ids(blk):  # clipped: the ids read ahead for a block past `last` are never used
            return tuple(tables_ref[tile, jnp.minimum(blk * pages_per_block + i, last_entry)]
                         for i in range(pages_per_block))

        def load(ids, slot):
            for i, page in enumerate(ids):
                dst = pl.ds(i * page_size, page_size)
                plgpu.copy_gmem_to_smem(k_ref.at[h, page], k_smem.at[slot, dst], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[h, page], v_smem.at[slot, dst], v_bars.at[slot])

        plgpu.copy_gmem_to_smem(q_ref.at[tile, h], q_smem, q_bar)
        for j in range(stages - 1):  # the prologue fills all slots but the last
            pl.when(first + j < last)(functools.partial(lambda j: load(page_ids(first + j), j), j))
        plgpu.barrier_wait(q_bar)

        def step(i, carry):
            acc, m_i, l_i, ahead = carry  # ahead: the page ids of block blk + stages - 1
            blk, slot = first + i, lax.rem(i, stages)
            # Slot (i - 1) % stages was last read by the previous step's (completed) wgmmas: refill it.
            pl.when(blk + stages - 1 < last)(lambda: load(ahead, lax.rem(i + stages - 1, stages)))
            ahead = page_ids(blk + stages)  # scalar reads overlap this step's wgmmas
            plgpu.barrier_wait(k_bars.at[slot])
            k = ba.dequantize_block(k_smem.at[slot], k_tile)
            if swapped:
                s = hopper.wgmma_f32(k, q_smem.T, (st.block_kv, st.block_rows))
            else:
                s = hopper.wgmma_f32(q_smem, k.T, (st.block_rows, st.block_kv))
            mask = ba.block_mask(length, jnp.int32(0), st.block_rows, blk, st, keys_axis)
            p, alpha, m_i, l_i = ba.softmax_update(jnp.where(mask, s * st.scale, -jnp.inf), m_i, l_i, keys_axis)
            # Swapped, P^T goes in through a transposed view: a [keys, 16] bf16 B operand does not lower.
            (p_smem.T if swapped else p_smem)[...] = p.astype(st.dtype)
            plgpu.commit_smem()
            plgpu.barrier_wait(v_bars.at[slot])
            v = ba.dequantize_block(v_smem.at[slot], v_tile)
            if swapped:
                pv = hopper.wgmma_f32(v.T, p_smem.T, acc.shape)
            else:
                pv = hopper.wgmma_f32(p_smem, v, acc.shape)
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [1 - keys_axis]) + pv, m_i, l_i, ahead

        head_dim = q_smem.shape[1]
        init = (*ba.softmax_init(st.block_rows, head_dim, keys_axis), page_ids(first + stages - 1))
        acc, m_i, l_i, _ = lax.fori_loop(0, last - first, step, init)
        o_smem[...], lse_smem[...] = ba.softmax_finish(acc, m_i, l_i, keys_axis)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[tile, h, split])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[tile, h, split])
        plgpu.wait_smem_to_gmem(0)


def _run_tiles(q_pad: jax.Array, k_pages: jax.Array, v_pages: jax.Array, tiles: rpa.QueryTiles, block_rows: int,
               keys_axis: int, *, config: RaggedAttentionConfig, group: int, page_size: int, scale: float,
               window: int | None, sinks: jax.Array | None, interpret: Any) -> jax.Array:
    """One launch over `tiles` (block_rows rows each) -> each tile's merged output [N, block_q, Hq, D]."""
    hkv, _, _, d_pad = k_pages.shape
    num_tiles, block_q = tiles.rows.shape
    block_kv = kernel_block_kv(config, page_size)
    pages_per_block = block_kv // page_size
    # f32 (interpret mode only, which has no SMEM limit) may overflow the budget bf16 fits in.
    stages = ring_stages(config, block_rows, block_kv, d_pad, jnp.dtype(q_pad.dtype).itemsize,
                         jnp.dtype(k_pages.dtype).itemsize) or 2
    # Gathered into tiles [N, Hkv, block_rows, D] in jnp: a TMA straight from the flat q would start
    # at row token * G, which Mosaic cannot prove a multiple of the 8-row SMEM tile.
    q_tiles = ba.to_rows(q_pad[tiles.rows], hkv, block_rows)
    max_blocks = pl.cdiv(tiles.tables.shape[1], pages_per_block)
    tables = jnp.pad(tiles.tables, ((0, 0), (0, max_blocks * pages_per_block - tiles.tables.shape[1])))
    splits = pa.num_kv_splits(num_tiles * hkv, max_blocks, config.num_sms or hopper.target_num_sms(), config.max_splits)
    st = ba.BlockedAttention(q_len=block_q, group=group, block_rows=block_rows, block_kv=block_kv,
                             num_splits=splits, scale=scale, window=window, causal=True, dtype=q_pad.dtype)
    out_rows = (block_rows, d_pad) if keys_axis == 1 else (d_pad, block_rows)
    kernel = plgpu.kernel(
        functools.partial(_ragged_body, st=st, page_size=page_size, stages=stages, keys_axis=keys_axis),
        out_type=(jax.ShapeDtypeStruct((num_tiles, hkv, splits, *out_rows), jnp.float32),
                  jax.ShapeDtypeStruct((num_tiles, hkv, splits, block_rows), jnp.float32)),
        scratch_types=ba.attention_scratch(st, d_pad, pages_per_block, stages, keys_axis, k_pages.dtype),
        grid=(num_tiles, hkv, splits),
        grid_names=("tile", "kv_head", "split"),
        kernel_name=f"ragged_paged_attention_{'ab_' * (1 - keys_axis)}r{block_rows}_kv{block_kv}_st{stages}_s{splits}",
        interpret=interpret,
    )
    o_part, lse = kernel(q_tiles, k_pages, v_pages, tiles.lens, tables)
    if keys_axis == 0:
        o_part = jnp.swapaxes(o_part, -1, -2)  # [N, Hkv, splits, rows, D]
    merged = ba.merge_partials(o_part, lse, sinks)  # [N, Hkv, block_rows, D]
    return ba.from_rows(merged, (num_tiles, block_q, group * hkv, d_pad))


def ragged_paged_attention_kernel(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    query_start_loc: jax.Array,
    context_lens: jax.Array,
    block_tables: jax.Array,
    *,
    sliding_window: int | None = None,
    sinks: jax.Array | None = None,
    scale: float | None = None,
    interpret: Any = None,
    config: RaggedAttentionConfig | None = None,
) -> jax.Array:
    """Ragged paged attention on the Mosaic GPU kernel (rpa.ragged_paged_attention_reference's
    contract). interpret: None compiles for the GPU, plgpu.InterpretGPUParams interprets on CPU.
    Reads the KV pool in place (ba.kv_pool: compiled, bf16/f16 with head_dim a multiple of 64) and
    multiplies in its dtype, q cast to it, with f32 softmax. An FP8 (float8_e4m3fn) pool is read
    as stored (half the bytes) and each block dequantized to f16 in SMEM (ba.dequantize_block);
    its scale is the caller's (models/attention.py). Raises ValueError for a pool kv_pool
    refuses and for shapes `supported` refuses.

    Two launches: sequences with at most decode_tokens new rows (decode, speculative verify) take
    one A/B-swapped tile each; the longer ones (prefill chunks) take query tiles of block_rows.
    """
    t, hq, d = q.shape
    hkv, _, page_size, _ = k_pages.shape
    check_attention_args(hq, hkv, sliding_window, sinks)
    config = config or RaggedAttentionConfig()
    if not supported(d, hq, hkv, page_size, config):
        raise ValueError(f"ragged kernel: unsupported head_dim {d}, heads {hq}/{hkv} or page_size {page_size} "
                         f"(pages: a multiple of 8 dividing {config.block_kv} or of 64; a 2-slot ring in SMEM)")
    group = hq // hkv
    k_pages, v_pages = (ba.kv_pool(x, interpret, fp8=True) for x in (k_pages, v_pages))
    q_pad = hopper.pad_last(q.astype(hopper.mma_dtype(k_pages.dtype, interpret)), ba.HEAD_DIM_MULTIPLE)
    run = functools.partial(_run_tiles, q_pad, k_pages, v_pages, config=config, group=group, page_size=page_size,
                            scale=d**-0.5 if scale is None else scale, window=sliding_window, sinks=sinks,
                            interpret=interpret)
    short_q = decode_tokens(config, group)
    tiles = rpa.query_tiles(query_start_loc, context_lens, block_tables, t, config.block_rows // group, short_q + 1)
    out = jnp.where(tiles.token_valid[:, None, None], run(tiles, config.block_rows, 1)[tiles.token_tile,
                                                                                        tiles.token_slot], 0)
    if short_q:
        seq_tiles = rpa.sequence_tiles(query_start_loc, context_lens, block_tables, t, short_q)
        short_out = run(seq_tiles, config.decode_rows, 0)[seq_tiles.token_tile, seq_tiles.token_slot]
        out = jnp.where(seq_tiles.token_valid[:, None, None], short_out, out)
    return out[..., :d].astype(q.dtype)
