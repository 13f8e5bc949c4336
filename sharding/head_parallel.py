"""Which attention layers split their KV heads over a mesh axis, and when that needs shard_map.

A Pallas kernel is a custom call GSPMD cannot partition: with the KV heads split over a mesh
axis, XLA would all-gather every head's queries and the whole KV cache onto each device before
the call (1.7 GB per layer and step for Llama-3.3-70B on 2 GPUs, found by the sm_90a compile gate)
and keep only its shard after. Such a layer runs its cache write and attention per head shard
(sharding/attention_shards.py). The jnp paths need none of this: GSPMD partitions them.
"""

from __future__ import annotations

from jax.sharding import Mesh

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
