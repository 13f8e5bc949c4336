"""MXFP4 (W4A16) grouped GEMM: the bit-arithmetic dequantization vs the e2m1 table, the group-start
tile schedule, the kernel in interpret mode (race-checked) vs float64, and cross-lowering for the
H100 at gpt-oss-120b's shapes (the packed experts go into the kernel as they are)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import mxfp4_grouped_matmul as mx
from pallas_kernels.quantized import FP4_E2M1_VALUES, QuantizedWeight
from test_kernel_lowering import mosaic_calls, ops_named, race_checked_interpret, sds, tensor_type, abstract_h100

U8 = jnp.uint8


def e2m1_f64(codes: np.ndarray) -> np.ndarray:
    return FP4_E2M1_VALUES[codes].astype(np.float64)


def test_dequantize_nibbles_is_exact_for_every_code_and_scale():
    """Every byte (both nibbles: all 16 codes, in either position) times every e8m0 scale 2..252 is
    bit-exact against the e2m1 table (on CPU, whose XLA flushes subnormals: the formula has none);
    bytes 0 and 1 (2**-127, 2**-126) give at most 6 * 2**-126 off; no NaN or inf anywhere below 253."""
    packed = jnp.arange(256, dtype=jnp.uint16)[:, None]  # [256 bytes, 1]
    scales = jnp.arange(253, dtype=U8)[None, :]  # [1, 253 scale bytes]
    scale = mx.e8m0_to_bf16(scales)
    want_scale = np.ldexp(1.0, np.arange(253) - 127)[None, :]
    for nibble in (0, 1):
        got = np.asarray(jax.jit(mx.dequantize_nibbles, static_argnums=1)(packed, nibble, scale), np.float64)
        want = e2m1_f64((np.arange(256) >> 4 * nibble) & 0xF)[:, None] * want_scale
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got[:, 2:], want[:, 2:])
        assert np.abs(got[:, :2] - want[:, :2]).max() <= 6 * 2.0**-126
        # -0.0 codes keep their sign: the bits match too, not just the values.
        np.testing.assert_array_equal(np.signbit(got[:, 2:]), np.signbit(want[:, 2:]))


def test_permute_k_matches_the_nibble_order():
    """permute_k puts each K block's even columns (the low nibbles' values) first."""
    x = jnp.arange(2 * 128).reshape(2, 128)
    got = np.asarray(mx.permute_k(x, 64))
    block = np.concatenate([np.arange(0, 64, 2), np.arange(1, 64, 2)])
    np.testing.assert_array_equal(got[0], np.concatenate([block, 64 + block]))


def test_group_tile_schedule_covers_each_row_once_and_small_groups_once():
    sizes, start, m, block_m = jnp.asarray([5, 0, 70, 1, 0, 60, 16]), jnp.int32(3), 160, 16
    group, lo, hi = map(np.asarray, mx.group_tile_schedule(sizes, start, m, block_m))
    assert len(group) == -(-m // block_m) + len(sizes) - 1
    owner = np.full(m, -1)
    for g, a, e in zip(group, lo, hi):
        assert e <= a or e - a <= block_m
        assert (owner[a:e] == -1).all()
        owner[a:e] = g
    want = np.full(m, -1)
    want[3:155] = np.repeat(np.arange(7), [5, 0, 70, 1, 0, 60, 16])
    np.testing.assert_array_equal(owner, want)
    # A group of <= block_m rows is one tile (its weights are streamed once), wherever it starts.
    used = hi > lo
    assert np.bincount(group[used], minlength=7).tolist() == [1, 0, 5, 1, 0, 4, 1]


def random_mxfp4(seed: int, experts: int, n: int, k: int, scale_lo: int, scale_hi: int) -> QuantizedWeight:
    """Random packed codes (every byte value, so all 16 codes in both nibbles) and e8m0 scales."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 256, (experts, n, k // 2), dtype=np.uint8)
    values.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
    scales = rng.integers(scale_lo, scale_hi + 1, (experts, n, k // 32)).astype(np.uint8)
    return QuantizedWeight(jnp.asarray(values), jnp.asarray(scales), "mxfp4")


def grouped_f64(lhs, rhs: QuantizedWeight, sizes, group_offset=0) -> np.ndarray:
    """Float64 reference: rhs.dequantize in f32 (exact: MXFP4 x 2**(s-127) fits f32 for the scales
    used), one group at a time; rows of other groups and padding rows stay zero."""
    dense = np.asarray(rhs.dequantize(jnp.float32), np.float64)  # [G, K, N]
    lhs = np.asarray(lhs, np.float64)
    out = np.zeros((lhs.shape[0], dense.shape[2]))
    ends = np.cumsum(sizes)
    for g in range(dense.shape[0]):
        end = ends[group_offset + g]
        out[end - sizes[group_offset + g]:end] = lhs[end - sizes[group_offset + g]:end] @ dense[g]
    return out


def assert_close_per_group(got, want, sizes, local=None, tol=2e-2):
    """|got - want| <= tol * max|want| over each local group's rows (groups' magnitudes may differ by
    2**100); rows of other groups (another shard's) and padding rows exactly zero."""
    got = np.asarray(got, np.float64)
    assert not np.isnan(got).any()
    ends = np.cumsum(sizes)
    for g, (end, size) in enumerate(zip(ends, sizes)):
        rows = slice(end - size, end)
        if local is not None and g not in local:
            np.testing.assert_array_equal(got[rows], 0.0)
            continue
        scale = max(np.abs(want[rows]).max(initial=0.0), 1e-300)
        err = np.abs(got[rows] - want[rows]).max(initial=0.0) / scale
        assert err <= tol, f"rows {rows}: max error {err:.3g} of max |ref| (tolerance {tol})"
    np.testing.assert_array_equal(got[ends[-1]:], 0.0)  # padding rows


TILES = mx.Mxfp4GroupedMatmulConfig(block_m=16, block_n=64, block_k=64, stages=2, num_sms=3)

# name: (M, K, N, group_sizes, experts held, group_offset, config, scale bytes): an empty group,
# padding rows, a group spanning two row tiles, 3 "SMs" walking several items each (the ring and
# the scale slabs carry across items), N an odd number of 64-row halves (the last column tile's
# second consumer reads the TMA's zeros), an expert-parallel shard, K = 96 = 3 blocks of 32 (K off a
# multiple of 64, as gpt-oss' 2880 is off 128), a 4-deep ring and 32-token tiles.
KERNEL_CASES = {
    "ragged_empty_group_padding": (40, 128, 128, [15, 0, 20], None, 0, TILES, (110, 140)),
    "odd_column_halves_one_k_step": (24, 64, 192, [7, 12, 0], None, 0, TILES, (100, 150)),
    "expert_shard_with_offset": (48, 128, 64, [6, 10, 0, 14, 9], 2, 2, TILES, (120, 135)),
    "k96_blocks_of_32": (32, 96, 128, [9, 0, 17], None, 0,
                         mx.Mxfp4GroupedMatmulConfig(block_m=32, block_n=128, block_k=32, stages=4, num_sms=2),
                         (115, 140)),
}


def run_case(name, **kwargs):
    m, k, n, sizes, held, offset, config, (lo, hi) = KERNEL_CASES[name]
    rhs = random_mxfp4(len(name), held or len(sizes), n, k, lo, hi)
    lhs = jax.random.normal(jax.random.key(len(name)), (m, k), jnp.bfloat16)
    with race_checked_interpret() as params:
        got = mx.mxfp4_grouped_matmul_kernel(lhs, rhs, jnp.asarray(sizes, jnp.int32), group_offset=offset,
                                             interpret=params, config=config, **kwargs)
    assert got.dtype == jnp.bfloat16 and got.shape == (m, n)
    return np.asarray(got, np.float64), grouped_f64(lhs, rhs, sizes, offset), sizes


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_interpret_matches_float64(name):
    got, want, sizes = run_case(name)
    _, _, _, _, held, offset, *_ = KERNEL_CASES[name]
    assert_close_per_group(got, want, sizes, local=range(offset, offset + (held or len(sizes))))


@pytest.mark.slow
def test_kernel_interpret_extreme_scales():
    """Scale bytes 0..252: expert 0's weights scaled 2**53..2**125 with activations 2**-100, expert 2's
    2**-127..2**-67 (byte 0 among them) with activations 2**90: both in f32's range, each checked
    against its own magnitude."""
    sizes, (m, k, n) = [16, 0, 16], (40, 128, 64)
    rhs = random_mxfp4(7, 3, n, k, 180, 252)
    low = np.random.default_rng(8).integers(2, 61, (n, k // 32)).astype(np.uint8)
    low[::5, 1] = 0
    scales = rhs.scales.at[0, :3].set(252).at[2].set(low)
    rhs = QuantizedWeight(rhs.values, scales, "mxfp4")
    lhs = jax.random.normal(jax.random.key(9), (m, k), jnp.float32)
    lhs = (lhs * jnp.where(jnp.arange(m) < 16, 2.0**-100, 2.0**90)[:, None]).astype(jnp.bfloat16)
    with race_checked_interpret() as params:
        got = mx.mxfp4_grouped_matmul_kernel(lhs, rhs, jnp.asarray(sizes, jnp.int32), interpret=params, config=TILES)
    assert_close_per_group(got, grouped_f64(lhs, rhs, sizes), sizes)


@pytest.mark.slow
def test_wrong_nibble_order_fails_the_comparison():
    """The check has teeth: decoding the high nibble as the even k is caught."""
    got, want, sizes = run_case("ragged_empty_group_padding", _high_nibble_first=True)
    with pytest.raises(AssertionError, match="max error"):
        assert_close_per_group(got, want, sizes)


def test_reference_is_the_dequantized_grouped_matmul():
    rhs = random_mxfp4(3, 2, 64, 64, 120, 130)
    lhs = jax.random.normal(jax.random.key(3), (10, 64), jnp.float32)
    got = mx.mxfp4_grouped_matmul_reference(lhs, rhs, jnp.asarray([4, 5], jnp.int32))
    np.testing.assert_allclose(np.asarray(got), grouped_f64(lhs, rhs, [4, 5]), rtol=1e-4, atol=1e-3)


def test_bad_arguments():
    rhs = random_mxfp4(3, 2, 64, 64, 120, 130)
    lhs = jnp.zeros((8, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"K=64"):
        mx.mxfp4_grouped_matmul_kernel(lhs[:, :32], rhs, jnp.asarray([4, 4], jnp.int32))
    with pytest.raises(ValueError, match="mxfp4"):
        mx.mxfp4_grouped_matmul_kernel(lhs, QuantizedWeight(rhs.values, rhs.scales, "fp8_block"),
                                       jnp.asarray([4, 4], jnp.int32))
    with pytest.raises(ValueError, match="block_n"):
        mx.Mxfp4GroupedMatmulConfig(block_n=96)


# name: (M rows = tokens x top-4, N, experts held, config name): gpt-oss-120b's experts (K = 2880:
# 45 blocks of 64, 90 scale bytes a row): decode (64 tokens) and prefill (8192 tokens), the fused
# gate_up (N = 5760) and down (N = 2880) projections, and an expert-parallel shard of 16 experts.
GPT_OSS_SHAPES = {
    "decode_gate_up": (64 * 4, 5760, 128, "m16_n64_k64_st12"),
    "decode_down": (64 * 4, 2880, 128, "m16_n64_k64_st12"),
    "prefill_gate_up": (8192 * 4, 5760, 128, "m256_n64_k64_st3"),
    "prefill_down_ep8_shard": (8192 * 4, 2880, 16, "m256_n64_k64_st3"),
}


@pytest.mark.parametrize("name", list(GPT_OSS_SHAPES))
def test_lowers_for_h100_reading_the_packed_experts_in_place(name):
    """One persistent launch (a producer and two consumer warpgroups per SM) takes the packed
    values [G, N, 1440] exactly as stored and the scales through a free reshape to 16-byte rows
    ([G, N / 8, 45, 16]); nothing converts or pads either."""
    m, n, held, tiles = GPT_OSS_SHAPES[name]
    values, scales = sds((held, n, 1440), U8), sds((held, n, 90), U8)
    args = (sds((m, 2880)), QuantizedWeight(values, scales, "mxfp4"), sds((128,), jnp.int32), sds((), jnp.int32))
    f = lambda lhs, rhs, sizes, offset: mx.mxfp4_grouped_matmul_kernel(lhs, rhs, sizes, group_offset=offset)  # noqa: E731
    [call] = mosaic_calls(f, *args)
    assert call.name == f"mxfp4_grouped_matmul_{tiles}"
    assert call.operands[3:] == (tensor_type((m, 2880)), tensor_type((held, n, 1440), U8),
                                 tensor_type((held, n // 8, 45, 16), U8))
    assert call.results == (tensor_type((m, n)),)
    assert call.grid == (132, 1, 1) and call.threads == 3 * 128
    assert call.smem_bytes <= mx.SMEM_LIMIT
    with abstract_h100():
        module = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    weights = {tensor_type(values.shape, U8), tensor_type(scales.shape, U8)}
    copies = [op for name in ("stablehlo.convert", "stablehlo.pad", "stablehlo.concatenate")
              for op in ops_named(module, name) if str(op.operands[0].type) in weights]
    assert not copies
