"""The paged KV cache: per layer the architecture's cache tensors (K and V, or MLA's one latent),
each [heads, num_pages, page_size, head_dim] (models/architecture.py CacheLayout).

Heads first, so tensor parallelism shards axis 0 and each head's pages are contiguous for kernels.
Page 0 is the null page: padding tokens write there and block tables pad with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.architecture import CacheLayout
from models.attention import LayerCache
from models.config import ModelConfig
from models.registry import get_architecture


def layout(config: ModelConfig) -> CacheLayout:
    return get_architecture(config.architecture).cache_layout(config)


def bytes_per_token(config: ModelConfig, dtype_bytes: int) -> int:
    """Bytes one token occupies in the cache over all layers (MLA: the compressed latent)."""
    c = layout(config)
    return config.num_layers * c.tensors * c.heads * c.head_dim * dtype_bytes


def bytes_per_page(config: ModelConfig, page_size: int, dtype: jnp.dtype) -> int:
    return bytes_per_token(config, jnp.dtype(dtype).itemsize) * page_size


def pages_for_budget(config: ModelConfig, page_size: int, dtype: jnp.dtype, budget_bytes: int,
                     max_useful_pages: int) -> int:
    """Pages that fit in `budget_bytes`, never more than can ever be used (+1 for the null page)."""
    return min(budget_bytes // bytes_per_page(config, page_size, dtype), max_useful_pages + 1)


def page_shape(config: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
    """The shape of one layer's cache tensor (K, V, or MLA's latent)."""
    c = layout(config)
    return (c.heads, num_pages, page_size, c.head_dim)


def allocate(config: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype,
             sharding: jax.sharding.Sharding | None = None) -> list[LayerCache]:
    """Zeroed cache tensors per layer, created directly in their shards when `sharding` is given
    (sharding.rules.cache_sharding: kv heads over "tensor", replicated when fewer than its size)."""
    shape = page_shape(config, num_pages, page_size)
    return [tuple(jnp.zeros(shape, dtype, device=sharding) for _ in range(layout(config).tensors))
            for _ in range(config.num_layers)]


def summary(config: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype) -> str:
    total = num_pages * bytes_per_page(config, page_size, dtype)
    return (f"KV cache: {num_pages} pages x {page_size} tokens = {(num_pages - 1) * page_size} token capacity "
            f"(page 0 reserved), {total / 2**20:.1f} MiB {jnp.dtype(dtype).name} "
            f"over {config.num_layers} layers")
