"""Blocked online-softmax attention on Mosaic GPU, shared by every attention kernel here (flash,
paged, ragged, MLA, the warp-specialized body), and the attention reference's mask and softmax.

A program owns one KV head and a tile of block_rows "rows", row = query * G + (query head within
the group), so the G query heads of a KV head share every K/V load (GQA). It walks KV blocks of
block_kv tokens that its rows can see (causal end, sliding-window start), double-buffered TMA loads
into swizzled SMEM, QK and PV on wgmma, online softmax in float32. It writes its output normalised
by its own sum plus its log-sum-exp, so split-KV partials (flash-decoding) merge exactly and the
sinks join the denominator once, in jnp, after the kernel. Only `load_kv` differs between
contiguous and paged KV. All wgmma operands come from SMEM, which interpret mode requires.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.hopper import mma_dtype, pad_last, swizzled_smem, wgmma_f32


def check_attention_args(q_heads: int, kv_heads: int, sliding_window: int | None, sinks: jax.Array | None) -> None:
    """Validates the arguments shared by flash and paged attention."""
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if sinks is not None and sinks.shape != (q_heads,):
        raise ValueError(f"sinks must have shape ({q_heads},), got {sinks.shape}")


def visible_mask(q_pos: jax.Array, k_pos: jax.Array, causal: bool, sliding_window: int | None) -> jax.Array:
    """Which keys each query sees: k <= q (causal) and k > q - window. Broadcasts its inputs."""
    mask = jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), bool)
    if causal:
        mask &= k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def masked_softmax_ref(s: jax.Array, mask: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """Float32 softmax over the last axis of s [B, Hkv, G, T, S] where mask is True.

    sinks [Hkv, G] (or None) adds exp(sink - m) to each row's denominator (gpt-oss). A row with
    no visible key and no sink gives all-zero weights instead of NaN.
    """
    s = jnp.where(mask, s, -jnp.inf)
    m_i = s.max(axis=-1)  # [B, Hkv, G, T]
    if sinks is not None:
        m_i = jnp.maximum(m_i, sinks[None, :, :, None])
    m_i = jnp.where(jnp.isfinite(m_i), m_i, 0.0)
    p = jnp.exp(s - m_i[..., None])
    l_i = p.sum(axis=-1)
    if sinks is not None:
        l_i += jnp.exp(sinks[None, :, :, None] - m_i)
    return p / jnp.where(l_i > 0, l_i, 1.0)[..., None]


NO_LOGIT = -1e30  # finite "minus infinity" for running maxima: keeps exp(m_old - m_new) NaN-free
HEAD_DIM_MULTIPLE = 64  # a 128-byte swizzled SMEM row of bf16
DEQUANT_COLS = 64  # columns of an FP8 K/V block upcast at once (dequantize_block)


@dataclasses.dataclass(frozen=True)
class BlockedAttention:
    """Compile-time facts of one blocked-attention kernel."""

    q_len: int
    group: int  # query heads per KV head
    block_rows: int
    block_kv: int
    num_splits: int
    scale: float
    window: int | None
    causal: bool
    dtype: Any  # bf16 or f16: what wgmma multiplies


def kv_block_range(
    length: jax.Array, tile: jax.Array, split: jax.Array, st: BlockedAttention
) -> tuple[jax.Array, jax.Array]:
    """KV blocks [first, last) a program reads: causal end, window start, then its split's share."""
    qi_lo = lax.div(tile * st.block_rows, st.group)
    qi_hi = jnp.minimum(lax.div((tile + 1) * st.block_rows - 1, st.group), st.q_len - 1)
    end_pos = length
    if st.causal:
        end_pos = jnp.maximum(length - st.q_len + qi_hi + 1, 0)  # one past the last visible key
    last = lax.div(end_pos + st.block_kv - 1, st.block_kv)
    first = jnp.int32(0)
    if st.window is not None:
        start_pos = jnp.maximum(length - st.q_len + qi_lo - st.window + 1, 0)
        first = jnp.minimum(lax.div(start_pos, st.block_kv), last)
    per_split = lax.div(last - first + st.num_splits - 1, st.num_splits)
    split_last = jnp.minimum(first + (split + 1) * per_split, last)
    return jnp.minimum(first + split * per_split, split_last), split_last


def block_mask(length: jax.Array, row0: jax.Array, num_rows: int, blk: jax.Array, st: BlockedAttention,
               keys_axis: int = 1) -> jax.Array:
    """[num_rows, block_kv] bool for rows row0.. and KV block blk: the key exists and the row's query
    sees it; keys_axis=0 gives it transposed, [block_kv, num_rows] (the A/B-swapped decode tile)."""
    shape = (num_rows, st.block_kv) if keys_axis == 1 else (st.block_kv, num_rows)
    rows = plgpu.broadcasted_iota(jnp.int32, shape, 1 - keys_axis, layout=plgpu.Layout.WGMMA)
    cols = plgpu.broadcasted_iota(jnp.int32, shape, keys_axis, layout=plgpu.Layout.WGMMA)
    q_pos = length - st.q_len + lax.div(rows + row0, st.group)
    k_pos = cols + blk * st.block_kv
    mask = k_pos < length
    if st.causal:
        mask &= k_pos <= q_pos
    if st.window is not None:
        mask &= k_pos > q_pos - st.window
    return mask


def softmax_init(rows: int, cols: int, keys_axis: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online-softmax carry in wgmma layouts: accumulator [rows, cols], running max and sum [rows].

    keys_axis=0 is the A/B-swapped tile (logits [keys, rows]): the accumulator is [cols, rows]."""
    reduced = plgpu.Layout.WGMMA.reduce(keys_axis)
    shape = (rows, cols) if keys_axis == 1 else (cols, rows)
    acc = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
    m_i = plgpu.layout_cast(jnp.full((rows,), NO_LOGIT, jnp.float32), reduced)
    return acc, m_i, plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), reduced)


def softmax_update(s: jax.Array, m_i: jax.Array, l_i: jax.Array, keys_axis: int = 1) -> tuple[jax.Array, ...]:
    """One KV block of online softmax: masked logits s [rows, block_kv] ([block_kv, rows] for
    keys_axis=0; -inf hidden) -> weights p, the accumulator's rescale alpha [rows], and the new
    running max and sum."""
    m_new = jnp.maximum(m_i, s.max(axis=keys_axis))
    alpha = jnp.exp(m_i - m_new)
    p = jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [1 - keys_axis]))
    return p, alpha, m_new, l_i * alpha + p.sum(axis=keys_axis)


def softmax_finish(acc: jax.Array, m_i: jax.Array, l_i: jax.Array, keys_axis: int = 1) -> tuple[jax.Array, jax.Array]:
    """The program's output normalised by its own sum, and its log-sum-exp (for the split merge)."""
    l_i = jnp.maximum(l_i, 1.0)  # >= 1 once any key was seen (the max contributes exp(0)); 0: none
    return acc / lax.broadcast_in_dim(l_i, acc.shape, [1 - keys_axis]), m_i + jnp.log(l_i)


def attention_scratch(st: BlockedAttention, head_dim: int, loads_per_block: int, stages: int = 2,
                      keys_axis: int = 1, kv_dtype: Any = None) -> list:
    """SMEM and barriers of attention_program: q, `stages` K/V slots, P, output, lse; barriers.
    keys_axis=0 (the A/B-swapped tile) holds the output transposed, [head_dim, rows]. A kv_dtype
    other than st.dtype (an FP8 pool) gets its ring in that dtype and, last, one K and one V tile
    in st.dtype that each block is dequantized into for wgmma (dequantize_block); the FP8 ring's
    tiles are 64 bytes wide, so it dequantizes DEQUANT_COLS columns at a time."""
    smem = lambda shape: swizzled_smem(shape, st.dtype)
    kv_slots = (stages, st.block_kv, head_dim)
    kv_dtype = st.dtype if kv_dtype is None else kv_dtype
    ring_row_bytes = DEQUANT_COLS * jnp.dtype(kv_dtype).itemsize if jnp.dtype(kv_dtype) != jnp.dtype(st.dtype) else 128
    scratch = [
        smem((st.block_rows, head_dim)),
        swizzled_smem(kv_slots, kv_dtype, ring_row_bytes),
        swizzled_smem(kv_slots, kv_dtype, ring_row_bytes),
        smem((st.block_rows, st.block_kv)),
        plgpu.SMEM((st.block_rows, head_dim) if keys_axis == 1 else (head_dim, st.block_rows), jnp.float32),
        plgpu.SMEM((st.block_rows,), jnp.float32),
        plgpu.Barrier(),
        plgpu.Barrier(num_arrivals=loads_per_block, num_barriers=stages),
        plgpu.Barrier(num_arrivals=loads_per_block, num_barriers=stages),
    ]
    if jnp.dtype(kv_dtype) != jnp.dtype(st.dtype):
        scratch += [smem((st.block_kv, head_dim)), smem((st.block_kv, head_dim))]
    return scratch


def dequantize_block(ring_slot: Any, tile: Any) -> Any:
    """A K or V block as wgmma reads it: the ring slot itself, or (an FP8 pool; tile not None) its
    values upcast into `tile`, in the mma dtype (f16: mma_dtype), DEQUANT_COLS columns at a time
    (a whole [64, 128] block at once held 255 registers and spilled in the 64-row query tile)."""
    if tile is None:
        return ring_slot
    for c in range(0, tile.shape[1], DEQUANT_COLS):
        cols = pl.ds(c, DEQUANT_COLS)
        tile.at[:, cols][...] = plgpu.load(ring_slot.at[:, cols], layout=plgpu.Layout.WGMMA).astype(tile.dtype)
    plgpu.commit_smem()  # generic-proxy stores, read next by wgmma (async proxy)
    return tile


def attention_program(
    q_ref, o_ref, lse_ref, scratch, *, load_kv: Callable, length: jax.Array, st: BlockedAttention
) -> None:
    """The body of one (batch, kv_head, tile, split) program; load_kv(blk, slot, k, v, kb, vb)
    issues the TMA copies of KV block blk into SMEM slot `slot`, arriving on kb/vb[slot]."""
    q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, q_bar, k_bars, v_bars = scratch
    b, h = lax.axis_index("batch"), lax.axis_index("kv_head")
    tile, split = lax.axis_index("tile"), lax.axis_index("split")
    first, last = kv_block_range(length, tile, split, st)
    rows = pl.ds(tile * st.block_rows, st.block_rows)
    plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], q_smem, q_bar)
    load = lambda blk, slot: load_kv(blk, slot, k_smem, v_smem, k_bars, v_bars)
    pl.when(first < last)(lambda: load(first, 0))
    plgpu.barrier_wait(q_bar)

    def step(i, carry):
        acc, m_i, l_i = carry
        blk, slot = first + i, lax.rem(i, 2)
        # The other slot was last read by the previous step's (completed) wgmma: refill it now.
        pl.when(blk + 1 < last)(lambda: load(blk + 1, 1 - slot))
        plgpu.barrier_wait(k_bars.at[slot])
        s = wgmma_f32(q_smem, k_smem.at[slot].T, (st.block_rows, st.block_kv)) * st.scale
        mask = block_mask(length, tile * st.block_rows, st.block_rows, blk, st)
        p, alpha, m_i, l_i = softmax_update(jnp.where(mask, s, -jnp.inf), m_i, l_i)
        p_smem[...] = p.astype(st.dtype)
        plgpu.commit_smem()
        plgpu.barrier_wait(v_bars.at[slot])
        pv = wgmma_f32(p_smem, v_smem.at[slot], acc.shape)
        return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_i, l_i

    acc, m_i, l_i = lax.fori_loop(0, last - first, step, softmax_init(st.block_rows, o_smem.shape[1]))
    o_smem[...], lse_smem[...] = softmax_finish(acc, m_i, l_i)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, split, rows])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, split, rows])
    plgpu.wait_smem_to_gmem(0)


def run_blocked_attention(
    body: Callable,
    q_rows: jax.Array,
    operands: tuple,
    st: BlockedAttention,
    loads_per_block: int,
    name: str,
    interpret: Any,
) -> tuple[jax.Array, jax.Array]:
    """Launches body(q_ref, *operand_refs, o_ref, lse_ref, *scratch) over (B, Hkv, tiles, splits).

    q_rows [B, Hkv, R, D] -> partial outputs [B, Hkv, splits, R, D] f32, lse [B, Hkv, splits, R].
    """
    b, hkv, rows, d = q_rows.shape
    kernel = plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((b, hkv, st.num_splits, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, st.num_splits, rows), jnp.float32),
        ),
        scratch_types=attention_scratch(st, d, loads_per_block),
        grid=(b, hkv, rows // st.block_rows, st.num_splits),
        grid_names=("batch", "kv_head", "tile", "split"),
        kernel_name=f"{name}_r{st.block_rows}_kv{st.block_kv}_s{st.num_splits}",
        interpret=interpret,
    )
    return kernel(q_rows, *operands)


def to_rows(q: jax.Array, num_kv_heads: int, block_rows: int) -> jax.Array:
    """[B, T, Hq, D] -> [B, Hkv, R, D], row = t * G + g, zero-padded to whole row tiles."""
    b, t, hq, d = q.shape
    group = hq // num_kv_heads
    q_rows = q.reshape(b, t, num_kv_heads, group, d).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(b, num_kv_heads, t * group, d)
    pad = -(t * group) % block_rows
    return jnp.pad(q_rows, ((0, 0), (0, 0), (0, pad), (0, 0)))


def from_rows(o_rows: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of to_rows: [B, Hkv, R, D] (padded) -> [B, T, Hq, D]."""
    b, t, hq, d = shape
    hkv = o_rows.shape[1]
    o = o_rows[:, :, : t * (hq // hkv)].reshape(b, hkv, t, hq // hkv, d)
    return o.transpose(0, 2, 1, 3, 4).reshape(shape)


def merge_partials(o_part: jax.Array, lse: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """Merges split outputs by log-sum-exp; the sink (per head, [Hq]) joins the denominator once.

    o_part [B, Hkv, S, R, D], lse [B, Hkv, S, R] -> [B, Hkv, R, D] float32.
    """
    hkv, rows = o_part.shape[1], o_part.shape[3]
    if sinks is None:
        sink_rows = jnp.full((hkv, rows), -jnp.inf)
    else:
        group = sinks.shape[0] // hkv
        sink_rows = sinks.astype(jnp.float32).reshape(hkv, group)[:, jnp.arange(rows) % group]
    m = jnp.maximum(lse.max(axis=2), sink_rows)  # [B, Hkv, R]
    w = jnp.exp(lse - m[:, :, None])
    denom = w.sum(axis=2) + jnp.exp(sink_rows - m)
    return jnp.einsum("bksr,bksrd->bkrd", w, o_part) / denom[..., None]


def kv_pool(pages: jax.Array, interpret: Any, fp8: bool = False) -> jax.Array:
    """A paged KV pool [Hkv, pages, page_size, D] as the paged kernels read it: in place.

    A cast or pad here would copy the whole KV cache on every call, so compiled for the GPU
    (interpret None) the pool must already be what wgmma multiplies, bfloat16 or float16 (or, for a
    kernel that dequantizes blocks in SMEM, fp8=True: float8_e4m3fn), with D a multiple of
    HEAD_DIM_MULTIPLE; the engine stores its GPU pool that way (engine/kv_cache.pool_dtype).
    Interpret mode (CPU) also reads float32 as stored, and zero-pads the D of tiny test models (a
    copy, off the GPU's hot path). Anything else is a ValueError naming the pool's dtype and shape.
    """
    fp8_pool = fp8 and pages.dtype == jnp.float8_e4m3fn
    if ((mma_dtype(pages.dtype, interpret) != pages.dtype and not fp8_pool)
            or (interpret is None and pages.shape[-1] % HEAD_DIM_MULTIPLE)):
        raise ValueError(
            f"the paged kernels read the KV pool in place (a cast or pad would copy the whole cache every step): "
            f"compiled for the GPU it must be bfloat16 or float16{' or float8_e4m3fn' if fp8 else ''} with head_dim "
            f"a multiple of {HEAD_DIM_MULTIPLE} (the engine's GPU pool: kv_cache.pool_dtype), interpreted float32 "
            f"too; got {pages.dtype}{list(pages.shape)}")
    return pad_last(pages, HEAD_DIM_MULTIPLE)
