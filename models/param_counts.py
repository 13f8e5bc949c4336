"""Parameter counts read off the model's parameter tree (abstract shapes: nothing is allocated),
so the config summary, the benchmarks' roofline and the sharding plan count the same thing."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.registry import abstract_model


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """total: every decoder parameter (the embedding once when tied); MTP modules apart in `mtp`,
    since decoding does not run them. embedding: the untied input table (tokens gather its rows,
    no matmul reads it whole). routed_expert: one routed expert's parameters summed over the MoE
    layers, so a token's experts cost experts_per_tok * routed_expert."""

    total: int
    embedding: int
    routed_expert: float
    num_experts: int
    experts_per_tok: int
    mtp: int

    @property
    def active(self) -> int:
        """Parameters one token uses: everything but the routed experts it does not pick."""
        return round(self.total - (self.num_experts - self.experts_per_tok) * self.routed_expert)


@functools.cache
def param_counts(config: ModelConfig) -> ParamCounts:
    """Count `config`'s parameters from its abstract model (dense: a packed weight counts its values)."""
    state = nnx.state(abstract_model(config, jnp.float32, weights="float32"), nnx.Param)
    moe = config.moe
    total = embedding = mtp = 0
    routed = 0.0
    for path, var in nnx.to_flat_state(state):
        size = math.prod(var.get_value().shape)
        if path[0] == "mtp":
            mtp += size
            continue
        total += size
        if "experts" in path:  # stacked routed experts [E, ...] (shared experts are "shared_experts")
            routed += size / moe.num_experts
        if path[0] == "embed_tokens" and not config.tie_word_embeddings:
            embedding += size
    return ParamCounts(total=total, embedding=embedding, routed_expert=routed,
                       num_experts=moe.num_experts if moe else 0, experts_per_tok=moe.num_experts_per_tok if moe else 0,
                       mtp=mtp)
