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

import jax
import jax.numpy as jnp


def check_grouped_matmul_args(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
  """Validates ranks and matching dimensions."""
  if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
    raise ValueError(f"want lhs [M,K], rhs [G,K,N], group_sizes [G]; got {lhs.shape}, "
                     f"{rhs.shape}, {group_sizes.shape}")
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"contracting dims differ: lhs {lhs.shape}, rhs {rhs.shape}")
  if group_sizes.shape[0] < rhs.shape[0]:
    raise ValueError(f"{group_sizes.shape[0]} group sizes for {rhs.shape[0]} rhs groups")


def local_groups(group_sizes: jax.Array, num_local: int,
                 group_offset: jax.Array | int) -> tuple[jax.Array, jax.Array]:
  """The shard's group sizes [G_local] and the first row of its first group (a scalar)."""
  group_sizes = group_sizes.astype(jnp.int32)
  offset = jnp.asarray(group_offset, jnp.int32)
  start = jnp.sum(jnp.where(jnp.arange(group_sizes.shape[0]) < offset, group_sizes, 0))
  sizes = jax.lax.dynamic_slice_in_dim(group_sizes, offset, num_local)
  return sizes, start


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                             group_offset: jax.Array | int = 0) -> jax.Array:
  """The grouped GEMM through jax.lax.ragged_dot: lhs [M, K], rhs [G, K, N] -> [M, N]."""
  check_grouped_matmul_args(lhs, rhs, group_sizes)
  m = lhs.shape[0]
  sizes, start = local_groups(group_sizes, rhs.shape[0], group_offset)
  # ragged_dot wants the shard's first row at row 0: rotate, multiply, rotate back.
  out = jax.lax.ragged_dot(jnp.roll(lhs, -start, axis=0), rhs, sizes,
                           preferred_element_type=jnp.float32)
  out = jnp.roll(out, start, axis=0)
  rows = jnp.arange(m)[:, None]
  keep = (rows >= start) & (rows < start + jnp.sum(sizes))
  return jnp.where(keep, out, 0.0).astype(lhs.dtype)
