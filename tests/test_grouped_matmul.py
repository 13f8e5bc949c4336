"""Grouped matmul: the jnp reference vs float64 NumPy, expert-parallel offsets, interpret mode."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import grouped_matmul as gmm
from pallas_kernels import ops


def grouped_np(lhs, rhs, group_sizes, group_offset=0):
  """Float64 grouped matmul, one group at a time; rows of other groups stay zero."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  ends = np.cumsum(group_sizes)
  for g in range(rhs.shape[0]):
    end = ends[group_offset + g]
    start = end - group_sizes[group_offset + g]
    out[start:end] = lhs[start:end] @ rhs[g]
  return out


def random_gmm(seed, m, k, n, group_sizes, num_rhs=None, dtype=jnp.float32):
  """Random lhs [M,K], rhs [G,K,N] and group sizes as an int32 array."""
  kl, kr = jax.random.split(jax.random.key(seed))
  num_rhs = len(group_sizes) if num_rhs is None else num_rhs
  lhs = jax.random.normal(kl, (m, k), dtype)
  rhs = jax.random.normal(kr, (num_rhs, k, n), dtype)
  return lhs, rhs, jnp.asarray(group_sizes, jnp.int32)


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
  shards = [jax.jit(gmm.grouped_matmul_reference)(lhs, rhs[o:o + 2], group_sizes,
                                                  group_offset=jnp.int32(o))
            for o in (0, 2, 4)]
  for o, shard in zip((0, 2, 4), shards):
    np.testing.assert_allclose(np.asarray(shard), grouped_np(lhs, rhs[o:o + 2], sizes, o),
                               atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(sum(shards)), grouped_np(lhs, rhs, sizes),
                             atol=1e-4, rtol=1e-4)


def test_bf16_accumulates_in_f32():
  lhs, rhs, group_sizes = random_gmm(8, 16, 512, 8, [7, 9], dtype=jnp.bfloat16)
  got = gmm.grouped_matmul_reference(lhs, rhs, group_sizes)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), grouped_np(lhs, rhs, [7, 9]),
                             atol=0.25, rtol=1e-2)


def test_ops_xla_and_bad_arguments():
  lhs, rhs, group_sizes = random_gmm(9, 10, 8, 4, [4, 4])
  got = jax.jit(lambda *a: ops.grouped_matmul(*a, impl="xla"))(lhs, rhs, group_sizes)
  np.testing.assert_allclose(np.asarray(got), grouped_np(lhs, rhs, [4, 4]), atol=1e-4)
  with pytest.raises(ValueError, match="'fast'"):
    ops.grouped_matmul(lhs, rhs, group_sizes, impl="fast")
  with pytest.raises(ValueError, match="contracting"):
    gmm.grouped_matmul_reference(lhs, rhs[:, :4], group_sizes)
