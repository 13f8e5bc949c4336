"""W8A8 block-scaled FP8 GEMMs (DeepSeek-V3/R1, Qwen3 FP8) on Hopper: dense and grouped (MoE).

Contract. x [M, K] (bf16) times a QuantizedWeight of fmt "fp8_block" (values e4m3 [.., N, K],
K-major as shipped; scales f32 [.., ceil(N/128), ceil(K/128)]) gives bf16 [M, N]. x is quantized
per token in groups of 128 along K by quantize_activations_fp8 in jnp before the kernel (clipped to
+-448 before XLA's cast, which on CPU turns values past ~464 into NaN instead of saturating,
docs/quantization.md: so CPU, interpret mode and the GPU quantize alike; the kernel itself casts nothing
to fp8). The product is the one DeepSeek's reference computes (docs/quantization.md):

    out[m, n] = sum_kb  a_s[m, kb] * w_s[n // 128, kb] * sum_{k in block kb} x_q[m, k] * w_q[n, k]

fp8_block_matmul_reference / fp8_block_grouped_matmul_reference build it from the dequantized
operands in float32; e4m3 products are exact in f32, so the kernels differ from it only by the f32
summation order and the bf16 rounding of the output.

Kernel (DeepGEMM's sm90 "1d2d" design, docs/quantization.md, on grouped_matmul.py's persistent
warp-specialized schedule). One program per SM walks work items (schedule entry, column tile, K
split), entries fastest; each program has a TMA producer warpgroup and two consumer warpgroups
(emit_pipeline_warp_specialized). A pipeline step is one 128-wide scale block of K: the producer
loads x_q [cta_m, 128] and w_q [cta_n, 128], both K-major with a 128-byte swizzle (8-bit wgmma
operands cannot be transposed: the B operand is the `.T` view of the [N, K] tile).
Each consumer issues four k32 e4m3 x e4m3 wgmmas into a fresh f32 accumulator (its 64 rows x
block_n columns), waits for them (reading the accumulator), releases the slot, and promotes on the
CUDA cores: out_acc += acc * (a_s[rows] * w_s) (two-level accumulation: the tensor cores' partial
sums never span more than one scale block). block_n <= 128 keeps a consumer's columns inside one
128-row weight scale block, so w_s is one scalar per step. The scales come from GMEM (L2) one step
ahead, in the pipeline carry: a_s from the transposed activation scales a_s^T [KB, M_pad] (the
wrapper transposes that small matrix so a consumer's 64 rows are contiguous; loaded straight into
the accumulator's row layout) and w_s as a scalar. Their loads are issued under the step's wgmmas
and used a step later, so their latency is hidden, and no scale passes through SMEM: staging them
there by TMA (DeepGEMM's way) costs an SMEM slot per stage and, after the consumers' generic-proxy
reads, a proxy fence per step before the slot may be refilled (interpret mode flags the missing
fence as a race).

Partial blocks. The weights are never copied or padded: TMA reads zeros past N and K and drops
stores past M and N (grouped_matmul.py relies on the same), so kv_a's N = 576 (4.5 column blocks)
and K = 320 (2.5 scale blocks) run in place. TMA needs 16-byte row strides: K % 16 == 0 and
N % 8 == 0, true for every FP8 checkpoint shape (else a ValueError: padding would copy the
weights). Only the activations, quantized per call anyway, are padded to whole row tiles.

Tiles (fp8_matmul_config). SMEM per stage = x tile + w tile (e4m3, 1 byte), plus the consumers'
output tiles 2 x 64 x block_n (bf16, or f32 partials when K is split); the limit is 232,448 B:
  prefill (> 64 rows per group): consumers split M, CTA 128 x 128: 16 KiB + 16 KiB per stage,
      6 stages = 196,608 B + 2 x 64 x 128 x 2 = 32,768 B: 229,376 B (a 7th stage would not fit).
      Two f32 tiles of 64 x block_n per consumer thread (the fresh accumulator and out_acc) are
      2 x 64 registers at block_n 128; block_n 256 would need 2 x 128 and spill.
  grouped decode (<= 64 rows per group): consumers split N, CTA 64 x 256 (the x tile shared):
      8 KiB + 32 KiB per stage, 4 stages = 163,840 B + 32,768 B: 196,608 B.
  dense decode (M <= 64): CTA 64 x 128 (block_n 64: twice the column tiles), 24 KiB per stage,
      8 stages = 196,608 B + f32 partial tiles 2 x 64 x 64 x 4 = 32,768 B: 229,376 B.
  Decode keeps wgmma's 64-row M and pads the tokens rather than swapping A and B: at M <= 64 the
  kernel streams the weights, and a padded 64 x 128 x 128 e4m3 wgmma (2.1 MFLOP, ~0.14 us of one
  SM's ~15 TFLOP/s) takes less time than that 128 x 128 weight block's 16 KiB at one SM's share of
  HBM (4.8 TB/s / 132: ~0.45 us), so the padding costs no time. Swap-AB (weight as A, tokens as
  wgmma N) would transpose the output tile (tokens become columns), which the grouped kernel's
  row-masked TMA stores cannot write without an SMEM transpose. What decode lacks is parallelism:
  q_a (N = 1536) has 12 column tiles of 128 for 132 SMs. So the dense kernel splits K
  (pick_k_splits: the fewest splits giving half the SMs work, >= 4 steps each; q_a 7, kv_a 14,
  o_proj 2, q_b 1); each split writes an f32 partial [S, M, N] that jnp sums (q_a at M = 64: 2.8 MB
  of partials against 11 MB of weights).

Registers. ptxas hoists the consumers' per-thread o_smem addresses out of the item loop, and they
stay live across the producer/consumer register split: with the producer at 40 registers they
spill (20-32 B at every grouped and prefill shape). memory_registers = 96 removes the spills and
leaves the consumers 208 registers, more than their two 64-register tiles and addressing need.

Grouped rows (the MoE path) follow grouped_matmul.py: a jnp prologue turns group sizes into a tile
schedule (tile_schedule / local_groups), every entry stores only its group's rows (a ladder of
power-of-two TMA stores), and rows no entry covers (padding, other shards' groups) are zeroed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import hopper
from pallas_kernels import grouped_matmul as gmm
from pallas_kernels import quantized as qw
from pallas_kernels.quantized import FP8_BLOCK, QuantizedWeight

WG_ROWS = 64  # rows of one consumer's tile: wgmma's M
SWIZZLE = 128  # bytes: one 128-wide K block of e4m3 per swizzled row
MIN_SPLIT_STEPS = 4  # K steps a split keeps, so that its pipeline fills


@dataclasses.dataclass(frozen=True)
class Fp8MatmulConfig:
    """Tiles: each consumer warpgroup owns 64 rows x block_n columns; split "m" stacks the two
    consumers' tiles along M (CTA tile 128 x block_n, the w tile shared), "n" along N (64 x
    2 block_n, the x tile shared). k_splits (dense only) cuts K into that many f32 partials;
    num_sms None: the target's SM count; memory_registers: the producer's setmaxnreg."""

    block_n: int = 128
    split: str = "m"
    max_concurrent_steps: int = 6
    k_splits: int = 1
    num_sms: int | None = None
    memory_registers: int = 96

    def __post_init__(self):
        if self.block_n not in (64, 128) or self.split not in ("m", "n"):
            raise ValueError(f"block_n must be 64 or 128 (inside one 128-row scale block), split 'm' or 'n': {self}")
        if self.max_concurrent_steps < 2 or self.k_splits < 1 or (self.num_sms is not None and self.num_sms < 1):
            raise ValueError(f"max_concurrent_steps must be >= 2, k_splits >= 1, num_sms None or positive: {self}")

    @property
    def cta_m(self) -> int:
        return WG_ROWS * (2 if self.split == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.block_n * (2 if self.split == "n" else 1)


def pick_k_splits(k_steps: int, tiles: int, num_sms: int) -> int:
    """The fewest K splits S (a divisor of k_steps, each split >= MIN_SPLIT_STEPS steps) that give
    tiles x S >= num_sms / 2 work items; the most allowed where none does. Half the SMs, each with
    its ring of weight tiles in flight, are taken to be enough to stream HBM; every further split
    adds S x M x N x 4 bytes of f32 partials (written, then read by the sum) for no more bandwidth."""
    options = [s for s in range(1, k_steps + 1) if k_steps % s == 0 and (s == 1 or k_steps // s >= MIN_SPLIT_STEPS)]
    return next((s for s in options if 2 * tiles * s >= num_sms), options[-1])


def fp8_matmul_config(device_kind: str, m: int, n: int, k: int, groups: int = 1,
                      num_sms: int = hopper.NOMINAL_NUM_SMS) -> Fp8MatmulConfig:
    """The frozen tiles (module docstring) by rows per group: decode (<= 64) or prefill; the dense
    decode kernel's K splits from the SM count. H100 and H200 share them; CPU interprets them."""
    del device_kind  # one Hopper table; other devices interpret the same tiles
    if m / groups > WG_ROWS:
        return Fp8MatmulConfig(block_n=128, split="m", max_concurrent_steps=6)
    if groups > 1:
        return Fp8MatmulConfig(block_n=128, split="n", max_concurrent_steps=4)
    k_steps = pl.cdiv(k, FP8_BLOCK)
    return Fp8MatmulConfig(block_n=64, split="n", max_concurrent_steps=8,
                           k_splits=pick_k_splits(k_steps, pl.cdiv(n, 128), num_sms))


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def fp8_block_matmul_reference(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [M, K] times the fp8_block weight [K, N], both quantized as the kernel sees them
    (qw.dense_operands, the XLA path's operands), exact products summed in f32 -> bf16 [M, N]."""
    a, b = qw.dense_operands(x, w)
    return jnp.dot(a, b, precision=lax.Precision.HIGHEST).astype(jnp.bfloat16)


def fp8_block_grouped_matmul_reference(lhs: jax.Array, rhs: QuantizedWeight, group_sizes: jax.Array, *,
                                       group_offset: jax.Array | int = 0) -> jax.Array:
    """grouped_matmul_reference's contract on the dequantized operands -> bf16 [M, N]."""
    a, b = qw.dense_operands(lhs, rhs)
    return gmm.grouped_matmul_reference(a, b, group_sizes, group_offset=group_offset).astype(jnp.bfloat16)


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


def _store_rows(o_smem, o_ref, tile_row0, row_lo, row_hi, col0) -> None:
    """TMA-stores the rows of [row_lo, row_hi) that fall in this consumer's tile (global rows
    tile_row0 .. tile_row0 + 63) at columns col0..; a TMA's size is static, so the dynamic count
    goes out in power-of-two pieces (5 rows: a 4-row and a 1-row store)."""
    lo = jnp.clip(row_lo, tile_row0, tile_row0 + WG_ROWS)
    count = jnp.clip(row_hi, tile_row0, tile_row0 + WG_ROWS) - lo
    offset = lo - tile_row0
    for bit in reversed(range(int(math.log2(WG_ROWS)) + 1)):
        rows = 1 << bit

        @pl.when(count & rows != 0)
        def _store():
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(offset, rows)],
                                    o_ref.at[pl.ds(tile_row0 + offset, rows), pl.ds(col0, o_smem.shape[1])])

        offset += count & rows


def _weight_scale(ws_ref, nb, kb):
    """w_s of weight rows block nb, K block kb: a scalar read from GMEM (an L2 hit after the first
    program's), issued with the step's wgmmas in flight."""
    return ws_ref[nb, kb]


def _scales(xs_ref, ws_ref, rows, nb, kb):
    """(a_s of the consumer's 64 rows in the accumulator's row layout, w_s): K block kb's scales,
    read from GMEM (L2) one step ahead of their use."""
    return (plgpu.load(xs_ref.at[kb, rows], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False),
            _weight_scale(ws_ref, nb, kb))


def _promote(x_smem, w_smem, out, scales, next_scales, m_off, n_off, bn):
    """One scale block of K: a fresh f32 accumulator from four k32 e4m3 wgmmas, scaled per row by
    a_s * w_s and added to out (DeepGEMM's promotion); the next step's scales are loaded while the
    wgmmas run. Returns the new out."""

    def acc_scope(acc_ref):
        plgpu.wgmma(acc_ref, x_smem.at[pl.ds(m_off, WG_ROWS)], w_smem.at[pl.ds(n_off, bn)].T)
        loaded = next_scales()
        return acc_ref[...], loaded  # reading the accumulator waits for the wgmmas

    acc, loaded = pl.run_scoped(acc_scope, plgpu.ACC((WG_ROWS, bn), jnp.float32))
    a_s, w_s = scales
    return out + acc * lax.broadcast_in_dim(a_s * w_s, acc.shape, [0]), loaded


def _fp8_body(group_ref, block_ref, lo_ref, hi_ref, x_ref, xs_ref, w_ref, ws_ref, o_ref, *,
              cfg: Fp8MatmulConfig, k_steps: int, n_iters: int):
    """One SM's program over work items lin = sm, sm + num_sms, ...: (entry, column tile, K split)
    with entries fastest (the row blocks of one group share its weight columns in L2).

    x_ref [M_pad, K] e4m3, xs_ref [KB, M_pad] f32 (a_s^T), w_ref [G, N, K] e4m3 and ws_ref
    [G, NB, KB] f32 (or [N, K] and [NB, KB]: the dense weight as stored), o_ref [S, M, N] (f32
    partials when S = k_splits > 1, else bf16). Operand slots are released right after each body
    (delay_release 0): the body's accumulator read has waited for its wgmmas, so no wgmma reads a
    slot the producer refills, in this item or the next.
    """
    num_entries, wg = group_ref.shape[0], lax.axis_index("wg")
    bn, cta_m, cta_n, splits = cfg.block_n, cfg.cta_m, cfg.cta_n, cfg.k_splits
    n, num_nb, steps = o_ref.shape[2], ws_ref.shape[-2], k_steps // splits
    of_group = lambda ref, g: ref.at[g] if ref.ndim == 3 else ref  # noqa: E731 (dense: one group)
    tiled = (plgpu.TilingTransform((8, SWIZZLE)), plgpu.SwizzleTransform(SWIZZLE))

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(steps,), memory_registers=cfg.memory_registers, wg_axis="wg", num_compute_wgs=2,
            in_specs=[
                plgpu.BlockSpec((cta_m, FP8_BLOCK), lambda kk: (0, kk), transforms=tiled, memory_space=plgpu.SMEM),
                plgpu.BlockSpec((cta_n, FP8_BLOCK), lambda kk: (0, kk), transforms=tiled, memory_space=plgpu.SMEM),
            ],
            max_concurrent_steps=min(cfg.max_concurrent_steps, steps), compute_context=context)

    ignore = lambda *_, **__: None  # noqa: E731 (the bodies do not change the allocations)

    @functools.partial(pl.run_scoped, allocations=pipeline(ignore, ignore).get_allocations(x_ref, of_group(w_ref, 0)),
                       o_smem=plgpu.SMEM((2, WG_ROWS, bn), o_ref.dtype), collective_axes="wg")
    def _scope(allocations, o_smem):
        @plgpu.nd_loop((num_entries * n_iters * splits,), collective_axes="sm")
        def _item(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            t, rest = lax.rem(lin, num_entries), lax.div(lin, num_entries)
            nt, ks = lax.rem(rest, n_iters), lax.div(rest, n_iters)
            group, block, row_lo, row_hi = group_ref[t], block_ref[t], lo_ref[t], hi_ref[t]
            m_off, n_off = (wg * WG_ROWS, 0) if cfg.split == "m" else (0, wg * bn)
            col0, k0 = nt * cta_n + n_off, ks * steps
            nb = jnp.minimum(col0 // FP8_BLOCK, num_nb - 1)  # a tile wholly past N reads zeros, stores nothing

            wg_rows = pl.ds(block * cta_m + m_off, WG_ROWS)
            scales = functools.partial(_scales, xs_ref, of_group(ws_ref, group), wg_rows, nb)

            def context(run):
                out, _ = run((plgpu.layout_cast(jnp.zeros((WG_ROWS, bn), jnp.float32), plgpu.Layout.WGMMA), scales(k0)))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last item's stores have read o_smem
                o_smem.at[wg][...] = out.astype(o_smem.dtype)
                plgpu.commit_smem()
                pl.when(col0 < n)(lambda: _store_rows(o_smem.at[wg], o_ref.at[ks], block * cta_m + m_off,
                                                      row_lo, row_hi, col0))

            def mma(idx, x_smem, w_smem, carry):
                next_kb = k0 + jnp.minimum(idx[0] + 1, steps - 1)
                return _promote(x_smem, w_smem, *carry, lambda: scales(next_kb), m_off, n_off, bn)

            @pl.when(row_lo < row_hi)
            def _compute():
                k_cols = pl.ds(k0 * FP8_BLOCK, steps * FP8_BLOCK)  # this split's K (past K: zeros)
                x_tiles = x_ref.at[pl.ds(block * cta_m, cta_m), k_cols]
                w_tiles = of_group(w_ref, group).at[pl.ds(nt * cta_n, cta_n), k_cols]
                pipeline(mma, context)(x_tiles, w_tiles, allocations=allocations)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last item's stores, before o_smem goes


def _check_args(x: jax.Array, w: QuantizedWeight, lead: int) -> None:
    """Ranks, the fp8_block format, matching K, and TMA's 16-byte row strides."""
    qw.check(w, "fp8_block matmul weight")
    if w.fmt != "fp8_block" or x.ndim != 2 or w.values.ndim != 2 + lead:
        raise ValueError(f"want x [M, K] and an fp8_block weight with {lead} leading axes; got x "
                         f"{list(x.shape)}, {w.fmt} values {list(w.values.shape)}")
    n, k = w.values.shape[-2:]
    if x.shape[1] != k:
        raise ValueError(f"contracting dims differ: x {list(x.shape)}, weight values [.., N, K] {list(w.values.shape)}")
    if k % 16 or n % 8:
        raise ValueError(f"the fp8 kernels read the weight in place: K % 16 == 0 and N % 8 == 0 (TMA row strides), "
                         f"got N, K = {n}, {k}; padding would copy the weights every call")


def _launch(schedule, x: jax.Array, w: QuantizedWeight, cfg: Fp8MatmulConfig, interpret: Any) -> jax.Array:
    """Quantizes x and runs the kernel over the schedule; [S, M, N] (f32 when S > 1, else bf16)."""
    (m, k), n = x.shape, w.values.shape[-2]
    x_q, x_s = qw.quantize_activations_fp8(x)
    m_pad, k_steps = hopper.round_up(m, cfg.cta_m), pl.cdiv(k, FP8_BLOCK)
    x_q = hopper.pad_to(x_q, (m_pad, k))  # whole row tiles: fused into the quantization, no extra pass
    xs_t = hopper.pad_to(x_s.T, (k_steps, m_pad))
    n_iters = pl.cdiv(n, cfg.cta_n)
    out_dtype = jnp.float32 if cfg.k_splits > 1 else jnp.bfloat16
    name = (f"fp8_block_{'grouped_' if w.values.ndim == 3 else ''}matmul_{cfg.split}{cfg.cta_m}x{cfg.cta_n}"
            f"_st{min(cfg.max_concurrent_steps, k_steps // cfg.k_splits)}_ks{cfg.k_splits}")
    kernel = plgpu.kernel(
        functools.partial(_fp8_body, cfg=cfg, k_steps=k_steps, n_iters=n_iters),
        out_type=jax.ShapeDtypeStruct((cfg.k_splits, m, n), out_dtype),
        grid=(cfg.num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg", kernel_name=name,
        interpret=interpret,
    )
    return kernel(*schedule, x_q, xs_t, w.values, w.scales)


def _finish_config(config: Fp8MatmulConfig | None, default: Fp8MatmulConfig, k: int) -> Fp8MatmulConfig:
    """config (or the default) with the target's SM count and a K split count dividing K's steps."""
    cfg = config or default
    if pl.cdiv(k, FP8_BLOCK) % cfg.k_splits:
        raise ValueError(f"k_splits = {cfg.k_splits} does not divide K's {pl.cdiv(k, FP8_BLOCK)} blocks of 128")
    return dataclasses.replace(cfg, num_sms=cfg.num_sms or hopper.target_num_sms())


def fp8_block_matmul_kernel(x: jax.Array, w: QuantizedWeight, *, interpret: Any = None,
                            config: Fp8MatmulConfig | None = None) -> jax.Array:
    """x [M, K] times an fp8_block weight (values [N, K]) on the Mosaic GPU kernel -> bf16 [M, N]
    (fp8_block_matmul_reference's numbers). interpret: None compiles for the GPU, or
    plgpu.InterpretGPUParams to interpret on CPU. The weight is read in place."""
    _check_args(x, w, lead=0)
    (m, k), n = x.shape, w.values.shape[0]
    cfg = _finish_config(config, fp8_matmul_config(hopper.target_device_kind(), m, n, k,
                                                   num_sms=hopper.target_num_sms()), k)
    blocks = np.arange(pl.cdiv(m, cfg.cta_m), dtype=np.int32)  # one group: a static schedule
    schedule = (np.zeros_like(blocks), blocks, blocks * cfg.cta_m, np.minimum((blocks + 1) * cfg.cta_m, m))
    out = _launch(tuple(jnp.asarray(a, jnp.int32) for a in schedule), x, w, cfg, interpret)
    return out[0] if cfg.k_splits == 1 else out.sum(0).astype(jnp.bfloat16)


def fp8_block_grouped_matmul_kernel(lhs: jax.Array, rhs: QuantizedWeight, group_sizes: jax.Array, *,
                                    group_offset: jax.Array | int = 0, interpret: Any = None,
                                    config: Fp8MatmulConfig | None = None) -> jax.Array:
    """The routed-expert W8A8 GEMM: grouped_matmul_reference's contract (rows sorted by group; rows
    past sum(group_sizes) and outside the shard's groups [group_offset, group_offset + G) give
    zeros) with rhs an fp8_block weight [G, N, K] + [G, NB, KB] -> bf16 [M, N]."""
    _check_args(lhs, rhs, lead=1)
    if group_sizes.ndim != 1 or group_sizes.shape[0] < rhs.values.shape[0]:
        raise ValueError(f"{list(group_sizes.shape)} group sizes for {rhs.values.shape[0]} weight groups")
    (m, k), (g, n, _) = lhs.shape, rhs.values.shape
    cfg = _finish_config(config, fp8_matmul_config(hopper.target_device_kind(), m, n, k, group_sizes.shape[0]), k)
    if cfg.k_splits != 1:
        raise ValueError(f"the grouped kernel does not split K: {cfg}")
    sizes, start = gmm.local_groups(group_sizes, g, group_offset)
    out = _launch(gmm.tile_schedule(sizes, start, m, cfg.cta_m), lhs, rhs, cfg, interpret)[0]
    rows = jnp.arange(m)[:, None]
    return jnp.where((rows >= start) & (rows < start + jnp.sum(sizes)), out, 0).astype(jnp.bfloat16)
