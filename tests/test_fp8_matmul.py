"""W8A8 block-scaled FP8 GEMMs: references vs float64, the kernels in race-checked interpret mode
(dense and grouped: partial K and N blocks, decode rows, empty groups, padding rows, an expert
shard), a wrong kernel variant caught, and cross-lowering for an H100 (the weight passed in place).

Every comparison is against float64 NumPy on the same quantized operands
(dequantize_activations_fp8(x_q, s) @ w.dequantize()): e4m3 products are exact in f32, so the
kernels differ from it only by f32 summation order and the bf16 output rounding (rtol 2^-8 per
element plus 1e-3 of max|ref|).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import fp8_matmul as f8
from pallas_kernels.quantized import (FP8_BLOCK, FP8_MAX, QuantizedWeight, dequantize_activations_fp8,
                                      quantize_activations_fp8)
from pallas_kernels.testing import grouped_np
from test_kernel_lowering import mma_to_release, mosaic_calls, race_checked_interpret, sds, tensor_type

E4M3 = jnp.float8_e4m3fn
F32 = jnp.float32
SMEM_LIMIT = 232_448


def random_fp8_weight(key, lead: tuple[int, ...], n: int, k: int, spread: float = 8.0) -> QuantizedWeight:
    """e4m3 values over the whole range (+-448) and block scales e^U(-spread, spread): a scale
    block read for the wrong one is off by a large factor."""
    kv, ks = jax.random.split(key)
    values = jnp.clip(jax.random.normal(kv, (*lead, n, k)) * 120, -FP8_MAX, FP8_MAX).astype(E4M3)
    scales = jnp.exp(jax.random.uniform(ks, (*lead, -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)), F32, -spread, spread))
    return QuantizedWeight(values, scales, "fp8_block")


def random_activations(key, m: int, k: int) -> jax.Array:
    """bf16 [M, K] whose 128-wide groups range over e^-6 .. e^6 in magnitude, with one group of
    zeros (the 1e-4 scale floor) and large values (3e4: the per-group cast must saturate, not NaN)."""
    kx, kg = jax.random.split(key)
    groups = -(-k // FP8_BLOCK)
    magnitude = jnp.repeat(jnp.exp(jax.random.uniform(kg, (m, groups), F32, -6.0, 6.0)), FP8_BLOCK, axis=1)[:, :k]
    x = jax.random.normal(kx, (m, k)) * magnitude
    x = x.at[0, :min(k, FP8_BLOCK)].set(0.0)
    x = x.at[-1, -1].set(3e4)
    return x.astype(jnp.bfloat16)


def dense_f64(x, w: QuantizedWeight) -> np.ndarray:
    """The W8A8 product in float64 on the quantized operands: [M, N]."""
    x_q, x_s = quantize_activations_fp8(x)
    a = np.asarray(dequantize_activations_fp8(x_q, x_s), np.float64)
    return a @ np.asarray(w.dequantize(F32), np.float64)


def grouped_f64(x, w: QuantizedWeight, group_sizes, group_offset: int = 0) -> np.ndarray:
    """Grouped W8A8 in float64: group g's rows times w[g - group_offset]; other rows zero."""
    x_q, x_s = quantize_activations_fp8(x)
    return grouped_np(dequantize_activations_fp8(x_q, x_s), w.dequantize(F32), np.asarray(group_sizes), group_offset)


def assert_matches(got, want: np.ndarray) -> None:
    """bf16 output: each element within its bf16 rounding (2^-8) plus 1e-3 of max|want|; finite."""
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2.0**-8, atol=1e-3 * np.abs(want).max())


# ----------------------------------------------------------------------------------------------
# References and configs (fast)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(5, 320, 192), (64, 256, 576)])
def test_dense_reference_matches_float64(m, k, n):
    kx, kw = jax.random.split(jax.random.key(m))
    x, w = random_activations(kx, m, k), random_fp8_weight(kw, (), n, k)
    got = f8.fp8_block_matmul_reference(x, w)
    assert got.dtype == jnp.bfloat16
    assert_matches(got, dense_f64(x, w))


def test_grouped_reference_matches_float64_with_an_expert_shard():
    sizes = [13, 40, 0, 30, 9]
    kx, kw = jax.random.split(jax.random.key(3))
    x, w = random_activations(kx, 100, 256), random_fp8_weight(kw, (2,), 192, 256)
    got = jax.jit(f8.fp8_block_grouped_matmul_reference)(x, w, jnp.asarray(sizes, jnp.int32),
                                                         group_offset=jnp.int32(1))
    assert_matches(got, grouped_f64(x, w, sizes, group_offset=1))


def test_decode_configs_split_k_to_fill_the_sms():
    """Dense decode at DeepSeek-V3 shapes: the fewest K splits giving >= 66 of 132 SMs work."""
    cases = {"q_a": (7168, 1536, 7), "kv_a": (7168, 576, 14), "o_proj": (16384, 7168, 2), "q_b": (1536, 24576, 1)}
    for name, (k, n, splits) in cases.items():
        cfg = f8.fp8_matmul_config("NVIDIA H200", 64, n, k, num_sms=132)
        assert (cfg.split, cfg.block_n, cfg.k_splits) == ("n", 64, splits), name
    assert f8.fp8_matmul_config("NVIDIA H200", 4096, 1536, 7168).split == "m"
    assert f8.fp8_matmul_config("NVIDIA H200", 64 * 8, 4096, 7168, groups=32).k_splits == 1


def test_bad_arguments_are_refused():
    x = jnp.zeros((4, 200), jnp.bfloat16)
    with pytest.raises(ValueError, match="K % 16"):  # 200: TMA row strides need 16 bytes
        f8.fp8_block_matmul_kernel(x, random_fp8_weight(jax.random.key(0), (), 64, 200))
    with pytest.raises(ValueError, match="contracting"):
        f8.fp8_block_matmul_kernel(x, random_fp8_weight(jax.random.key(0), (), 64, 256))
    with pytest.raises(ValueError, match="block_n"):
        f8.Fp8MatmulConfig(block_n=256)
    with pytest.raises(ValueError, match="divide"):
        f8.fp8_block_matmul_kernel(jnp.zeros((4, 384), jnp.bfloat16),
                                   random_fp8_weight(jax.random.key(0), (), 64, 384),
                                   config=f8.Fp8MatmulConfig(k_splits=2))


# ----------------------------------------------------------------------------------------------
# Kernels in interpret mode (race detection on). Few programs (num_sms) so that each walks several
# work items: the producer runs into the next item while the consumers store the last one.
# ----------------------------------------------------------------------------------------------


def cfg(split="m", block_n=128, k_splits=1, stages=2):
    return f8.Fp8MatmulConfig(block_n=block_n, split=split, max_concurrent_steps=stages, k_splits=k_splits, num_sms=3)


# (M, K, N, config): decode rows (1, 17, 64), prefill rows over several tiles, K = 320 (the last
# scale block 64 wide: TMA's zero fill), N = 192 (1.5 scale blocks: the last tile half past N),
# K splits whose partials the wrapper sums.
DENSE_CASES = {
    "one_row_partial_k": (1, 320, 128, cfg("n", 64)),
    "decode_partial_n": (17, 256, 192, cfg("n", 128)),
    "decode_split_k": (64, 512, 192, cfg("n", 64, k_splits=2)),
    "split_k_partial_k": (17, 320, 128, cfg("n", 64, k_splits=3)),
    "prefill_partial_k_n": (130, 320, 192, cfg("m", 128, stages=3)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_dense_kernel_interpret_matches_float64(name):
    m, k, n, config = DENSE_CASES[name]
    kx, kw = jax.random.split(jax.random.key(len(name)))
    x, w = random_activations(kx, m, k), random_fp8_weight(kw, (), n, k)
    with race_checked_interpret() as params:
        got = f8.fp8_block_matmul_kernel(x, w, interpret=params, config=config)
        got = np.asarray(got.astype(F32))
    assert_matches(got, dense_f64(x, w))


# (M, K, N, group_sizes, local groups, group_offset, config): empty groups (first, middle, last),
# groups straddling row tiles, padding rows past sum(group_sizes), an expert shard that starts
# mid-tile (its other rows zero), decode-sized groups with a one-row group.
GROUPED_CASES = {
    "ragged_empty_groups_padding": (100, 320, 192, [0, 30, 0, 50, 7, 0], None, 0, cfg("m", 64, stages=3)),
    "expert_shard_mid_tile": (100, 256, 128, [13, 40, 0, 30, 9], 2, 1, cfg("m", 128)),
    "decode_rows_per_group": (17, 128, 192, [1, 0, 16], None, 0, cfg("n", 128)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GROUPED_CASES))
def test_grouped_kernel_interpret_matches_float64(name):
    m, k, n, sizes, local, offset, config = GROUPED_CASES[name]
    kx, kw = jax.random.split(jax.random.key(len(name)))
    x, w = random_activations(kx, m, k), random_fp8_weight(kw, (local or len(sizes),), n, k)
    with race_checked_interpret() as params:
        got = f8.fp8_block_grouped_matmul_kernel(x, w, jnp.asarray(sizes, jnp.int32), group_offset=offset,
                                                 interpret=params, config=config)
        got = np.asarray(got.astype(F32))
    assert_matches(got, grouped_f64(x, w, sizes, offset))


WRONG_SCALES = {
    "first_n_block": lambda ws_ref, nb, kb: ws_ref[0, kb],  # every column tile scaled as N block 0
    "first_k_block": lambda ws_ref, nb, kb: ws_ref[nb, 0],  # the promotion's K block ignored
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(WRONG_SCALES))
def test_a_wrong_weight_scale_fails_the_comparison(variant, monkeypatch):
    """The comparison is sharp enough to catch a scale read from the wrong block."""
    monkeypatch.setattr(f8, "_weight_scale", WRONG_SCALES[variant])
    m, k, n, config = DENSE_CASES["decode_partial_n"]
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = random_activations(kx, m, k), random_fp8_weight(kw, (), n, k)
    with race_checked_interpret() as params:
        got = np.asarray(f8.fp8_block_matmul_kernel(x, w, interpret=params, config=config).astype(F32))
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_matches(got, dense_f64(x, w))


# ----------------------------------------------------------------------------------------------
# Cross-lowering for an H100 (CPU jaxlib): Mosaic's SMEM, wgmma and TMA checks at DeepSeek-V3 shapes
# ----------------------------------------------------------------------------------------------


def weight_args(lead: tuple[int, ...], n: int, k: int) -> QuantizedWeight:
    return QuantizedWeight(sds((*lead, n, k), E4M3), sds((*lead, -(-n // 128), -(-k // 128)), F32), "fp8_block")


# name: (M, K, N, kernel name, a consumer's wgmma)
DENSE_SHAPES = {
    "q_a_decode": (64, 7168, 1536, "fp8_block_matmul_n64x128_st8_ks7", "m64n64k32.f32.e4m3.e4m3"),
    "kv_a_decode": (64, 7168, 576, "fp8_block_matmul_n64x128_st4_ks14", "m64n64k32.f32.e4m3.e4m3"),
    "o_proj_prefill": (4096, 16384, 7168, "fp8_block_matmul_m128x128_st6_ks1", "m64n128k32.f32.e4m3.e4m3"),
}


@pytest.mark.parametrize("name", list(DENSE_SHAPES))
def test_dense_kernel_lowers_for_h100_with_the_weight_in_place(name):
    """One program (a TMA producer and two consumer warpgroups) per SM; the e4m3 weight [N, K] and
    its scales [NB, KB] go into the custom call as stored; the output is [S, M, N] (f32 partials
    when K is split). Each step's wgmmas (e4m3 x e4m3 -> f32) are waited for (wait_group 0: the
    accumulator read before the promotion) before the arrival that frees their operand slots."""
    m, k, n, kernel, wgmma = DENSE_SHAPES[name]
    [call] = mosaic_calls(f8.fp8_block_matmul_kernel, sds((m, k)), weight_args((), n, k))
    assert call.name == kernel
    assert call.operands[-2:] == (tensor_type((n, k), E4M3), tensor_type((-(-n // 128), k // 128), F32))
    splits = int(kernel.rsplit("ks", 1)[1])
    assert call.results == (tensor_type((splits, m, n), F32 if splits > 1 else jnp.bfloat16),)
    assert call.grid == (132, 1, 1) and call.threads == 3 * 128 and call.smem_bytes <= SMEM_LIMIT
    assert f"wgmma.mma_async.sync.aligned.{wgmma}" in call.module
    assert mma_to_release(call.module, "mbarrier.arrive.release") == ["0"]


def test_grouped_kernel_lowers_for_h100_with_the_experts_in_place():
    """An expert-parallel shard (32 of 256 experts, gate and up fused: N = 4096) at prefill."""
    m, k, n, local = 4096 * 8, 7168, 4096, 32
    f = lambda x, w, sizes, offset: f8.fp8_block_grouped_matmul_kernel(x, w, sizes, group_offset=offset)  # noqa: E731
    [call] = mosaic_calls(f, sds((m, k)), weight_args((local,), n, k), sds((256,), jnp.int32), sds((), jnp.int32))
    assert call.name == "fp8_block_grouped_matmul_m128x128_st6_ks1"
    assert call.operands[-2:] == (tensor_type((local, n, k), E4M3), tensor_type((local, n // 128, k // 128), F32))
    assert call.results == (tensor_type((1, m, n)),)
    assert call.grid == (132, 1, 1) and call.smem_bytes <= SMEM_LIMIT
