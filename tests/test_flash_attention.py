"""Flash (prefill) attention: the jnp reference vs float64 NumPy, ops dispatch, interpret mode."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import blocked_attention as ba
from pallas_kernels import flash_attention as fa
from pallas_kernels import ops
from pallas_kernels import warp_specialized_attention as ws
from pallas_kernels.testing import flash_np, random_qkv
from test_kernel_lowering import kernel_tolerance, race_checked_interpret


# (B, T, S, Hq, Hkv, D, causal, window, sinks): GQA 1/4/8, T < S and T == S, window edges.
REFERENCE_CASES = [
    (2, 7, 7, 4, 4, 16, True, None, False),
    (1, 5, 19, 8, 2, 32, True, None, True),
    (3, 9, 9, 8, 1, 8, True, 1, False),
    (2, 6, 13, 4, 1, 16, True, 4, True),
    (1, 11, 11, 2, 2, 16, True, 11, False),
    (1, 4, 10, 4, 4, 16, False, None, False),
    (2, 1, 17, 16, 2, 64, True, 5, True),
]


@pytest.mark.parametrize("seed,case", list(enumerate(REFERENCE_CASES)))
def test_reference_matches_float64(seed, case):
    b, t, s, hq, hkv, d, causal, window, with_sinks = case
    q, k, v, sinks = random_qkv(seed, b, t, s, hq, hkv, d, with_sinks=with_sinks)
    got = fa.flash_attention_reference(q, k, v, causal=causal, sliding_window=window, sinks=sinks)
    want = flash_np(q, k, v, causal, window, sinks, None)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_reference_bf16_keeps_dtype_and_custom_scale():
    q, k, v, sinks = random_qkv(3, 2, 8, 12, 8, 2, 64, jnp.bfloat16, with_sinks=True)
    got = fa.flash_attention_reference(q, k, v, sinks=sinks, scale=0.3)
    assert got.dtype == jnp.bfloat16
    want = flash_np(q, k, v, True, None, sinks, 0.3)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=2e-2)


def test_ops_xla_matches_reference_under_jit():
    q, k, v, sinks = random_qkv(5, 1, 6, 10, 4, 2, 16, with_sinks=True)
    f = jax.jit(lambda q, k, v, s: ops.flash_attention(q, k, v, sliding_window=3, sinks=s, impl="xla"))
    want = flash_np(q, k, v, True, 3, sinks, None)
    np.testing.assert_allclose(np.asarray(f(q, k, v, sinks)), want, atol=2e-5, rtol=2e-5)


def test_auto_is_cpu_on_cpu_and_unknown_impl_raises():
    assert ops.resolve_impl("auto") == "cpu"  # flash attention has no C++ kernel: "cpu" runs the reference
    q, k, v, _ = random_qkv(0, 1, 2, 2, 2, 2, 8)
    np.testing.assert_array_equal(np.asarray(ops.flash_attention(q, k, v, impl="cpu")),
                                  np.asarray(fa.flash_attention_reference(q, k, v)))
    with pytest.raises(ValueError, match="'triton'"):
        ops.flash_attention(q, k, v, impl="triton")


def test_bad_arguments_raise():
    q, k, v, _ = random_qkv(0, 1, 4, 2, 3, 2, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        fa.flash_attention_reference(q, k, v)
    q, k, v, _ = random_qkv(0, 1, 4, 2, 2, 2, 8)
    with pytest.raises(ValueError, match="more queries"):
        fa.flash_attention_reference(q, k, v)


SMALL_BLOCKS = fa.FlashAttentionConfig(block_rows=64, block_kv=64)

# (B, T, S, Hq, Hkv, D, causal, window, sinks, dtype): several row tiles and KV blocks, T < S,
# S not a multiple of block_kv, GQA 1/4/8, a window cutting through blocks, sinks.
KERNEL_CASES = {
    "gqa4_chunk_after_context_sinks": (1, 40, 150, 8, 2, 64, True, None, True, jnp.bfloat16),
    "gqa1_window_multi_block": (2, 100, 100, 2, 2, 64, True, 30, False, jnp.bfloat16),
    "gqa8_f16_window_sinks": (1, 24, 130, 8, 1, 64, True, 70, True, jnp.float16),
    "f32_noncausal_head_dim_128": (1, 20, 70, 4, 4, 128, False, None, False, jnp.float32),
    "f32_tiny_llama_head_dim_16": (2, 9, 9, 4, 2, 16, True, None, True, jnp.float32),
}


WARP_SPECIALIZED = fa.FlashAttentionConfig(block_rows=128, block_kv=64, warp_specialized=True)
# The FA3-style body, two consumer warpgroups x 64 rows: a tile whose second consumer holds only
# padding rows, two tiles, a window that leaves interior (unmasked) blocks between masked ones.
WS_CASES = {
    "ws_gqa4_two_tiles_sinks": (1, 40, 150, 8, 2, 64, True, None, True, jnp.bfloat16),
    "ws_gqa1_window_interior_blocks": (1, 60, 300, 2, 2, 64, True, 150, False, jnp.bfloat16),
    "ws_f32_noncausal_head_dim_128": (1, 20, 140, 4, 4, 128, False, None, False, jnp.float32),
}
KERNEL_RUNS = {**{n: (c, SMALL_BLOCKS) for n, c in KERNEL_CASES.items()},
               **{n: (c, WARP_SPECIALIZED) for n, c in WS_CASES.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KERNEL_RUNS))
def test_kernel_interpret_matches_float64(name):
    """Both bodies (one warpgroup; producer + two ping-ponging consumers) vs float64, races checked."""
    (b, t, s, hq, hkv, d, causal, window, with_sinks, dtype), config = KERNEL_RUNS[name]
    q, k, v, sinks = random_qkv(len(name), b, t, s, hq, hkv, d, dtype, with_sinks)
    with race_checked_interpret() as params:
        got = fa.flash_attention_kernel(
            q, k, v, causal=causal, sliding_window=window, sinks=sinks, interpret=params, config=config
        )
    assert got.dtype == dtype
    want = flash_np(q, k, v, causal, window, sinks, None)
    tol = kernel_tolerance(dtype, params)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol, rtol=tol)


def test_warp_specialized_interior_blocks():
    """Blocks every row of a consumer sees whole: exactly those skip the mask."""
    st = ba.BlockedAttention(q_len=64, group=2, block_rows=128, block_kv=16, num_splits=1, scale=1.0,
                             window=40, causal=True, dtype=jnp.float32)
    length = 200
    for row0 in (0, 64):
        lo, hi = (int(x) for x in ws.interior_blocks(jnp.int32(length), jnp.int32(row0), st))
        q_pos = length - st.q_len + (row0 + np.arange(64)) // st.group
        k_pos = np.arange(length)
        seen = (k_pos[None] <= q_pos[:, None]) & (k_pos[None] > q_pos[:, None] - st.window)
        whole = [blk for blk in range(-(-length // 16)) if (blk + 1) * 16 <= length and seen[:, blk * 16:(blk + 1) * 16].all()]
        assert whole == list(range(lo, hi)), (row0, whole, lo, hi)


@pytest.mark.slow
@pytest.mark.interpret_only
def test_ops_interpret_matches_xla():
    q, k, v, sinks = random_qkv(13, 1, 16, 32, 4, 1, 64, jnp.bfloat16, with_sinks=True)
    with race_checked_interpret():
        got = ops.flash_attention(q, k, v, sinks=sinks, impl="interpret")
    want = ops.flash_attention(q, k, v, sinks=sinks, impl="xla")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)
