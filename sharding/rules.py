"""One table from logical axes to mesh axes, and the partition specs it gives.

Every parameter declares its logical axes where it is created (`logical_axes` metadata, e.g.
("embed", "q_heads", "head_dim")). A `ShardingRules` table maps each logical axis to mesh axes;
`spec` turns an array's logical axes into a PartitionSpec and checks that (1) no mesh axis shards
two axes of one array and (2) every sharded axis divides evenly, naming the axis and the sizes
otherwise. A new layout is a new table, not new model code.

Replication instead of an error: a logical axis in `replicate_if_smaller` (kv_heads) that is
smaller than its mesh axes is replicated, as vLLM does with GQA when kv heads < tensor size:
each device keeps every kv head (the KV cache too) and only the query heads are split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels.quantized import scale_block
from sharding.mesh import MESH_AXES

MeshAxes = tuple[str, ...]  # () = replicated
# The paged KV cache [kv heads, pages, page_size, head_dim] (MLA latent: one "head").
CACHE_AXES = ("kv_heads", "pages", None, None)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """logical axis -> mesh axes. Every logical axis a model uses must have an entry."""

    name: str
    table: Mapping[str, MeshAxes]
    replicate_if_smaller: frozenset[str] = frozenset({"kv_heads"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", {k: tuple(v) for k, v in self.table.items()})
        for logical, axes in self.table.items():
            unknown = set(axes) - set(MESH_AXES)
            if unknown:
                raise ValueError(f"rules {self.name!r}: logical axis {logical!r} maps to unknown mesh axes "
                                 f"{sorted(unknown)} (known: {MESH_AXES})")
            if len(set(axes)) != len(axes):
                raise ValueError(f"rules {self.name!r}: logical axis {logical!r} repeats a mesh axis: {axes}")

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return ()
        if logical not in self.table:
            raise ValueError(f"rules {self.name!r} have no entry for logical axis {logical!r} "
                             f"(known: {sorted(self.table)})")
        return self.table[logical]

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             what: str = "array") -> PartitionSpec:
        """The PartitionSpec of an array with these logical axes and shape on `mesh`."""
        if len(logical_axes) != len(shape):
            raise ValueError(f"{what}: {len(logical_axes)} logical axes {tuple(logical_axes)} for shape {tuple(shape)}")
        used: dict[str, str] = {}
        entries = []
        for logical, size in zip(logical_axes, shape):
            axes = self._fit(logical, size, mesh, what)
            for axis in axes:
                if axis in used:
                    raise ValueError(f"{what}: logical axes {used[axis]!r} and {logical!r} both map to "
                                     f"mesh axis {axis!r} in rules {self.name!r}")
                used[axis] = logical
            entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*entries)

    def _fit(self, logical: str | None, size: int, mesh: Mesh, what: str) -> MeshAxes:
        """The mesh axes (of size > 1) that shard this dimension; checks divisibility."""
        axes = tuple(a for a in self.mesh_axes(logical) if mesh.shape.get(a, 1) > 1)
        shards = math.prod(mesh.shape[a] for a in axes)
        if size % shards == 0:
            return axes
        if logical in self.replicate_if_smaller and size < shards:
            return ()
        sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
        raise ValueError(f"{what}: logical axis {logical!r} of size {size} cannot be sharded over mesh "
                         f"axis {sizes} ({shards} shards): {shards} does not divide {size}")


# Megatron-style tensor parallelism for attention and dense MLPs (heads, mlp and vocab over
# "tensor": one all-reduce after o_proj and one after down_proj), experts over "expert", the
# batch over "data". The fused [gate | up] axis of the experts ("expert_mlp") stays whole: a
# contiguous split of it would not give each device matching gate and up columns.
DEFAULT_RULES = ShardingRules("default", {
    "batch": ("data",), "vocab": ("tensor",), "embed": (), "q_heads": ("tensor",), "kv_heads": ("tensor",),
    "head_dim": (), "mlp": ("tensor",), "expert_mlp": (), "experts": ("expert",), "q_lora": (),
    "kv_lora": (), "pages": (),
})
# Data-parallel attention beside expert parallelism (DeepSeek's serving layout): the batch is split
# over the expert groups too, so attention runs on different sequences in each expert shard.
# The KV page pool is split the same way (each expert group holds the pages of its sequences).
EXPERT_DP_RULES = dataclasses.replace(DEFAULT_RULES, name="expert_dp", table={
    **DEFAULT_RULES.table, "batch": ("data", "expert"), "pages": ("data", "expert")})
# Everything over one axis: heads, dense mlp, vocab and experts over "tensor" (the MoE then runs
# as replicated tokens + psum, the same all-reduce tensor parallelism pays, with 1/T of the experts).
TENSOR_EXPERTS_RULES = dataclasses.replace(DEFAULT_RULES, name="tensor_experts",
                                           table={**DEFAULT_RULES.table, "experts": ("tensor",)})
RULES = {r.name: r for r in (DEFAULT_RULES, EXPERT_DP_RULES, TENSOR_EXPERTS_RULES)}


def logical_axes_of(var: nnx.Variable, path: tuple) -> tuple[str | None, ...]:
    """The logical axes a parameter declared; an error names a parameter that declared none."""
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
        raise ValueError(f"parameter {'.'.join(map(str, path))} declares no logical_axes")
    return tuple(axes)


def param_shardings(model: nnx.Module, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES
                    ) -> dict[tuple, NamedSharding]:
    """{parameter path: NamedSharding} for every parameter of `model` (abstract or concrete).

    A packed weight's values and scales (models.layers.PackedWeight, `fmt` metadata) share logical
    axes, so spec() checks the scales' block counts divide too; check_scale_blocks that the values
    split on block boundaries (each shard keeps whole blocks with their scales)."""
    _, state = nnx.split(model)
    out = {}
    for path, var in nnx.to_flat_state(state):
        what = f"parameter {'.'.join(map(str, path))}"
        shape, fmt = var.get_value().shape, var.get_metadata().get("fmt")
        spec = rules.spec(logical_axes_of(var, path), shape, mesh, what)
        if fmt is not None and path[-1] == "values":
            check_scale_blocks(spec, shape, scale_block(fmt), mesh, what)
        out[tuple(path)] = NamedSharding(mesh, spec)
    return out


def check_scale_blocks(spec: PartitionSpec, shape: Sequence[int], block: Sequence[int], mesh: Mesh, what: str) -> None:
    """A ValueError naming the tensor when a shard of packed values [..., N, K] would end inside a
    scale block (`block`: values per scale along the last axes)."""
    block = (1,) * (len(shape) - len(block)) + tuple(block)
    for axis, (size, entry, b) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape), block)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        shards = math.prod(mesh.shape[a] for a in axes)
        if shards > 1 and (size // shards) % b:
            raise ValueError(f"{what}: {shards} shards of axis {axis} ({size} stored values, {size // shards} per "
                             f"shard) would split its {b}-value scale blocks")


def cache_sharding(shape: Sequence[int], mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of one KV-cache page array [kv heads, pages, page_size, head_dim]."""
    return NamedSharding(mesh, rules.spec(CACHE_AXES, shape, mesh, "KV cache"))


def batch_sharding(shape: Sequence[int], mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch-major input (tokens [B, T], positions, ...): rows over the batch axes."""
    return NamedSharding(mesh, rules.spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh, "batch"))


def shard_model(model: nnx.Module, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> nnx.Module:
    """A copy of `model` with each parameter placed in its shards and tagged with its sharding.

    The tag (`placement` metadata) is how layers learn their layout at trace time; the MoE layer
    reads it to pick expert parallelism.
    """
    shardings = param_shardings(model, mesh, rules)
    graphdef, state = nnx.split(model)
    flat = [(path, place(var, jax.device_put(var.get_value(), shardings[tuple(path)]), shardings[tuple(path)]))
            for path, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def place_abstract(model: nnx.Module, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> nnx.Module:
    """`shard_model` for an abstract model (nnx.eval_shape): ShapeDtypeStruct leaves that carry
    their shardings, for ahead-of-time lowering; nothing is allocated."""
    shardings = param_shardings(model, mesh, rules)
    graphdef, state = nnx.split(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        value, sharding = var.get_value(), shardings[tuple(path)]
        flat.append((path, place(var, jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding), sharding)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def place(var: nnx.Variable, value: jax.Array, sharding: NamedSharding) -> nnx.Variable:
    """`var` holding `value`, with its sharding recorded as `placement` metadata."""
    new = var.replace(value)
    new.set_metadata("placement", sharding)
    return new


def placement(var: nnx.Variable) -> NamedSharding | None:
    """The sharding `shard_model` / sharded loading recorded on a parameter (None: unsharded)."""
    return var.get_metadata().get("placement")
