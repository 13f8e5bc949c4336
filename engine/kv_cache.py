"""The paged KV cache: per layer the architecture's cache tensors (K and V, or MLA's one latent),
each [heads, num_pages, page_size, head_dim] (models/architecture.py CacheLayout).

Heads first, so tensor parallelism shards axis 0 and each head's pages are contiguous for kernels.
Page 0 is the null page: padding tokens write there and block tables pad with it. The pool is
stored in pool_dtype(the model's dtype): what the GPU kernels read in place; or, with
kv_cache_dtype="fp8_e4m3" (EngineConfig), as float8_e4m3fn scaled by the one per-tensor scale
models.attention.KV_SCALE (1.0; write clip(x / scale, ±448), read fp8 * scale): one byte per
element, so a memory budget holds twice the pages of a bf16 pool. The jnp ("xla") path and the ragged and MLA
kernels read FP8 pools (pallas_kernels/ops.py; the padded paged kernel refuses them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.architecture import CacheLayout
from models.attention import FP8_KV_DTYPE, KV_SCALE, LayerCache  # noqa: F401 (KV_SCALE: the one scale)
from models.config import ModelConfig
from models.registry import get_architecture
from pallas_kernels import ops


# EngineConfig.kv_cache_dtype values: "auto" stores the model's dtype (pool_dtype), the fp8 ones
# float8_e4m3fn ("fp8" is vLLM's alias of "fp8_e4m3").
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    """ValueError naming the accepted values for anything else."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; expected one of {KV_CACHE_DTYPES}")


def pool_dtype(model_dtype: jnp.dtype, sm90: bool | None = None, kv_cache_dtype: str = "auto") -> jnp.dtype:
    """The dtype the KV pool is stored in: the model's, except float32 on an H100/H200, stored as
    bfloat16. The compiled Pallas kernels read the pool in place as what wgmma multiplies
    (bf16/f16: pallas_kernels.blocked_attention.kv_pool) and refuse float32, whose per-step cast
    would copy the whole cache. New K/V are cast as they are written (models/attention.py). The
    choice does not wait for the attention impl, which the engine picks after sizing the pool.
    sm90: whether the pool is for an H100/H200 (None: this process's device; compiling for one
    on a CPU machine says True). kv_cache_dtype "fp8"/"fp8_e4m3": float8_e4m3fn whatever the model's."""
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype != "auto":
        return FP8_KV_DTYPE
    dtype = jnp.dtype(model_dtype)
    sm90 = ops.is_sm90_gpu() if sm90 is None else sm90
    return jnp.dtype(jnp.bfloat16) if dtype == jnp.float32 and sm90 else dtype


def layout(config: ModelConfig) -> CacheLayout:
    return get_architecture(config.architecture).cache_layout(config)


def bytes_per_token(config: ModelConfig, dtype_bytes: int) -> int:
    """Bytes one token occupies in the cache over all layers (MLA: the compressed latent)."""
    c = layout(config)
    return config.num_layers * c.tensors * c.heads * c.head_dim * dtype_bytes


def bytes_per_page(config: ModelConfig, page_size: int, model_dtype: jnp.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes of one page over all layers, in the pool's dtype (pool_dtype(model_dtype, kv_cache_dtype=...))."""
    return bytes_per_token(config, pool_dtype(model_dtype, kv_cache_dtype=kv_cache_dtype).itemsize) * page_size


def pages_for_budget(config: ModelConfig, page_size: int, model_dtype: jnp.dtype, budget_bytes: int,
                     max_useful_pages: int, kv_cache_dtype: str = "auto") -> int:
    """Pages that fit in `budget_bytes`, never more than can ever be used (+1 for the null page)."""
    return min(budget_bytes // bytes_per_page(config, page_size, model_dtype, kv_cache_dtype), max_useful_pages + 1)


def page_shape(config: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
    """The shape of one layer's cache tensor (K, V, or MLA's latent)."""
    c = layout(config)
    return (c.heads, num_pages, page_size, c.head_dim)


def allocate(config: ModelConfig, num_pages: int, page_size: int, model_dtype: jnp.dtype,
             sharding: jax.sharding.Sharding | None = None, kv_cache_dtype: str = "auto") -> list[LayerCache]:
    """Zeroed cache tensors per layer in pool_dtype(model_dtype), created directly in their shards
    when `sharding` is given (sharding.rules.cache_sharding: kv heads over "tensor", replicated
    when fewer than its size)."""
    shape, dtype = page_shape(config, num_pages, page_size), pool_dtype(model_dtype, kv_cache_dtype=kv_cache_dtype)
    return [tuple(jnp.zeros(shape, dtype, device=sharding) for _ in range(layout(config).tensors))
            for _ in range(config.num_layers)]


def summary(config: ModelConfig, num_pages: int, page_size: int, model_dtype: jnp.dtype,
            kv_cache_dtype: str = "auto", shards: int = 1) -> str:
    total = num_pages * bytes_per_page(config, page_size, model_dtype, kv_cache_dtype)
    split = f", split over {shards} data-parallel attention shards" if shards > 1 else ""
    return (f"KV cache: {num_pages} pages x {page_size} tokens = {(num_pages - shards) * page_size} token capacity "
            f"(page 0 of each shard reserved{split}), {total / 2**20:.1f} MiB {pool_dtype(model_dtype, kv_cache_dtype=kv_cache_dtype).name} "
            f"over {config.num_layers} layers")


def is_intact(cache: list[LayerCache]) -> bool:
    """False when a failed call consumed the cache: its buffers were donated (deleted) or hold the error."""
    try:
        jax.block_until_ready(cache)
    except Exception:  # noqa: BLE001 (a deleted or errored buffer raises here)
        return False
    return True
