"""MoE grouped GEMM: rows of lhs sorted by group, each group multiplied by its own rhs matrix.

lhs [M, K] holds the rows of group 0, then group 1, ... (group_sizes[g] rows each); rows past
sum(group_sizes) are padding and give zeros. rhs [G_local, K, N]. Accumulation is float32; the
output has lhs's dtype.

group_offset (expert parallelism): group_sizes may list all G_total >= G_local groups while rhs
holds only this shard's groups group_offset .. group_offset + G_local - 1. Rows of those groups
are multiplied by rhs[g - group_offset]; rows of every other group give zeros (the shard's
partial result, summed across shards by the caller). group_offset may be a traced int32 scalar.
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


def check_grouped_matmul_args(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    """Validates ranks and matching dimensions."""
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(
            f"want lhs [M,K], rhs [G,K,N], group_sizes [G]; got {lhs.shape}, " f"{rhs.shape}, {group_sizes.shape}"
        )
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"contracting dims differ: lhs {lhs.shape}, rhs {rhs.shape}")
    if group_sizes.shape[0] < rhs.shape[0]:
        raise ValueError(f"{group_sizes.shape[0]} group sizes for {rhs.shape[0]} rhs groups")


def local_groups(group_sizes: jax.Array, num_local: int, group_offset: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """The shard's group sizes [G_local] and the first row of its first group (a scalar)."""
    group_sizes = group_sizes.astype(jnp.int32)
    offset = jnp.asarray(group_offset, jnp.int32)
    start = jnp.sum(jnp.where(jnp.arange(group_sizes.shape[0]) < offset, group_sizes, 0))
    sizes = jax.lax.dynamic_slice_in_dim(group_sizes, offset, num_local)
    return sizes, start


def grouped_matmul_reference(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, group_offset: jax.Array | int = 0
) -> jax.Array:
    """The grouped GEMM through jax.lax.ragged_dot: lhs [M, K], rhs [G, K, N] -> [M, N]."""
    check_grouped_matmul_args(lhs, rhs, group_sizes)
    m = lhs.shape[0]
    sizes, start = local_groups(group_sizes, rhs.shape[0], group_offset)
    # ragged_dot wants the shard's first row at row 0: rotate, multiply, rotate back.
    out = jax.lax.ragged_dot(jnp.roll(lhs, -start, axis=0), rhs, sizes, preferred_element_type=jnp.float32)
    out = jnp.roll(out, start, axis=0)
    rows = jnp.arange(m)[:, None]
    keep = (rows >= start) & (rows < start + jnp.sum(sizes))
    return jnp.where(keep, out, 0.0).astype(lhs.dtype)


# ----------------------------------------------------------------------------------------------
# Mosaic GPU kernel (H100). A jnp prologue turns the group sizes into a tile schedule: one entry
# per (group, block of block_m rows) pair that holds rows of that group, at most
# cdiv(M, block_m) + G - 1 of them. Program (t, n) multiplies schedule entry t's row block by
# rhs[group] over K with a pipelined TMA + wgmma loop, then stores only that group's rows of the
# block (a ladder of power-of-two TMA stores, since a TMA's size is static). Rows no entry covers
# (padding, other shards' groups) are zeroed by the wrapper.
#
# No operand is copied to fit the tiles: a tile reaching past M, K or N is read by TMA with zeros
# past the array's end (OOBFillMode.ZEROS, which interpret mode models too) and its stores past the
# end are dropped. So the expert weights (rhs, e.g. gpt-oss-120b's [128, 2880, 2880] down
# projection: 45 column tiles of 64) are read in place; only a K or N that is not a multiple of 64
# (the swizzled TMA tile: tiny test models) or M off a multiple of 8 (its row tile) is padded.
#
# On Hopper the persistent variant (config.persistent) runs one program per SM over all (entry,
# column tile) work items, entries fastest: the row blocks of one group run side by side and
# share its rhs columns in L2 (rhs is the large operand of an MoE layer). Each program has a TMA
# producer warpgroup and two consumer warpgroups, each owning half of a 2 x block_n column tile
# (emit_pipeline_warp_specialized, the structure of upstream's hopper_matmul_mgpu.py), and an
# epilogue whose TMA stores stay in flight while the next item's main loop runs.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GroupedMatmulConfig:
    """Tile sizes: block_m rows x block_n columns per (consumer) warpgroup, block_k per pipeline
    step; persistent: num_sms programs (None: one per SM of the target device,
    hopper.target_num_sms()) with two consumers of block_n columns each."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    persistent: bool = False
    num_sms: int | None = None

    def __post_init__(self):
        if self.block_m % 64 or self.block_n % 64 or self.block_k % 64:
            raise ValueError(f"block sizes must be multiples of 64: {self}")
        if self.max_concurrent_steps < 2 or (self.num_sms is not None and self.num_sms < 1):
            raise ValueError(f"max_concurrent_steps must be >= 2 and num_sms None or positive: {self}")


DECODE_ROWS_PER_GROUP = 64  # at most this many rows per group on average: the weight-bound decode tiles


def grouped_matmul_config(device_kind: str, rows_per_group: float = float("inf")) -> GroupedMatmulConfig:
    """The frozen tile sizes per device kind (H100 and H200 share them; CPU interprets them).

    Hopper: the persistent warp-specialized kernel. Prefill-sized groups take 128 x (2 x 128)
    tiles and a 3-deep ring (3 x 48 KiB + a 64 KiB output tile: 208 KiB of the 227; 4 deep
    overflows); decode-sized ones (a few rows per expert: the kernel streams the weights once and is
    bound by HBM bandwidth) take wgmma's smallest M, 64, and 2 x 64 columns, so more work items
    cover the SMs, with a deeper ring (6 stages of 24 KiB) keeping more weight bytes in flight.
    """
    if "H200" in device_kind or "H100" in device_kind:
        if rows_per_group <= DECODE_ROWS_PER_GROUP:
            return GroupedMatmulConfig(block_m=64, block_n=64, block_k=64, max_concurrent_steps=6, persistent=True)
        return GroupedMatmulConfig(block_m=128, block_n=128, block_k=64, max_concurrent_steps=3, persistent=True)
    return GroupedMatmulConfig()


def tile_schedule(
    sizes: jax.Array, start: jax.Array, m: int, block_m: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per schedule entry: (group, row block, first row, end row); unused entries have end <= first.

    sizes [G] are the local groups' sizes, laid out from row `start`. Returns four int32 [T] with
    T = cdiv(m, block_m) + G - 1.
    """
    num_entries = pl.cdiv(m, block_m) + sizes.shape[0] - 1
    ends = start + jnp.cumsum(sizes)
    begins = ends - sizes
    first_block = begins // block_m
    counts = jnp.where(sizes > 0, (ends - 1) // block_m - first_block + 1, 0)
    offsets = jnp.cumsum(counts) - counts
    t = jnp.arange(num_entries, dtype=jnp.int32)
    group = jnp.clip(jnp.searchsorted(offsets + counts, t, side="right"), 0, sizes.shape[0] - 1)
    block = first_block[group] + t - offsets[group]
    used = t < counts.sum()
    row_lo = jnp.maximum(begins[group], block * block_m)
    row_hi = jnp.where(used, jnp.minimum(ends[group], (block + 1) * block_m), row_lo)
    return (
        group.astype(jnp.int32),
        jnp.where(used, block, 0).astype(jnp.int32),
        row_lo.astype(jnp.int32),
        row_hi.astype(jnp.int32),
    )


def _store_rows(o_smem, o_ref, row_lo, row_hi, block, ni, cfg: GroupedMatmulConfig, wait: bool = True) -> None:
    """Copies tile rows [row_lo, row_hi) (global rows of row block `block`) to o_ref; `wait`:
    until the stores have read o_smem (else the caller waits before reusing it).

    A TMA's extent is static, so rows go out in power-of-two pieces picked by the bits of the
    dynamic count: 5 rows = one 4-row store + one 1-row store.
    """
    count = row_hi - row_lo
    offset = row_lo - block * cfg.block_m
    for bit in reversed(range(int(math.log2(cfg.block_m)) + 1)):
        rows = 1 << bit

        @pl.when(count & rows != 0)
        def _store():
            plgpu.copy_smem_to_gmem(
                o_smem.at[pl.ds(offset, rows)],
                o_ref.at[pl.ds(block * cfg.block_m + offset, rows), pl.ds(ni * cfg.block_n, cfg.block_n)],
            )

        offset += count & rows
    if wait:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _gmm_body(
    group_ref, block_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, o_ref, o_smem, *, cfg: GroupedMatmulConfig, k_steps: int
):
    """Program (t, n): one schedule entry's row block times one column block of its group's rhs."""
    t, ni = jax.lax.axis_index("entry"), jax.lax.axis_index("n")
    group, block, row_lo, row_hi = group_ref[t], block_ref[t], lo_ref[t], hi_ref[t]

    @pl.when(row_lo < row_hi)
    def _compute():
        def acc_scope(acc_ref):
            def mma(_, lhs_smem, rhs_smem):
                plgpu.wgmma(acc_ref, lhs_smem, rhs_smem)
                # emit_pipeline with delay_release=1 refills step s-1's slots as soon as step s's body
                # returns. wgmma_wait(1) leaves at most one wgmma group of this warpgroup in flight,
                # step s's own, so step s-1's wgmma, the last reader of those slots, is done (upstream
                # hopper_matmul_mgpu.py pairs delay_release=d with wgmma_wait(d)).
                plgpu.wgmma_wait(1)

            plgpu.emit_pipeline(
                mma,
                grid=(k_steps,),
                in_specs=[
                    plgpu.BlockSpec((cfg.block_m, cfg.block_k), lambda kk: (block, kk), delay_release=1),
                    plgpu.BlockSpec((cfg.block_k, cfg.block_n), lambda kk: (kk, ni), delay_release=1),
                ],
                max_concurrent_steps=cfg.max_concurrent_steps,
            )(lhs_ref, rhs_ref.at[group])
            return acc_ref[...]  # reading an ACC waits for every wgmma (wgmma_wait(0)) first

        acc = pl.run_scoped(acc_scope, plgpu.ACC((cfg.block_m, cfg.block_n), jnp.float32))
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        _store_rows(o_smem, o_ref, row_lo, row_hi, block, ni, cfg)


def _persistent_gmm_body(group_ref, block_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, o_ref, *,
                         cfg: GroupedMatmulConfig, k_steps: int, n_iters: int):
    """One SM's program: work items lin = sm, sm + num_sms, ... as (entry lin % T, column tile
    lin // T) of 2 x block_n columns, consumer wg owning columns wg * block_n of the tile.

    Operand slots (emit_pipeline_warp_specialized, delay_release=d): after its body of step s a
    consumer arrives on the "consumed" barrier of step s-d's slot, and the producer refills a slot
    only once both consumers arrived. Each body ends with wgmma_wait(d): at most d wgmma groups of
    this consumer, steps s-d+1..s, stay in flight, so step s-d's wgmma, that slot's last reader, is
    done. d = 1 lets step s's wgmma run while the consumer waits for step s+1's operands. But no
    body follows the last d steps, so their slots are never released, while the producer, once it
    saw the arrivals for steps 0..S-1-d, fills every slot for the next work item in its prologue
    without waiting: so the last step's body waits for all its wgmmas (wgmma_wait(0)) before its
    arrival, and no wgmma of an item reads a slot after the producer moved on. With one K step
    there is no arrival at all to delay (the producer would lap the consumers): d = 0 there. The
    accumulator is read after the pipeline (acc_ref[...] waits for every wgmma).
    """
    num_entries, dtype = group_ref.shape[0], lhs_ref.dtype
    wg, cta_n = jax.lax.axis_index("wg"), 2 * cfg.block_n
    delay = min(1, k_steps - 1)
    swizzle = plgpu.find_swizzle(cfg.block_k * jnp.dtype(dtype).itemsize * 8)
    tiled = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((cfg.block_m, cfg.block_k), lambda kk: (0, kk), transforms=tiled,
                                memory_space=plgpu.SMEM, delay_release=delay),
                plgpu.BlockSpec((cfg.block_k, cta_n), lambda kk: (kk, 0), transforms=tiled,
                                memory_space=plgpu.SMEM, delay_release=delay),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.max_concurrent_steps,
            compute_context=context,
        )

    ignore = lambda *_, **__: None  # noqa: E731 (the bodies do not change the allocations)

    @functools.partial(pl.run_scoped, allocations=pipeline(ignore, ignore).get_allocations(lhs_ref, rhs_ref.at[0]),
                       o_smem=plgpu.SMEM((2, cfg.block_m, cfg.block_n), dtype), collective_axes="wg")
    def _scope(allocations, o_smem):
        @plgpu.nd_loop((num_entries * n_iters,), collective_axes="sm")
        def _item(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            t, nb = jax.lax.rem(lin, num_entries), jax.lax.div(lin, num_entries)
            group, block, row_lo, row_hi = group_ref[t], block_ref[t], lo_ref[t], hi_ref[t]
            ni = nb * 2 + wg  # this consumer's column tile

            def context(run):
                def acc_scope(acc_ref):
                    run(acc_ref)
                    acc = acc_ref[...].astype(dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last item's stores have read o_smem
                    o_smem.at[wg][...] = acc
                    plgpu.commit_smem()
                    # The second half of an odd last column tile lies past N: it multiplied the TMA's
                    # zero fill and stores nothing.
                    pl.when(ni * cfg.block_n < o_ref.shape[1])(
                        lambda: _store_rows(o_smem.at[wg], o_ref, row_lo, row_hi, block, ni, cfg, wait=False))

                pl.run_scoped(acc_scope, plgpu.ACC((cfg.block_m, cfg.block_n), jnp.float32))

            def mma(idx, lhs_smem, rhs_smem, acc_ref):
                plgpu.wgmma(acc_ref, lhs_smem, rhs_smem.at[:, pl.ds(wg * cfg.block_n, cfg.block_n)])
                plgpu.wgmma_wait(delay)
                if delay:
                    @pl.when(idx[0] == k_steps - 1)
                    def _drain():
                        plgpu.wgmma_wait(0)
                return acc_ref

            @pl.when(row_lo < row_hi)
            def _compute():
                pipeline(mma, context)(lhs_ref.at[pl.ds(block * cfg.block_m, cfg.block_m)],
                                       rhs_ref.at[group, :, pl.ds(nb * cta_n, cta_n)], allocations=allocations)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last item's stores, before o_smem goes


def _pick_block_n(n: int, preferred: int, largest: int, halves: int) -> int:
    """The widest column tile (the preferred one, else 192, 128, 64; at most `largest`) that cuts N
    (a multiple of 64) into whole `halves` x block_n tiles; 64 where none does (N an odd number of
    64-column tiles: the last tile's second half lies past N)."""
    return next((b for b in (min(preferred, largest), 192, 128, 64) if b <= largest and n % (halves * b) == 0), 64)


def grouped_matmul_kernel(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int = 0,
    interpret: Any = None,
    config: GroupedMatmulConfig | None = None,
) -> jax.Array:
    """The grouped GEMM on the Mosaic GPU kernel (same contract as grouped_matmul_reference).

    interpret: None to compile for the GPU, or plgpu.InterpretGPUParams to interpret on CPU.
    Multiplies in rhs's dtype with f32 accumulation, lhs cast to it. rhs, the expert weights, is
    read in place: compiled for the GPU it must be bf16 or f16 (a ValueError otherwise: a cast
    would copy every expert's weights on every call); interpret mode takes f32 too. Tiles reaching
    past M, K or N read zeros and store nothing there, so nothing is padded to whole tiles; only K
    or N off a multiple of 64 and M off a multiple of 8 (tiny test shapes) cost a padded copy.
    """
    check_grouped_matmul_args(lhs, rhs, group_sizes)
    dtype = rhs.dtype
    if hopper.mma_dtype(dtype, interpret) != dtype:
        raise ValueError(f"grouped_matmul reads the expert weights (rhs) in place: bfloat16 or float16 (float32 "
                         f"too in interpret mode), got {dtype}{list(rhs.shape)}; a cast would copy them every call "
                         f"(load the model with dtype='bfloat16')")
    (m, k), n = lhs.shape, rhs.shape[2]
    config = config or grouped_matmul_config(hopper.target_device_kind(), m / group_sizes.shape[0])
    halves = 2 if config.persistent else 1  # the persistent kernel's two consumers split a column tile
    m_in, k_in, n_in = hopper.round_up(m, 8), hopper.round_up(k, 64), hopper.round_up(n, 64)
    # The persistent kernel keeps column tiles at <= 128 per consumer: 192 overflows SMEM beside the ring.
    cfg = dataclasses.replace(config, block_n=_pick_block_n(n_in, config.block_n, 128 if halves == 2 else 192, halves),
                              num_sms=config.num_sms or hopper.target_num_sms())
    k_steps = pl.cdiv(k_in, cfg.block_k)
    sizes, start = local_groups(group_sizes, rhs.shape[0], group_offset)
    schedule = tile_schedule(sizes, start, m, cfg.block_m)
    lhs_in = hopper.pad_to(lhs.astype(dtype), (m_in, k_in))
    rhs_in = hopper.pad_to(rhs, (rhs.shape[0], k_in, n_in))
    name = f"grouped_matmul_m{cfg.block_m}_n{cfg.block_n}_k{cfg.block_k}_st{cfg.max_concurrent_steps}"
    if cfg.persistent:
        launch = dict(body=functools.partial(_persistent_gmm_body, cfg=cfg, k_steps=k_steps,
                                             n_iters=pl.cdiv(n_in, 2 * cfg.block_n)),
                      grid=(cfg.num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
                      kernel_name=f"{name}_persistent")
    else:
        launch = dict(body=functools.partial(_gmm_body, cfg=cfg, k_steps=k_steps),
                      scratch_types=[plgpu.SMEM((cfg.block_m, cfg.block_n), dtype)],
                      grid=(schedule[0].shape[0], n_in // cfg.block_n), grid_names=("entry", "n"), kernel_name=name)
    kernel = plgpu.kernel(
        out_type=jax.ShapeDtypeStruct((m_in, n_in), dtype),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
        **launch,
    )
    out = kernel(*schedule, lhs_in, rhs_in)[:m, :n]
    rows = jnp.arange(m)[:, None]
    covered = (rows >= start) & (rows < start + jnp.sum(sizes))
    return jnp.where(covered, out, 0).astype(lhs.dtype)
