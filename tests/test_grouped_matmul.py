"""Grouped matmul: the jnp reference vs float64 NumPy, expert-parallel offsets, interpret mode."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import grouped_matmul as gmm
from pallas_kernels import ops
from pallas_kernels.testing import grouped_np, random_gmm
from test_kernel_lowering import race_checked_interpret


# (M, K, N, group_sizes): empty groups (first, middle, last), padding rows, one group, all empty.
REFERENCE_CASES = [
    (12, 8, 16, [3, 4, 5]),
    (20, 16, 8, [0, 7, 0, 6, 0]),
    (33, 32, 24, [10, 0, 9]),
    (9, 8, 8, [9]),
    (7, 8, 8, [0, 0]),
    (64, 24, 40, [1, 2, 3, 4, 5, 6, 7, 8]),
]


@pytest.mark.parametrize("seed,case", list(enumerate(REFERENCE_CASES)))
def test_reference_matches_float64(seed, case):
    m, k, n, sizes = case
    lhs, rhs, group_sizes = random_gmm(seed, m, k, n, sizes)
    got = gmm.grouped_matmul_reference(lhs, rhs, group_sizes)
    np.testing.assert_allclose(np.asarray(got), grouped_np(lhs, rhs, sizes), atol=1e-4, rtol=1e-4)


def test_group_offset_shards_sum_to_the_full_product():
    sizes = [4, 0, 5, 3, 6, 2]
    lhs, rhs, group_sizes = random_gmm(7, 24, 16, 8, sizes)
    shards = [
        jax.jit(gmm.grouped_matmul_reference)(lhs, rhs[o : o + 2], group_sizes, group_offset=jnp.int32(o))
        for o in (0, 2, 4)
    ]
    for o, shard in zip((0, 2, 4), shards):
        np.testing.assert_allclose(np.asarray(shard), grouped_np(lhs, rhs[o : o + 2], sizes, o), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(sum(shards)), grouped_np(lhs, rhs, sizes), atol=1e-4, rtol=1e-4)


def test_bf16_accumulates_in_f32():
    lhs, rhs, group_sizes = random_gmm(8, 16, 512, 8, [7, 9], dtype=jnp.bfloat16)
    got = gmm.grouped_matmul_reference(lhs, rhs, group_sizes)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), grouped_np(lhs, rhs, [7, 9]), atol=0.25, rtol=1e-2)


def test_ops_xla_and_bad_arguments():
    lhs, rhs, group_sizes = random_gmm(9, 10, 8, 4, [4, 4])
    got = jax.jit(lambda *a: ops.grouped_matmul(*a, impl="xla"))(lhs, rhs, group_sizes)
    np.testing.assert_allclose(np.asarray(got), grouped_np(lhs, rhs, [4, 4]), atol=1e-4)
    with pytest.raises(ValueError, match="'fast'"):
        ops.grouped_matmul(lhs, rhs, group_sizes, impl="fast")
    with pytest.raises(ValueError, match="contracting"):
        gmm.grouped_matmul_reference(lhs, rhs[:, :4], group_sizes)


SMALL_TILES = gmm.GroupedMatmulConfig(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2)
# The persistent warp-specialized kernel on 3 "SMs": each walks several (entry, column tile) items,
# so its epilogue's stores overlap the next item and its pipeline state carries across items.
PERSISTENT = gmm.GroupedMatmulConfig(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2, persistent=True,
                                     num_sms=3)

# (M, K, N, group_sizes, num_rhs, group_offset): M not a multiple of the tile, empty groups,
# groups straddling tiles, padding rows, an expert-parallel shard that starts mid-tile, one K step
# (the persistent kernel's pipeline then releases no slot late), and N an odd number of 64-column
# tiles (as gpt-oss' 2880 = 45 x 64): the persistent kernel's last column tile reaches past N and
# its second consumer reads zeros and stores nothing; nothing padded in the last case (M = 136 is
# whole 8-row TMA tiles), so its row and column tiles past M and N rely on TMA's zero fill alone.
KERNEL_CASES = {
    "ragged_empty_groups_padding": (150, 128, 128, [30, 0, 100, 7], None, 0),
    "one_row_groups_many_tiles": (70, 64, 192, [1, 1, 0, 64, 2], None, 0),
    "shard_starts_mid_tile": (100, 128, 64, [13, 40, 0, 30, 9], 2, 1),
    "odd_column_tiles_unpadded": (136, 128, 320, [50, 0, 86], None, 0),
}


@pytest.mark.slow
@pytest.mark.parametrize("config", [SMALL_TILES, PERSISTENT], ids=["grid", "persistent"])
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_interpret_matches_float64(name, config):
    m, k, n, sizes, num_rhs, offset = KERNEL_CASES[name]
    lhs, rhs, group_sizes = random_gmm(len(name), m, k, n, sizes, num_rhs, jnp.bfloat16)
    with race_checked_interpret() as params:
        got = gmm.grouped_matmul_kernel(lhs, rhs, group_sizes, group_offset=offset, interpret=params, config=config)
    assert got.dtype == jnp.bfloat16
    want = grouped_np(lhs, rhs, sizes, offset)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1, rtol=1e-2)


@pytest.mark.slow
@pytest.mark.interpret_only
def test_ops_interpret_f32_tiny_dims_matches_xla():
    """f32 stays f32 in interpret mode; K=32 and N=48 (tiny test models) are padded to tiles."""
    lhs, rhs, group_sizes = random_gmm(12, 40, 32, 48, [16, 0, 20])
    with race_checked_interpret():
        got = ops.grouped_matmul(lhs, rhs, group_sizes, impl="interpret")
    want = ops.grouped_matmul(lhs, rhs, group_sizes, impl="xla")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_tile_schedule_covers_each_row_once():
    sizes, start, m, block_m = jnp.asarray([5, 0, 70, 1, 0, 60]), jnp.int32(3), 150, 64
    group, block, lo, hi = map(np.asarray, gmm.tile_schedule(sizes, start, m, block_m))
    assert len(group) == -(-m // block_m) + len(sizes) - 1
    owner = np.full(m, -1)
    for g, b, a, e in zip(group, block, lo, hi):
        assert b * block_m <= a and (e <= a or e <= (b + 1) * block_m)
        assert (owner[a:e] == -1).all()
        owner[a:e] = g
    want = np.full(m, -1)
    want[3:139] = np.repeat(np.arange(6), [5, 0, 70, 1, 0, 60])
    np.testing.assert_array_equal(owner, want)


def test_auto_on_a_gpu_runs_float32_weights_on_xla(monkeypatch):
    """The kernel reads expert weights in place (bf16/f16): "auto" sends an f32 model's to XLA."""
    monkeypatch.setattr(ops, "is_sm90_gpu", lambda: True)
    monkeypatch.setattr(gmm, "grouped_matmul_kernel", lambda *a, **k: pytest.fail("the kernel ran f32 weights"))
    lhs, rhs, group_sizes = random_gmm(3, 40, 64, 64, [16, 0, 20])
    np.testing.assert_array_equal(ops.grouped_matmul(lhs, rhs, group_sizes),
                                  gmm.grouped_matmul_reference(lhs, rhs, group_sizes))
