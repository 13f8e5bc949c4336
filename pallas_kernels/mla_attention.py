"""MLA decode attention (DeepSeek-V3) over the paged latent cache, FlashMLA-style.

In latent space (models/deepseek.py) every query head attends to one shared "KV head": the latent
[c, k_rope] of each token (D = kv_lora_rank + rope, 576 for DeepSeek-V3) is the key, and its first
kv_lora_rank columns (512) are the value. Paged attention with K = V = latent would read it twice,
keep two 576-wide SMEM rings (811 KiB of SMEM) and run a PV wgmma with N = 576 (Mosaic allows
N <= 256). This kernel reads each latent block once into one SMEM ring, QK over all D columns, and
PV over a value chunk of value_chunk (<= 256) columns of the same buffer; the query heads are the
wgmma's M rows (row = query * Hq + head, 64 rows per program, no padding at Hq = 128).

Programs over (sequence, row tile, value chunk, KV split); a chunk picks its static column slice
by lax.switch. Every chunk's program recomputes QK for its rows: at DeepSeek-V3 shapes that is
1.5x the minimal MMA work, the price of keeping one warpgroup per program (README, kernel
section). The programs of one sequence read the same latent blocks at about the same time, so L2
should serve all but the first read (not yet measured). The split partials merge by log-sum-exp in jnp (flash-decoding),
as in paged_attention.py. SMEM per program: q 72 KiB, a 2-slot ring of 64 latent tokens 144 KiB,
P 8 KiB (224 KiB of the 227); the output tile reuses the ring's space after the loop.
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

from pallas_kernels import flash_attention as fa
from pallas_kernels import paged_attention as pa


@dataclasses.dataclass(frozen=True)
class MLADecodeConfig:
    """Block sizes of the MLA kernel.

    block_rows: query rows (Q x heads) per program (wgmma M); block_kv: latent tokens per step,
    whole pages (bf16 PV: a multiple of 64); value_chunk: value columns per program (wgmma N <= 256);
    num_sms / max_splits: how far to split the KV range to fill the GPU at small batch.
    """

    block_rows: int = 64
    block_kv: int = 64
    value_chunk: int = 256
    num_sms: int = 132
    max_splits: int = 16

    def __post_init__(self):
        if self.block_rows % 64 or self.block_kv % 64 or self.value_chunk % 64 or not 0 < self.value_chunk <= 256:
            raise ValueError(f"block_rows, block_kv and value_chunk must be multiples of 64, "
                             f"value_chunk <= 256: {self}")


def mla_attention_reference(q: jax.Array, latent_pages: jax.Array, block_tables: jax.Array,
                            context_lens: jax.Array, *, kv_lora_rank: int, scale: float | None = None) -> jax.Array:
    """Plain jnp: paged attention with the latent as K and its first kv_lora_rank columns as V.

    q [B, Q, Hq, D]; latent_pages [1, num_pages, page_size, D]. Returns [B, Q, Hq, kv_lora_rank].
    """
    out = pa.paged_attention_reference(q, latent_pages, latent_pages, block_tables, context_lens, scale=scale)
    return out[..., :kv_lora_rank]


def _mla_body(q_ref, latent_ref, tables_ref, lens_ref, o_ref, lse_ref, q_bar, kv_bars, *,
              st: fa.BlockedAttention, page_size: int, head_dim: int, chunk: int, num_chunks: int):
    """Program (b, tile, split): latent blocks once into SMEM, QK over head_dim, PV over `cols`."""
    b, tile, split = lax.axis_index("batch"), lax.axis_index("tile"), lax.axis_index("split")
    c = lax.axis_index("chunk")
    length = lens_ref[b]
    first, last = fa.kv_block_range(length, tile, split, st)
    rows = pl.ds(tile * st.block_rows, st.block_rows)
    pages_per_block = st.block_kv // page_size
    swizzle = 128 // jnp.dtype(st.dtype).itemsize
    smem = lambda shape: plgpu.SMEM(shape, st.dtype, transforms=(  # noqa: E731
        plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(128)))

    def attend(q_smem, kv_smem, p_smem):
        def load(blk, slot):
            for i in range(pages_per_block):
                page = tables_ref[b, blk * pages_per_block + i]
                dst = kv_smem.at[slot, pl.ds(i * page_size, page_size)]
                plgpu.copy_gmem_to_smem(latent_ref.at[0, page], dst, kv_bars.at[slot])

        plgpu.copy_gmem_to_smem(q_ref.at[b, 0, rows], q_smem, q_bar)
        pl.when(first < last)(lambda: load(first, 0))
        plgpu.barrier_wait(q_bar)

        def step(i, carry):
            acc, m_i, l_i = carry
            blk, slot = first + i, lax.rem(i, 2)
            # The other slot was last read by the previous step's (completed) wgmmas: refill it now.
            pl.when(blk + 1 < last)(lambda: load(blk + 1, 1 - slot))
            plgpu.barrier_wait(kv_bars.at[slot])
            s = fa.wgmma_f32(q_smem, kv_smem.at[slot].T, (st.block_rows, st.block_kv)) * st.scale
            p, alpha, m_i, l_i = fa.softmax_update(
                jnp.where(fa.block_mask(length, tile * st.block_rows, st.block_rows, blk, st), s, -jnp.inf), m_i, l_i)
            p_smem[...] = p.astype(st.dtype)
            plgpu.commit_smem()
            # The value: columns [c * chunk, (c + 1) * chunk) of the latent (a static slice per branch).
            pv = lax.switch(c, [functools.partial(fa.wgmma_f32, p_smem, kv_smem.at[slot, :, pl.ds(i * chunk, chunk)],
                                                  acc.shape) for i in range(num_chunks)])
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_i, l_i

        return lax.fori_loop(0, last - first, step, fa.softmax_init(st.block_rows, chunk))

    acc, m_i, l_i = pl.run_scoped(attend, smem((st.block_rows, head_dim)), smem((2, st.block_kv, head_dim)),
                                  smem((st.block_rows, st.block_kv)))
    o, lse = fa.softmax_finish(acc, m_i, l_i)

    def store(o_smem, lse_smem):  # in the space the latent ring held
        o_smem[...] = o
        plgpu.commit_smem()
        lse_smem[...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, 0, split, rows, pl.ds(c * chunk, chunk)])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, 0, split, c, rows])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store, plgpu.SMEM((st.block_rows, chunk), jnp.float32), plgpu.SMEM((st.block_rows,), jnp.float32))


def mla_decode_kernel(q: jax.Array, latent_pages: jax.Array, block_tables: jax.Array, context_lens: jax.Array,
                      *, kv_lora_rank: int, scale: float | None = None, interpret: Any = None,
                      config: MLADecodeConfig | None = None) -> jax.Array:
    """MLA attention on the Mosaic GPU kernel (same contract as mla_attention_reference).

    interpret: None to compile for the GPU, or plgpu.InterpretGPUParams to interpret on CPU.
    Multiplies in fa.mma_dtype with f32 softmax. page_size: a multiple of 8 dividing block_kv. A
    head dim that is not a multiple of 64 costs a padded copy of the cache (DeepSeek-V3's 576 needs
    none).
    """
    b, q_len, hq, d = q.shape
    _, _, page_size, _ = latent_pages.shape
    config = config or MLADecodeConfig()
    if latent_pages.shape[0] != 1 or latent_pages.shape[3] != d:
        raise ValueError(f"latent_pages must be [1, pages, page_size, {d}], got {latent_pages.shape}")
    if not 0 < kv_lora_rank <= d:
        raise ValueError(f"kv_lora_rank {kv_lora_rank} must be in 1..head dim {d}")
    if config.block_kv % page_size or page_size % 8:  # a page lands on whole (8, 64) SMEM tiles
        raise ValueError(f"page_size {page_size} must be a multiple of 8 dividing block_kv {config.block_kv}")
    dtype = fa.mma_dtype(q.dtype, interpret)
    # Zero columns up to 128-byte swizzle rows leave the logits unchanged; the value then spans
    # the rank rounded up to 64 (extra output columns are dropped).
    q_pad, latent = (fa.pad_last(x.astype(dtype), fa.HEAD_DIM_MULTIPLE) for x in (q, latent_pages))
    d_pad, width = q_pad.shape[-1], -(-kv_lora_rank // 64) * 64
    chunk = next(c for c in range(min(config.value_chunk, width), 0, -64) if width % c == 0)
    q_rows = fa.to_rows(q_pad, 1, config.block_rows)  # [B, 1, R, D]
    tiles = q_rows.shape[2] // config.block_rows
    pages_per_block = config.block_kv // page_size
    max_blocks = pl.cdiv(block_tables.shape[1], pages_per_block)
    splits = pa.num_kv_splits(b * tiles * (width // chunk), max_blocks, config.num_sms, config.max_splits)
    st = fa.BlockedAttention(q_len=q_len, group=hq, block_rows=config.block_rows, block_kv=config.block_kv,
                             num_splits=splits, scale=d**-0.5 if scale is None else scale, window=None,
                             causal=True, dtype=dtype)
    tables = jnp.pad(block_tables.astype(jnp.int32),
                     ((0, 0), (0, max_blocks * pages_per_block - block_tables.shape[1])))
    operands = (q_rows, latent, tables, context_lens.astype(jnp.int32))
    rows, num_chunks = q_rows.shape[2], width // chunk
    kernel = plgpu.kernel(
        functools.partial(_mla_body, st=st, page_size=page_size, head_dim=d_pad, chunk=chunk, num_chunks=num_chunks),
        out_type=(jax.ShapeDtypeStruct((b, 1, splits, rows, width), jnp.float32),
                  jax.ShapeDtypeStruct((b, 1, splits, num_chunks, rows), jnp.float32)),  # every chunk's lse agree
        scratch_types=[plgpu.Barrier(), plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=2)],
        grid=(b, tiles, num_chunks, splits),
        grid_names=("batch", "tile", "chunk", "split"),
        kernel_name=f"mla_decode_r{st.block_rows}_kv{st.block_kv}_v{chunk}x{num_chunks}_s{splits}",
        interpret=interpret,
    )
    o_part, lse = kernel(*operands)
    out = fa.from_rows(fa.merge_partials(o_part, lse[:, :, :, 0], None), (b, q_len, hq, width))
    return out[..., :kv_lora_rank].astype(q.dtype)

