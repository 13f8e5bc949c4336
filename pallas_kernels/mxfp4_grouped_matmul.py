"""MoE grouped GEMM with MXFP4 expert weights and bf16 activations (W4A16: gpt-oss' experts) on Hopper.

Contract: grouped_matmul.grouped_matmul_reference's, with rhs a QuantizedWeight of format "mxfp4"
(values uint8 [G, N, K // 2], two e2m1 codes a byte, the low nibble the even k; scales uint8 e8m0
[G, N, K // 32]): out[rows of group g] = lhs[rows] @ rhs.dequantize()[g - group_offset], f32
accumulation, bf16 out; rows past sum(group_sizes) and rows of groups outside [group_offset,
group_offset + G) are zeros.

Design (swap AB, after upstream's hopper_mixed_type_matmul_mgpu.py and tokamax's
ragged_dot/pallas_mosaic_gpu_kernel_sm90_quant*.py):
- wgmma refuses bf16 x fp4 (A and B must share a dtype), and Mosaic GPU refuses fp4/e8m0 casts
  below sm_100. So the packed weight bytes and their scale bytes are TMA-loaded as uint8 and
  dequantized in registers by bit arithmetic into bf16, and only wgmma's A operand may come from
  registers: the weight is A. Each consumer computes acc[N rows, tokens] = W[N, K] x lhs[tokens, K]^T
  (the tokens are wgmma's N dimension, any multiple of 8: a decode tile is 16 tokens, not 64)
  and writes acc^T to the output rows through SMEM.
- Dequantization (`dequantize_codes`, exact for every e8m0 byte 1..252): a code c = (sign, e1, e0,
  m) becomes the bf16 bits sign << 15 | (c & 7) << 6, i.e. value(c) * 2**-126 (bf16's subnormals
  share e2m1's subnormal rule, so 0.5 comes out right); one bf16 multiply by 2**126 and one by the
  scale 2**(s - 127), whose bf16 bits are s << 7, finish it. Byte 0 (2**-127) becomes +0.0: its
  values are below 6 * 2**-127, nothing a bf16 output can show. Byte 255 (the e8m0 NaN) becomes
  inf, as in QuantizedWeight.dequantize.
- The nibbles split without a shuffle: a byte tile [n, bk / 2] is loaded in wgmma's register layout
  and its low and high nibbles dequantize into two bf16 arrays of that layout; their concatenation
  [n, bk] is the A operand with the even k's of the K block first, then the odd ones. The
  activations are permuted to match once per call, in XLA (`permute_k`: [M, K] -> [M, K], the
  cost of one read and write of lhs, nothing beside the weights in decode; XLA can fuse it into the
  producer of lhs). The weights are read in place: no copy, pad or relayout of values or scales.
- The scales [G, N, K // 32] have rows of K // 32 = 90 bytes at gpt-oss' K = 2880, which no TMA
  can stride over (global strides must be multiples of 16 bytes), so a work item loads its rows'
  whole scale slab [2 * block_n, K // 32] at once, through the free reshape of the scales to
  [G, N / r, r * (K // 32) / 16, 16] (r rows make a multiple of 16 bytes; 8 at K = 2880), double
  buffered across items. Each step reads its K block's scale bytes for its rows from that slab.
- K blocks of 64 (or 32 where K % 64 != 0): gpt-oss' K = 2880 is 45 blocks of 64 and not a
  multiple of 128, so no K tile reaches past the weights and nothing is padded. A 64-wide block is
  32 bytes a weight row (a 32-byte swizzle) and two scale groups.
- Row tiles start at each group's first row (`group_tile_schedule`), not at multiples of block_m:
  a decode group of a few rows is one tile, so each expert's weights are streamed once.

Structure: a persistent kernel, one program per SM, three warpgroups: a producer that only issues
TMAs (per item the scale slab, per K step the weight tile of both consumers and the activation
tile they share) into a `stages`-deep ring, and two consumers of block_n weight rows each. The work
items (row tile, column tile of 2 * block_n weight rows) are walked row tiles fastest, so the row
tiles of one expert run side by side and share its weights in L2. The producer runs ahead across
item boundaries; the epilogue's TMA stores stay in flight while the next item's K loop runs.

Pipeline safety: the producer refills ring slot s only after both consumers arrived on free[s],
which each does after wgmma_wait(1) in the following step (so the wgmma that read the slot, the
last reader, is done) or after wgmma_wait(0) at an item's last step; a scale slab is refilled only
after both consumers arrived on its free barrier after their item's last step. In interpret mode
(`hardware=False`) wgmma takes A from SMEM (the interpreter reads operands only from SMEM): each
consumer writes its dequantized tile to its own SMEM buffer first; the arithmetic is the same.

SMEM (bytes; `smem_bytes`): stages * (2 * block_n * bk / 2 + block_m * bk * 2) for the ring, plus
2 * (2 * block_n) * K / 32 for the scale slabs, plus 2 * block_m * block_n * 2 for the output
tiles. gpt-oss (K = 2880, bk = 64, block_n = 64): decode (block_m 16, 12 stages) 12 * (4096 +
2048) + 23040 + 4096 = 100,864; prefill (block_m 256, 3 stages) 3 * (4096 + 32768) + 23040 + 65536
= 199,168; both under the 232,448 a block may opt into.

Compiled for the H200 (deviceless, ptxas; 2026-12): no spills at gpt-oss-120b's decode (256 rows)
and prefill (32768 rows), gate_up and down, 128 or 16 experts; SMEM 101,376 and 199,680 bytes
(the above plus barriers); the prefill consumer uses 182 of its 232 registers (acc 128 + A 16).
Cost known from the SASS, not yet measured on a GPU: the dequantization is ~7 instructions per
code (Pallas' uint16 lanes: LLVM splits each 16-bit shift into per-lane shifts plus byte
unpack/pack PRMTs), so decode is likely issue-bound near half of HBM bandwidth; a 32-bit-lane
version (inline PTX prmt/lop3 on the hardware path, ~2 per code) is the next step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import hopper
from pallas_kernels import grouped_matmul as gmm
from pallas_kernels.quantized import MXFP4_BLOCK, QuantizedWeight

CONSUMERS = 2
PRODUCER = CONSUMERS  # the warpgroup index of the TMA producer
SMEM_LIMIT = 232_448  # bytes of shared memory a block may opt into on an H100/H200
OUT_COLS = 64  # output columns per epilogue store: one 128-byte swizzled bf16 row
DECODE_ROWS_PER_GROUP = 8  # at most this many rows per group on average: decode tiles
# Mosaic GPU's WGMMA_ROW_LAYOUT (not in plgpu.Layout): a [n] vector with each thread holding the
# rows it holds in the wgmma layout of an [n, cols] array, so a broadcast along columns lands there.
ROW_LAYOUT = plgpu.Layout.TILED(plgpu.Tiling(((64,), (16,), (8,), (1,))), warp_dims=(-4,),
                                lane_dims=(-2, plgpu.Replicated(4)), vector_dim=-1)


@dataclasses.dataclass(frozen=True)
class Mxfp4GroupedMatmulConfig:
    """block_m tokens per row tile (wgmma's N: a multiple of 8 up to 256), block_n weight rows per
    consumer warpgroup (a multiple of 64: wgmma's M), block_k values of K per pipeline step (32 or
    64: one or two scale groups), `stages` ring slots; num_sms programs (None: one per SM of the
    target device)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    stages: int = 4
    num_sms: int | None = None

    def __post_init__(self):
        if self.block_m % 8 or not 8 <= self.block_m <= 256:
            raise ValueError(f"block_m must be a multiple of 8 in [8, 256]: {self}")
        if self.block_n % 64 or self.block_k not in (32, 64):
            raise ValueError(f"block_n must be a multiple of 64 and block_k 32 or 64: {self}")
        if self.stages < 2 or (self.num_sms is not None and self.num_sms < 1):
            raise ValueError(f"stages must be >= 2 and num_sms None or positive: {self}")


def mxfp4_grouped_matmul_config(device_kind: str, rows_per_group: float = float("inf")) -> Mxfp4GroupedMatmulConfig:
    """The frozen tile sizes (H100 and H200 share them; CPU interprets the H100's).

    Decode (a few rows per expert) streams every expert's weights once and is bound by HBM and by
    the dequantization's ALU work: 16-token tiles (wgmma n16) and a 12-deep ring of 6 KiB steps
    keep ~70 KiB of weights in flight per SM. Prefill (hundreds of rows per expert) is bound by
    wgmma: 256-token tiles halve the dequantization per FLOP against 128 (each weight register
    feeds 256 tokens), with a 3-deep ring of 36 KiB steps (4 overflow SMEM beside the 64 KiB of
    output tiles). Between the two, 64-token tiles and 8 stages.
    """
    del device_kind  # one table for H100, H200 and the interpreter
    if rows_per_group <= DECODE_ROWS_PER_GROUP:
        return Mxfp4GroupedMatmulConfig(block_m=16, block_n=64, block_k=64, stages=12)
    if rows_per_group <= 64:
        return Mxfp4GroupedMatmulConfig(block_m=64, block_n=64, block_k=64, stages=8)
    return Mxfp4GroupedMatmulConfig(block_m=256, block_n=64, block_k=64, stages=3)


def smem_bytes(cfg: Mxfp4GroupedMatmulConfig, k: int, hardware: bool = True) -> int:
    """Shared memory of one program (module docstring), plus the interpreter's A tiles."""
    cta_n = CONSUMERS * cfg.block_n
    ring = cfg.stages * (cta_n * cfg.block_k // 2 + cfg.block_m * cfg.block_k * 2)
    scales = 2 * cta_n * (k // MXFP4_BLOCK)
    out = CONSUMERS * cfg.block_m * cfg.block_n * 2
    a_tiles = 0 if hardware else CONSUMERS * cfg.block_n * cfg.block_k * 2
    return ring + scales + out + a_tiles


def check_args(lhs: jax.Array, rhs: QuantizedWeight, group_sizes: jax.Array) -> None:
    """Validates the format, ranks and matching dimensions."""
    if rhs.fmt != "mxfp4" or rhs.values.ndim != 3 or rhs.scales.ndim != 3:
        raise ValueError(f"want an mxfp4 QuantizedWeight with values [G, N, K/2], got {rhs.fmt} "
                         f"{rhs.values.shape}")
    g, n, k_half = rhs.values.shape
    if lhs.ndim != 2 or group_sizes.ndim != 1 or lhs.shape[1] != 2 * k_half:
        raise ValueError(f"want lhs [M, K={2 * k_half}] and group_sizes [G]; got {lhs.shape}, {group_sizes.shape}")
    if rhs.scales.shape != (g, n, 2 * k_half // MXFP4_BLOCK) or (2 * k_half) % MXFP4_BLOCK:
        raise ValueError(f"scales {rhs.scales.shape} do not match values {rhs.values.shape}")
    if group_sizes.shape[0] < g:
        raise ValueError(f"{group_sizes.shape[0]} group sizes for {g} expert weights")
    if n % 8:
        raise ValueError(f"N = {n} must be a multiple of 8 (16-byte TMA strides of the output rows)")


def group_tile_schedule(sizes: jax.Array, start: jax.Array, m: int,
                        block_m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per schedule entry (group, first row, end row), tiles starting at each group's first row
    (unlike gmm.tile_schedule's block-aligned tiles, a group of <= block_m rows is one tile);
    unused entries have end <= first. T = cdiv(m, block_m) + G - 1 entries bound
    sum_g cdiv(size_g, block_m) for sizes summing to <= m.
    """
    num_entries = pl.cdiv(m, block_m) + sizes.shape[0] - 1
    ends = start + jnp.cumsum(sizes)
    begins = ends - sizes
    counts = (sizes + block_m - 1) // block_m
    offsets = jnp.cumsum(counts) - counts
    t = jnp.arange(num_entries, dtype=jnp.int32)
    group = jnp.clip(jnp.searchsorted(offsets + counts, t, side="right"), 0, sizes.shape[0] - 1)
    row_lo = begins[group] + (t - offsets[group]) * block_m
    row_hi = jnp.where(t < counts.sum(), jnp.minimum(ends[group], row_lo + block_m), row_lo)
    return group.astype(jnp.int32), row_lo.astype(jnp.int32), row_hi.astype(jnp.int32)


def permute_k(lhs: jax.Array, block_k: int) -> jax.Array:
    """lhs [M, K] with each K block's even columns first, then its odd ones: the order of the A
    operand's columns (the low nibbles' values, then the high nibbles')."""
    m, k = lhs.shape
    return lhs.reshape(m, k // block_k, block_k // 2, 2).swapaxes(2, 3).reshape(m, k)


def scale_rows_per_chunk(groups: int) -> int:
    """r: the fewest scale rows (of `groups` bytes each) that make a multiple of 16 bytes."""
    return 16 // math.gcd(groups, 16)


def dequantize_nibbles(packed: jax.Array, nibble: int, scale: jax.Array) -> jax.Array:
    """The e2m1 codes in nibble `nibble` (0: bits 0-3, 1: bits 4-7) of packed bytes (uint16) times
    their scales (bf16 2**(s - 125), e8m0_to_bf16) -> bf16, by bit arithmetic and no subnormal.

    The code's exponent and mantissa bits (e1 e0 m) go to bf16's bits 8..6 under an exponent of
    124: |value| / 4 for the normal codes (1 .. 6); the two subnormal codes give 0.125 and 0.1875
    instead of 0 and 0.125, and min(x, 2x - 0.25) maps those two right and leaves the others (all
    exact in bf16). No operand is ever subnormal, so flush-to-zero (XLA on CPU flushes; the GPU's
    bf16 units may) changes nothing. The sign bit is or-ed in last.
    """
    shift = 4 * nibble
    mag_bits = (packed & (0x7 << shift)) << 6 - shift
    quarter = jax.lax.bitcast_convert_type(mag_bits | 0x3E00, jnp.bfloat16)  # 2**-3 * (1 + m/2) * 2**e
    quarter = jnp.minimum(quarter, quarter * 2 - jnp.asarray(0.25, jnp.bfloat16))  # |value| / 4, exact
    magnitude = jax.lax.bitcast_convert_type(quarter * scale, jnp.uint16)  # |value| * 2**(s - 127)
    sign = (packed & (0x8 << shift)) << 12 - shift
    return jax.lax.bitcast_convert_type(magnitude | sign, jnp.bfloat16)


def e8m0_to_bf16(scale_bytes: jax.Array) -> jax.Array:
    """e8m0 bytes s -> bf16 2**(s - 125), dequantize_nibbles' scale (4x the weight scale 2**(s - 127),
    for its |value| / 4): s + 2 in bf16's exponent field. Exact for s = 0..252; 253 and 254
    overflow bf16 (as the weights they scale would), 255 (the e8m0 NaN; quantized.check_scales
    refuses it at load) gives garbage."""
    return jax.lax.bitcast_convert_type((scale_bytes.astype(jnp.uint16) + 2) << 7, jnp.bfloat16)


def dequantize_tile(packed: jax.Array, scale_cols: list[jax.Array], high_first: bool = False) -> jax.Array:
    """A packed weight tile uint8 [n, bk / 2] -> bf16 [n, bk]: the low nibbles' values, then the
    high nibbles' (permute_k's order); scale_cols: bk / 32 bf16 [n] (e8m0_to_bf16), one per 32
    values of K (the first half of each nibble's columns, then the second).

    high_first swaps the nibbles: a deliberately wrong variant the tests must catch.
    """
    n, half = packed.shape
    per_group = half // len(scale_cols)  # columns of each nibble's half that one scale group covers
    scale = jnp.concatenate([jax.lax.broadcast_in_dim(s, (n, per_group), (0,)) for s in scale_cols], axis=1) \
        if len(scale_cols) > 1 else jax.lax.broadcast_in_dim(scale_cols[0], (n, per_group), (0,))
    wide = packed.astype(jnp.uint16)
    low, high = dequantize_nibbles(wide, 0, scale), dequantize_nibbles(wide, 1, scale)
    return jnp.concatenate([high, low] if high_first else [low, high], axis=1)


def _kernel_body(group_ref, lo_ref, hi_ref, lhs_ref, w_ref, s_ref, o_ref, *scratch,
                 cfg: Mxfp4GroupedMatmulConfig, k_steps: int, n_tiles: int, groups: int, hardware: bool,
                 high_first: bool):
    """One SM's program: work items lin = sm, sm + num_sms, ... as (entry lin % T, column tile
    lin // T of 2 * block_n weight rows); consumer wg owns rows wg * block_n of the tile."""
    w_smem, x_smem, s_smem, o_smem, full, free, s_full, s_free, *a_smem = scratch
    num_entries = group_ref.shape[0]
    wg = jax.lax.axis_index("wg")
    cta_n, bk, slab_rows = CONSUMERS * cfg.block_n, cfg.block_k, s_smem.shape[2]
    loop = functools.partial(plgpu.nd_loop, (num_entries * n_tiles,), collective_axes="sm")

    def item_info(lin):
        t, nb = jax.lax.rem(lin, num_entries), jax.lax.div(lin, num_entries)
        return group_ref[t], lo_ref[t], hi_ref[t], nb

    @pl.when(wg == PRODUCER)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        @loop(init_carry=(jnp.int32(0), jnp.int32(0)))
        def _item(info: plgpu.NDLoopInfo, carry):
            step, item = carry
            group, row_lo, row_hi, nb = item_info(info.index[0])
            used = row_lo < row_hi

            @pl.when(used)
            def _load():
                buf = jax.lax.rem(item, 2)
                pl.when(item >= 2)(lambda: plgpu.barrier_wait(s_free.at[buf]))
                for c in range(CONSUMERS):  # the scale slab of each consumer's rows
                    first = (nb * CONSUMERS + c) * slab_rows
                    plgpu.copy_gmem_to_smem(s_ref.at[group, pl.ds(first, slab_rows)], s_smem.at[buf, c], s_full.at[buf])

                @pl.loop(0, k_steps)
                def _step(kk):
                    slot = jax.lax.rem(step + kk, cfg.stages)
                    pl.when(step + kk >= cfg.stages)(lambda: plgpu.barrier_wait(free.at[slot]))
                    for c in range(CONSUMERS):
                        rows = pl.ds((nb * CONSUMERS + c) * cfg.block_n, cfg.block_n)
                        plgpu.copy_gmem_to_smem(w_ref.at[group, rows, pl.ds(kk * (bk // 2), bk // 2)],
                                                w_smem.at[slot, c], full.at[slot])
                    plgpu.copy_gmem_to_smem(lhs_ref.at[pl.ds(row_lo, cfg.block_m), pl.ds(kk * bk, bk)],
                                            x_smem.at[slot], full.at[slot])

            used = used.astype(jnp.int32)
            return step + used * k_steps, item + used

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")

        def scale_cols(buf, kk):
            """This consumer's rows' scales of K block kk: bk / 32 bf16 [block_n] (one per row)."""
            slab = s_smem.at[buf, wg]
            slab = slab.reshape(cfg.block_n, groups) if hardware else slab  # [block_n, K / 32]
            # One byte a row, 90 bytes apart at K = 2880: no vectorized transfer (optimized=False).
            return [e8m0_to_bf16(plgpu.load(slab.at[:, kk * (bk // MXFP4_BLOCK) + j], layout=ROW_LAYOUT,
                                            optimized=False))
                    for j in range(bk // MXFP4_BLOCK)]

        def mma(acc_ref, step, buf, kk):
            slot = jax.lax.rem(step + kk, cfg.stages)
            plgpu.barrier_wait(full.at[slot])
            packed = plgpu.load(w_smem.at[slot, wg], layout=plgpu.Layout.WGMMA)  # uint8 [block_n, bk / 2]
            a = dequantize_tile(packed, scale_cols(buf, kk), high_first)  # bf16 [block_n, bk]
            if hardware:
                plgpu.wgmma(acc_ref, a, x_smem.at[slot].T)
            else:
                a_smem[0].at[wg][...] = a
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, a_smem[0].at[wg], x_smem.at[slot].T)
            # At most this step's wgmma stays in flight: the previous step's, the last reader of its
            # slot (and of its A registers), is done, so that slot goes back to the producer.
            plgpu.wgmma_wait(1)
            pl.when(kk > 0)(lambda: plgpu.barrier_arrive(free.at[jax.lax.rem(step + kk - 1, cfg.stages)]))

        def store(acc, row_lo, row_hi, nb):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last item's stores have read o_smem
            out = acc.astype(o_smem.dtype)  # [block_n, block_m]
            for c in range(cfg.block_n // OUT_COLS):
                part = out[c * OUT_COLS:(c + 1) * OUT_COLS]
                # o_smem [block_m, OUT_COLS] (128-byte swizzled rows) through its transposed view: the
                # transposed wgmma layout makes each thread's register pairs contiguous in it.
                o_smem.at[wg, c].T[...] = plgpu.layout_cast(part, plgpu.Layout.WGMMA_TRANSPOSED)
            plgpu.commit_smem()
            col0 = nb * cta_n + wg * cfg.block_n
            count, offset = row_hi - row_lo, 0
            for bit in reversed(range(int(math.log2(cfg.block_m)) + 1)):
                piece = 1 << bit

                @pl.when(count & piece != 0)
                def _store():
                    for c in range(cfg.block_n // OUT_COLS):
                        plgpu.copy_smem_to_gmem(
                            o_smem.at[wg, c, pl.ds(offset, piece)],
                            o_ref.at[pl.ds(row_lo + offset, piece), pl.ds(col0 + c * OUT_COLS, OUT_COLS)],
                            commit_group=False)

                offset += count & piece
            plgpu.commit_smem_to_gmem_group()

        @loop(init_carry=(jnp.int32(0), jnp.int32(0)))
        def _item(info: plgpu.NDLoopInfo, carry):
            step, item = carry
            group, row_lo, row_hi, nb = item_info(info.index[0])
            used = row_lo < row_hi

            @pl.when(used)
            def _compute():
                buf = jax.lax.rem(item, 2)
                plgpu.barrier_wait(s_full.at[buf])

                def acc_scope(acc_ref):
                    @pl.loop(0, k_steps)
                    def _step(kk):
                        mma(acc_ref, step, buf, kk)

                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(free.at[jax.lax.rem(step + k_steps - 1, cfg.stages)])
                    plgpu.barrier_arrive(s_free.at[buf])
                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, plgpu.ACC((cfg.block_n, cfg.block_m), jnp.float32))
                store(acc, row_lo, row_hi, nb)

            used = used.astype(jnp.int32)
            return step + used * k_steps, item + used

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last item's stores, before the kernel ends


def _scratch(cfg: Mxfp4GroupedMatmulConfig, groups: int, hardware: bool) -> list:
    bk = cfg.block_k
    w_swizzle, x_swizzle = plgpu.find_swizzle(bk // 2 * 8), plgpu.find_swizzle(bk * 16)
    r = scale_rows_per_chunk(groups)
    scratch = [
        # 16-byte rows (block_k 32) take no swizzle (Mosaic's smallest is 32 bytes): a plain tile.
        plgpu.SMEM((cfg.stages, CONSUMERS, cfg.block_n, bk // 2), jnp.uint8,
                   transforms=(plgpu.TilingTransform((8, w_swizzle)), plgpu.SwizzleTransform(w_swizzle))
                   if w_swizzle >= 32 else ()),
        plgpu.SMEM((cfg.stages, cfg.block_m, bk), jnp.bfloat16,
                   transforms=(plgpu.TilingTransform((8, x_swizzle // 2)), plgpu.SwizzleTransform(x_swizzle))),
        # Per buffer and consumer, its rows' scales [block_n, K / 32]: on the GPU as the TMA-able
        # [block_n / r, r * (K / 32) / 16, 16] (the same bytes); the interpreter takes no reshaped refs.
        plgpu.SMEM((2, CONSUMERS, cfg.block_n // r, r * groups // 16, 16) if hardware
                   else (2, CONSUMERS, cfg.block_n, groups), jnp.uint8),
        plgpu.SMEM((CONSUMERS, cfg.block_n // OUT_COLS, cfg.block_m, OUT_COLS), jnp.bfloat16,
                   transforms=(plgpu.SwizzleTransform(128),)),
        plgpu.Barrier(num_arrivals=CONSUMERS + 1, num_barriers=cfg.stages),  # full: weight and activation TMAs
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=cfg.stages),  # free: both consumers done
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=2),  # s_full: the scale slabs landed
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=2),  # s_free: both consumers done with it
    ]
    if not hardware:
        a_swizzle = plgpu.find_swizzle(bk * 16)
        scratch.append(plgpu.SMEM((CONSUMERS, cfg.block_n, bk), jnp.bfloat16,
                                  transforms=(plgpu.TilingTransform((8, a_swizzle // 2)),
                                              plgpu.SwizzleTransform(a_swizzle))))
    return scratch


def mxfp4_grouped_matmul_kernel(
    lhs: jax.Array,
    rhs: QuantizedWeight,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int = 0,
    interpret: Any = None,
    config: Mxfp4GroupedMatmulConfig | None = None,
    _high_nibble_first: bool = False,
) -> jax.Array:
    """lhs [M, K] (bf16; other float dtypes are cast) x the MXFP4 experts rhs [G, N, K / 2] -> [M, N]
    in lhs's dtype (grouped_matmul_reference's contract on rhs.dequantize()).

    interpret: None to compile for the GPU, or plgpu.InterpretGPUParams to interpret on CPU.
    The packed weights and scales are read in place (a free reshape of the scales); lhs is permuted
    along K once (permute_k). _high_nibble_first: a deliberately wrong decoding, for the tests.
    """
    check_args(lhs, rhs, group_sizes)
    (m, k), (g, n, _) = lhs.shape, rhs.values.shape
    groups = k // MXFP4_BLOCK
    config = config or mxfp4_grouped_matmul_config(hopper.target_device_kind(), m / group_sizes.shape[0])
    block_k = config.block_k if k % config.block_k == 0 else 32
    cfg = dataclasses.replace(config, block_k=block_k, num_sms=config.num_sms or hopper.target_num_sms())
    hardware = interpret is None
    if smem_bytes(cfg, k, hardware) > SMEM_LIMIT:
        raise ValueError(f"{cfg} needs {smem_bytes(cfg, k, hardware)} bytes of SMEM at K={k}; the limit is {SMEM_LIMIT}")
    if hardware and cfg.block_n * groups % 128:
        raise ValueError(f"a {cfg.block_n}-row scale slab of {groups} bytes a row is not a multiple of 128 bytes "
                         f"(each thread of the producer's warpgroup arrives for 1/128 of a TMA): use block_n=128")
    r = scale_rows_per_chunk(groups)
    if n % r:
        raise ValueError(f"N = {n} must be a multiple of {r} (whole 16-byte chunks of the {groups}-byte scale rows)")
    sizes, start = gmm.local_groups(group_sizes, g, group_offset)
    schedule = group_tile_schedule(sizes, start, m, cfg.block_m)
    lhs_in = permute_k(lhs.astype(jnp.bfloat16), block_k)
    # On the GPU the scales as rows of 16 bytes (a bitcast: TMA strides must be multiples of 16 bytes).
    scales_in = rhs.scales.reshape(g, n // r, r * groups // 16, 16) if hardware else rhs.scales
    n_tiles = pl.cdiv(n, CONSUMERS * cfg.block_n)
    name = f"mxfp4_grouped_matmul_m{cfg.block_m}_n{cfg.block_n}_k{block_k}_st{cfg.stages}"
    kernel = plgpu.kernel(
        functools.partial(_kernel_body, cfg=cfg, k_steps=k // block_k, n_tiles=n_tiles, groups=groups,
                          hardware=hardware, high_first=_high_nibble_first),
        out_type=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
        scratch_types=_scratch(cfg, groups, hardware),
        grid=(cfg.num_sms,), grid_names=("sm",), num_threads=CONSUMERS + 1, thread_name="wg",
        kernel_name=name, interpret=interpret,
        # Lane semantics: the register layouts are chosen here (wgmma's for the packed bytes, so
        # their nibbles' values concatenate into an A operand), not inferred.
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )
    out = kernel(*schedule, lhs_in, rhs.values, scales_in)
    rows = jnp.arange(m)[:, None]
    covered = (rows >= start) & (rows < start + jnp.sum(sizes))
    return jnp.where(covered, out, 0).astype(lhs.dtype)


def mxfp4_grouped_matmul_reference(lhs: jax.Array, rhs: QuantizedWeight, group_sizes: jax.Array, *,
                                   group_offset: jax.Array | int = 0) -> jax.Array:
    """The same product through the dequantized weight and grouped_matmul_reference (the XLA path)."""
    check_args(lhs, rhs, group_sizes)
    return gmm.grouped_matmul_reference(lhs, rhs.dequantize(lhs.dtype), group_sizes, group_offset=group_offset)
