"""FA3-style warp-specialized body for blocked attention (flash prefill, paged prefill) on Hopper.

A program owns 2 x 64 rows (row = query * G + head within the KV head's group) and three
warpgroups: a producer that only issues the K/V TMAs into a `stages`-deep ring (waiting on each
slot's "free" barrier), and two consumers of 64 rows each that ping-pong on a schedule barrier,
so one's softmax overlaps the other's wgmma (FlashAttention-3; the structure of JAX's
`ops/gpu/attention_mgpu.py`). Softmax runs in the log2 domain (exp2 of FMA'd logits, approximate
math on the GPU); blocks every row of a consumer sees whole skip the mask. 64-row accumulators
keep a consumer at ~100 live f32 registers per thread at head_dim 128, where the one-warpgroup
128-row body needed ~256.

`hardware=False` (interpret mode) keeps P in SMEM and accumulates PV into a fresh accumulator:
the interpreter takes wgmma operands from SMEM only and cannot run `pl.run_state`. On the GPU
(`hardware=True`) P stays in registers and PV accumulates in place (`plgpu.ACC.init`). Both
paths are the same arithmetic; interpret mode checks the numbers and races, cross-lowering the
hardware path's shapes and layouts.

Outputs match flash_attention.run_blocked_attention's (per-split partials normalised by their own
sum, plus the natural-log log-sum-exp), except the partials come back in the multiply dtype: they
are written through the consumer's Q buffer, which keeps head_dim 192 inside the SMEM limit.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import blocked_attention as ba

from pallas_kernels import hopper

CONSUMERS = 2
CONSUMER_ROWS = 64  # one wgmma M per consumer warpgroup
PROGRAM_ROWS = CONSUMERS * CONSUMER_ROWS
PRODUCER = CONSUMERS  # the warpgroup index of the TMA producer
LOG2E = math.log2(math.e)


def ws_smem_bytes(block_kv: int, head_dim: int, stages: int, itemsize: int, hardware: bool) -> int:
    """Shared memory of one program: Q (and output) per consumer, the K/V ring, P when
    interpreting, the lse rows."""
    elems = PROGRAM_ROWS * head_dim + 2 * stages * block_kv * head_dim
    if not hardware:
        elems += PROGRAM_ROWS * block_kv
    return itemsize * elems + 4 * PROGRAM_ROWS


def ws_stages(block_kv: int, head_dim: int, itemsize: int, max_stages: int = 3) -> int:
    """The deepest K/V ring (2..max_stages) that fits in SMEM on the hardware path."""
    fits = [s for s in range(2, max_stages + 1) if ws_smem_bytes(block_kv, head_dim, s, itemsize, True) + hopper.SMEM_SLACK <= hopper.SMEM_BYTES]
    if not fits:
        raise ValueError(f"no K/V ring fits in SMEM at block_kv={block_kv}, head_dim={head_dim}")
    return fits[-1]


def ws_scratch(st: ba.BlockedAttention, head_dim: int, loads_per_block: int, stages: int, hardware: bool) -> list:
    """SMEM and barriers of ws_attention_program (shared by the three warpgroups)."""
    swizzled = (plgpu.TilingTransform((8, 128 // jnp.dtype(st.dtype).itemsize)), plgpu.SwizzleTransform(128))
    smem = lambda shape: plgpu.SMEM(shape, st.dtype, transforms=swizzled)  # noqa: E731
    scratch = [
        smem((CONSUMERS, CONSUMER_ROWS, head_dim)),  # Q, then the output
        smem((stages, st.block_kv, head_dim)),
        smem((stages, st.block_kv, head_dim)),
        plgpu.SMEM((CONSUMERS, CONSUMER_ROWS), jnp.float32),  # lse
        plgpu.Barrier(num_barriers=CONSUMERS),  # Q loaded, per consumer
        plgpu.Barrier(num_arrivals=loads_per_block, num_barriers=stages),  # K slot loaded
        plgpu.Barrier(num_arrivals=loads_per_block, num_barriers=stages),  # V slot loaded
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # slot free (both consumers done)
        plgpu.Barrier(num_arrivals=CONSUMERS),  # the consumers' schedule (ping-pong)
    ]
    if not hardware:
        scratch.append(smem((CONSUMERS, CONSUMER_ROWS, st.block_kv)))  # P
    return scratch


def interior_blocks(length: jax.Array, row0: jax.Array, st: ba.BlockedAttention) -> tuple[jax.Array, jax.Array]:
    """KV blocks [lo, hi) that every one of the CONSUMER_ROWS rows from row0 sees whole: no mask."""
    qi_lo = lax.div(row0, st.group)
    qi_hi = jnp.minimum(lax.div(row0 + CONSUMER_ROWS - 1, st.group), st.q_len - 1)
    last_key = length - 1  # the last key every row sees
    if st.causal:
        last_key = jnp.minimum(last_key, length - st.q_len + qi_lo)
    hi = lax.div(last_key + 1, st.block_kv)
    lo = jnp.int32(0)
    if st.window is not None:
        first_key = jnp.maximum(length - st.q_len + qi_hi - st.window + 1, 0)
        lo = lax.div(first_key + st.block_kv - 1, st.block_kv)
    return lo, hi


def _online_softmax_log2(s2: jax.Array, m_i: jax.Array, l_i: jax.Array) -> tuple[jax.Array, ...]:
    """ba.softmax_update in the log2 domain: s2 are logits x log2(e), m_i the running max of them."""
    m_new = jnp.maximum(m_i, s2.max(axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s2 - lax.broadcast_in_dim(m_new, s2.shape, [0]))
    return p, alpha, m_new, l_i * alpha + p.sum(axis=1)


def _accumulate_pv(acc: jax.Array, p: jax.Array, p_smem, v_smem, hardware: bool) -> jax.Array:
    """acc + p @ v on wgmma: P from registers into the accumulator in place on the GPU; through
    SMEM into a fresh accumulator when interpreting."""
    if hardware:
        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p, v_smem)
        return pl.run_state(pv)(plgpu.ACC.init(acc))
    p_smem[...] = p
    plgpu.commit_smem()
    return acc + hopper.wgmma_f32(p_smem, v_smem, acc.shape)


def ws_attention_program(q_ref, o_ref, lse_ref, scratch, *, load_kv: Callable, length: jax.Array,
                         st: ba.BlockedAttention, hardware: bool) -> None:
    """One (batch, kv_head, tile, split) program, as ba.attention_program with the same
    load_kv(blk, slot, k_smem, v_smem, k_bars, v_bars), on three warpgroups."""
    q_smem, k_smem, v_smem, lse_smem, q_bars, k_bars, v_bars, free, turn, *p_smem = scratch
    stages = k_smem.shape[0]
    b, h = lax.axis_index("batch"), lax.axis_index("kv_head")
    tile, split, wg = lax.axis_index("tile"), lax.axis_index("split"), lax.axis_index("wg")
    first, last = ba.kv_block_range(length, tile, split, st)  # the whole tile's blocks: both consumers walk them

    @pl.when(wg == PRODUCER)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def fill(i, carry):
            slot = lax.rem(i, stages)
            pl.when(i >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))
            load_kv(first + i, slot, k_smem, v_smem, k_bars, v_bars)
            return carry

        def drain(i, carry):  # see the last slots freed too: a waiter must observe every phase
            plgpu.barrier_wait(free.at[lax.rem(i, stages)])
            return carry

        n = last - first
        lax.fori_loop(0, n, fill, 0)
        lax.fori_loop(jnp.maximum(n - stages, 0), n, drain, 0)

    @pl.when(wg < PRODUCER)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        row0 = tile * st.block_rows + wg * CONSUMER_ROWS
        rows = pl.ds(row0, CONSUMER_ROWS)
        q_wg = q_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], q_wg, q_bars.at[wg])
        plgpu.barrier_wait(q_bars.at[wg])

        def schedule():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        def step(i, carry, masked: bool):
            acc, m_i, l_i = carry
            blk, slot = first + i, lax.rem(i, stages)
            plgpu.barrier_wait(k_bars.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_wg, k_smem.at[slot].T)
                schedule()  # the other consumer's softmax runs while this wgmma does
                return acc_ref[...]

            s2 = pl.run_scoped(qk, plgpu.ACC((CONSUMER_ROWS, st.block_kv), jnp.float32)) * (st.scale * LOG2E)
            if masked:
                s2 = jnp.where(ba.block_mask(length, row0, CONSUMER_ROWS, blk, st), s2, -jnp.inf)
            p, alpha, m_i, l_i = _online_softmax_log2(s2, m_i, l_i)
            plgpu.barrier_arrive(turn)  # softmax done
            plgpu.barrier_wait(v_bars.at[slot])
            plgpu.barrier_wait(turn)  # the tensor cores are free
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            acc = _accumulate_pv(acc, p.astype(st.dtype), p_smem[0].at[wg] if p_smem else None, v_smem.at[slot],
                                 hardware)
            plgpu.barrier_arrive(free.at[slot])
            return acc, m_i, l_i

        lo, hi = interior_blocks(length, row0, st)
        lo = jnp.clip(lo, first, last)
        hi = jnp.clip(hi, lo, last)
        pl.when(wg == 1)(schedule)  # consumer 1 starts half a step behind consumer 0
        carry = ba.softmax_init(CONSUMER_ROWS, q_wg.shape[-1])
        carry = lax.fori_loop(0, lo - first, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(lo - first, hi - first, functools.partial(step, masked=False), carry)
        acc, m_i, l_i = lax.fori_loop(hi - first, last - first, functools.partial(step, masked=True), carry)
        pl.when(wg == 0)(schedule)  # ... and the schedule barrier's arrivals even out

        l_i = jnp.maximum(l_i, 1.0)  # >= 1 once any key was seen; 0: none (ba.softmax_finish)
        q_wg[...] = (acc / lax.broadcast_in_dim(l_i, acc.shape, [0])).astype(st.dtype)
        lse_smem.at[wg][...] = m_i / LOG2E + jnp.log(l_i)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_wg, o_ref.at[b, h, split, rows])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, split, rows])
        plgpu.wait_smem_to_gmem(0)


def run_ws_attention(body: Callable, q_rows: jax.Array, operands: tuple, st: ba.BlockedAttention,
                     loads_per_block: int, stages: int, name: str, interpret: Any) -> tuple[jax.Array, jax.Array]:
    """Launches body(q_ref, *operand_refs, o_ref, lse_ref, *scratch, program=) over
    (B, Hkv, tiles, splits) x 3 warpgroups, `program` being ws_attention_program for this target:
    q_rows [B, Hkv, R, D] -> partials [B, Hkv, splits, R, D] in st.dtype, lse [B, Hkv, splits, R] f32."""
    if st.block_rows != PROGRAM_ROWS:
        raise ValueError(f"the warp-specialized body takes {PROGRAM_ROWS} rows per program, got {st.block_rows}")
    b, hkv, rows, d = q_rows.shape
    hardware = interpret is None
    kernel = plgpu.kernel(
        functools.partial(body, program=functools.partial(ws_attention_program, hardware=hardware)),
        out_type=(jax.ShapeDtypeStruct((b, hkv, st.num_splits, rows, d), st.dtype),
                  jax.ShapeDtypeStruct((b, hkv, st.num_splits, rows), jnp.float32)),
        scratch_types=ws_scratch(st, d, loads_per_block, stages, hardware),
        grid=(b, hkv, rows // st.block_rows, st.num_splits),
        grid_names=("batch", "kv_head", "tile", "split"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True) if hardware else None,
        kernel_name=f"{name}_ws_kv{st.block_kv}_st{stages}_s{st.num_splits}",
        interpret=interpret,
    )
    return kernel(q_rows, *operands)
