"""Attention inside `jax.shard_map`: per data-parallel attention shard, per KV-head shard, or both.

Data-parallel attention (DeepSeek's serving layout; SGLang's --enable-dp-attention) splits the
requests into D shards over the mesh axes the rules give "pages" (expert_dp: data x expert).
Each shard's devices hold the attention weights (or their KV-head slice, with heads over
"tensor") and a page pool of their own (engine/page_allocator.py: local page ids, a null page 0
each). A step's flat batch is D equal segments, one per shard, and its AttentionMetadata is the D
shards' own, laid end to end: slot_mapping [D * T_s] and context_lens [D * S_s] as ever,
query_start_loc [D * (S_s + 1)] each shard's local offsets, block_tables [D * S_s, W] local ids.
The cache write and the attention then run on each shard's segment and pages, and nothing moves.

Why inside shard_map: a Pallas kernel is a custom call GSPMD cannot partition, so around it XLA
gathers the split queries and the whole page pool onto every device (48.7 GB per decode step for
DeepSeek-R1 on 8 H200s; 1.7 GB per layer for Llama-3.3-70B's heads on 2, docs/scale.md and
docs/gpu.md). The jnp path runs the same shard_map under DP attention, since block tables hold
local page ids; with split heads only, it needs none (GSPMD partitions it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from sharding.rules import ShardingRules, placement

MeshAxes = str | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AttentionShards:
    """D data-parallel attention shards: the mesh and the axes (of size > 1) that split them."""

    mesh: Mesh
    axes: tuple[str, ...]

    @property
    def size(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.axes)


def data_parallel_shards(mesh: Mesh | None, rules: ShardingRules) -> AttentionShards | None:
    """The DP attention shards of `mesh` under `rules` (the axes "pages" maps to), or None when
    the page pool is not split (one shard)."""
    if mesh is None:
        return None
    axes = tuple(a for a in rules.mesh_axes("pages") if mesh.shape.get(a, 1) > 1)
    return AttentionShards(mesh, axes) if axes else None


def replicated_layer(layer: nnx.Module) -> bool:
    """Whether every parameter of `layer` is whole on every device (placed with no split axis)."""
    for _, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        sharding = placement(var)
        if sharding is not None and any(entry is not None for entry in sharding.spec):
            return False
    return True


def layer_per_shard(layer: nnx.Module, shards: AttentionShards, call: Callable, x_btd: jax.Array,
                    positions_bt: jax.Array, cache: tuple, metadata: object) -> tuple:
    """call(layer, x, positions, cache, metadata) -> (out, cache), the whole attention layer on each
    DP attention shard's tokens, pages and metadata, its parameters replicated: the projections run
    on the shard's own tokens too. They matter where they are Pallas calls GSPMD cannot split
    (DeepSeek's FP8 projections: outside the shard_map each device computed them for all tokens,
    6.8 GB of all-gather per R1 mixed step)."""
    graphdef, state = nnx.split(layer)
    tokens, page, leaf = P(None, shards.axes), P(None, shards.axes), P(shards.axes)
    specs = lambda tree, spec: jax.tree.map(lambda _: spec, tree)  # noqa: E731

    def body(state, x, positions, cache, metadata):
        return call(nnx.merge(graphdef, state), x, positions, cache, metadata)

    run = jax.shard_map(body, mesh=shards.mesh, check_vma=False, out_specs=(tokens, specs(cache, page)),
                        in_specs=(specs(state, P()), tokens, tokens, specs(cache, page), specs(metadata, leaf)))
    return run(state, x_btd, positions_bt, cache, metadata)


def per_shard(fn: Callable, mesh: Mesh, dp: tuple[str, ...] | None, heads: MeshAxes | None, tokens: tuple,
              pages: tuple, per_head: object, metadata: object) -> tuple:
    """fn(tokens, pages, per_head, metadata) -> (out, pages) on each device's shard: `tokens`
    [1, T, H, D] split over `dp` along T and over `heads` along H, `pages` [H, N, ...] over
    `heads` and `dp` (pages), `per_head` [H] (e.g. sinks, or None) over `heads`, every metadata
    leaf over `dp` along its first axis (whole when dp is None). `out` comes back like a token array."""
    token, page, head, leaf = P(None, dp, heads, None), P(heads, dp), P(heads), P(dp)
    specs = lambda tree, spec: jax.tree.map(lambda _: spec, tree)  # noqa: E731
    in_specs = (specs(tokens, token), specs(pages, page), specs(per_head, head), specs(metadata, leaf))
    run = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(token, specs(pages, page)), check_vma=False)
    return run(tokens, pages, per_head, metadata)
