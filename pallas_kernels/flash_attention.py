"""Causal prefill attention: plain-jnp reference and Mosaic GPU kernel.

q [B, T, Hq, D] attends to k/v [B, S, Hkv, D] with T <= S; query i sits at position S - T + i,
so a prefill chunk can attend to a longer contiguous context. GQA: query head h reads KV head
h // (Hq // Hkv). Softmax and accumulation are float32; the output has q's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import warp_specialized_attention as ws
from pallas_kernels.blocked_attention import (HEAD_DIM_MULTIPLE, BlockedAttention, attention_program, check_attention_args,
                                              from_rows, masked_softmax_ref, merge_partials, run_blocked_attention,
                                              to_rows, visible_mask)


from pallas_kernels.hopper import mma_dtype, pad_last, pad_to, round_up, target_device_kind


def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    sinks: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Attention of the last T positions over S keys in plain jnp (what the engine runs on CPU).

    q [B, T, Hq, D]; k, v [B, S, Hkv, D]; sinks [Hq] or None; scale None means 1/sqrt(D).
    Returns [B, T, Hq, D] in q.dtype.
    """
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    check_attention_args(hq, hkv, sliding_window, sinks)
    if t > s_len:
        raise ValueError(f"more queries ({t}) than keys ({s_len})")
    scale = d**-0.5 if scale is None else scale
    q_btkgd = q.reshape(b, t, hkv, hq // hkv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k, preferred_element_type=jnp.float32) * scale
    q_pos = jnp.arange(t)[:, None] + (s_len - t)  # [T, 1]
    k_pos = jnp.arange(s_len)[None, :]  # [1, S]
    mask = visible_mask(q_pos, k_pos, causal, sliding_window)
    sinks_kg = None if sinks is None else sinks.astype(jnp.float32).reshape(hkv, hq // hkv)
    p = masked_softmax_ref(s, mask, sinks_kg)  # [B, Hkv, G, T, S]
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    return o.reshape(b, t, hq, d).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class FlashAttentionConfig:
    """Block sizes: block_rows (query rows x heads) per program, block_kv keys per step; with
    warp_specialized, the FA3-style body (warp_specialized_attention.py: 2 x 64 rows)."""

    block_rows: int = 128
    block_kv: int = 64  # 128 x 128 with head_dim 128 overflows the 227 KiB of SMEM (one warpgroup)
    warp_specialized: bool = False

    def __post_init__(self):
        if self.block_rows % 64 or self.block_kv % 64:
            raise ValueError(f"block_rows and block_kv must be multiples of 64 (wgmma): {self}")
        if self.warp_specialized and self.block_rows != ws.PROGRAM_ROWS:
            raise ValueError(f"the warp-specialized body takes block_rows={ws.PROGRAM_ROWS}: {self}")


def flash_attention_config(device_kind: str, head_dim: int = 128) -> FlashAttentionConfig:
    """The frozen block sizes per device kind (H100 and H200 share them; CPU interprets them).

    On Hopper the warp-specialized body: 2 consumers x 64 rows, block_kv 128 up to head_dim 128
    (FA3's tile; a 2-slot ring, 160 KiB of SMEM) and 64 above (DeepSeek-V3's 192: 160 KiB).
    Elsewhere the one-warpgroup body, whose 128-row tile at head_dim 192 would need 259 KiB and
    2 x 192 accumulator registers per thread: 64 rows there.
    """
    if "H200" in device_kind or "H100" in device_kind:
        return FlashAttentionConfig(block_rows=ws.PROGRAM_ROWS, block_kv=128 if head_dim <= 128 else 64,
                                    warp_specialized=True)
    return FlashAttentionConfig(block_rows=128 if head_dim <= 128 else 64)


def _flash_body(q_ref, k_ref, v_ref, o_ref, lse_ref, *scratch, st: BlockedAttention, kv_len: int,
                program: Callable = attention_program):
    """Contiguous KV: block blk of batch b, KV head h is k[b, blk*block_kv : +block_kv, h]."""
    b, h = lax.axis_index("batch"), lax.axis_index("kv_head")

    def load_kv(blk, slot, k_smem, v_smem, k_bars, v_bars):
        keys = (b, pl.ds(blk * st.block_kv, st.block_kv), h)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_bars.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_bars.at[slot])

    program(q_ref, o_ref, lse_ref, scratch, load_kv=load_kv, length=jnp.int32(kv_len), st=st)


def flash_attention_kernel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    sinks: jax.Array | None = None,
    scale: float | None = None,
    interpret: Any = None,
    config: FlashAttentionConfig | None = None,
) -> jax.Array:
    """Prefill attention on the Mosaic GPU kernel (same contract as flash_attention_reference).

    interpret: None to compile for the GPU, or plgpu.InterpretGPUParams to interpret on CPU.
    Multiplies in mma_dtype with f32 softmax. Keys are zero-padded to whole KV blocks (the mask
    hides them) and head_dim to a multiple of 64 (a copy; real models have 64 or 128).
    """
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    check_attention_args(hq, hkv, sliding_window, sinks)
    if t > s_len:
        raise ValueError(f"more queries ({t}) than keys ({s_len})")
    dtype = mma_dtype(q.dtype, interpret)
    q_pad = pad_last(q.astype(dtype), HEAD_DIM_MULTIPLE)
    config = config or flash_attention_config(target_device_kind(), q_pad.shape[-1])
    st = BlockedAttention(
        q_len=t,
        group=hq // hkv,
        block_rows=config.block_rows,
        block_kv=config.block_kv,
        num_splits=1,
        scale=d**-0.5 if scale is None else scale,
        window=sliding_window,
        causal=causal,
        dtype=dtype,
    )
    kv_shape = (b, round_up(s_len, config.block_kv), hkv, q_pad.shape[-1])
    k, v = (pad_to(x.astype(dtype), kv_shape) for x in (k, v))
    body, q_rows = functools.partial(_flash_body, st=st, kv_len=s_len), to_rows(q_pad, hkv, config.block_rows)
    if config.warp_specialized:
        stages = ws.ws_stages(config.block_kv, q_pad.shape[-1], jnp.dtype(dtype).itemsize)
        o_part, lse = ws.run_ws_attention(body, q_rows, (k, v), st, 1, stages, "flash_attention", interpret)
    else:
        o_part, lse = run_blocked_attention(body, q_rows, (k, v), st, 1, "flash_attention", interpret)
    out = from_rows(merge_partials(o_part, lse, sinks), q_pad.shape)
    return out[..., :d].astype(q.dtype)
