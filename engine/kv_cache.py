"""The paged KV cache: per layer K and V pages [num_kv_heads, num_pages, page_size, head_dim].

Heads first, so tensor parallelism shards axis 0 and each head's pages are contiguous for kernels.
Page 0 is the null page: padding tokens write there and block tables pad with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.attention import LayerCache
from models.config import ModelConfig


def bytes_per_page(config: ModelConfig, page_size: int, dtype: jnp.dtype) -> int:
    return config.kv_bytes_per_token(jnp.dtype(dtype).itemsize) * page_size


def pages_for_budget(config: ModelConfig, page_size: int, dtype: jnp.dtype, budget_bytes: int,
                     max_useful_pages: int) -> int:
    """Pages that fit in `budget_bytes`, never more than can ever be used (+1 for the null page)."""
    return min(budget_bytes // bytes_per_page(config, page_size, dtype), max_useful_pages + 1)


def page_shape(config: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
    """The shape of one layer's K (or V) pages; for MLA the single latent "head" of
    kv_lora_rank + qk_rope_head_dim values per token."""
    if config.kv_lora_rank:
        return (1, num_pages, page_size, config.kv_lora_rank + config.qk_rope_head_dim)
    return (config.num_kv_heads, num_pages, page_size, config.head_dim)


def allocate(config: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype,
             sharding: jax.sharding.Sharding | None = None) -> list[LayerCache]:
    """Zeroed K and V pages per layer (MLA: one latent tensor per layer), created directly in their
    shards when `sharding` is given (sharding.rules.cache_sharding: kv heads over "tensor",
    replicated when fewer than its size)."""
    shape = page_shape(config, num_pages, page_size)
    per_layer = 1 if config.kv_lora_rank else 2
    return [tuple(jnp.zeros(shape, dtype, device=sharding) for _ in range(per_layer))
            for _ in range(config.num_layers)]


def summary(config: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype) -> str:
    total = num_pages * bytes_per_page(config, page_size, dtype)
    return (f"KV cache: {num_pages} pages x {page_size} tokens = {(num_pages - 1) * page_size} token capacity "
            f"(page 0 reserved), {total / 2**20:.1f} MiB {jnp.dtype(dtype).name} "
            f"over {config.num_layers} layers")


def cache_bytes(cache: list[LayerCache]) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(cache))
