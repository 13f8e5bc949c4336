"""Paged attention per head shard under tensor parallelism.

A Pallas kernel is a custom call that GSPMD cannot partition: with the KV heads split over a mesh
axis, XLA would all-gather every head's queries and the whole KV cache onto each device before
the call (1.7 GB per layer and step for Llama-3.3-70B on 2 GPUs, found by the sm_90a compile gate)
and keep only its shard after. Inside `jax.shard_map` each device runs the kernel on its own heads
and its own KV pages, and nothing moves. The jnp paths need none of this: GSPMD partitions them.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels import ops

MeshAxes = str | tuple[str, ...]


def kv_heads_split(k_proj_kernel) -> tuple[Mesh, MeshAxes] | None:
    """(mesh, axes) splitting the KV heads when the k projection (dense [embed, kv_heads, head_dim]
    or packed [kv_heads * head_dim, embed]) was placed split over heads (sharding.rules.place), else None."""
    metadata = k_proj_kernel.get_metadata()
    sharding, heads = metadata.get("placement"), metadata["logical_axes"].index("kv_heads")
    if sharding is None or len(sharding.spec) <= heads or sharding.spec[heads] is None:
        return None
    return sharding.mesh, sharding.spec[heads]


def needs_shard_map(impl: str) -> bool:
    """Whether impl runs a custom call GSPMD cannot partition (the Mosaic GPU kernels)."""
    return ops.resolve_impl(impl) in ("pallas", "interpret")


def attend_per_head_shard(attend: Callable, mesh: Mesh, axes: MeshAxes, q_btnh: jax.Array, k_pages: jax.Array,
                          v_pages: jax.Array, sinks: jax.Array | None, metadata) -> jax.Array:
    """attend(q, k_pages, v_pages, sinks, metadata) on each device's heads: q [1, T, Hq, D] and the
    sinks [Hq] split over `axes` along heads, the pages [Hkv, ...] too, the metadata whole."""
    heads, pages = P(None, None, axes, None), P(axes)
    run = jax.shard_map(attend, mesh=mesh, out_specs=heads, check_vma=False,
                        in_specs=(heads, pages, pages, None if sinks is None else P(axes), P()))
    return run(q_btnh, k_pages, v_pages, sinks, metadata)
