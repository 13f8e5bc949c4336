"""Sharding on a jax.sharding mesh: meshes, logical-axis rules, expert parallelism."""

from sharding.mesh import MESH_AXES, init_distributed, make_mesh
from sharding.rules import (DEFAULT_RULES, EXPERT_DP_RULES, RULES, TENSOR_EXPERTS_RULES, ShardingRules,
                            batch_sharding, cache_sharding, param_shardings, shard_model)

__all__ = ["MESH_AXES", "init_distributed", "make_mesh", "DEFAULT_RULES", "EXPERT_DP_RULES",
           "RULES", "TENSOR_EXPERTS_RULES", "ShardingRules", "batch_sharding", "cache_sharding",
           "param_shardings", "shard_model"]
