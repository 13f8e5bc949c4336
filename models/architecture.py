"""The record an architecture registers (models/registry.py): everything loaders, the engine and
the benchmarks need to know about it, kept in its model file."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx

from models.config import ModelConfig
from models.loading.hf_config import HFConfig


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """One layer's paged cache: `tensors` arrays (K and V, or MLA's one latent) of
    [heads, num_pages, page_size, head_dim] each."""

    tensors: int
    heads: int
    head_dim: int


def gqa_cache_layout(config: ModelConfig) -> CacheLayout:
    """K and V pages per KV head (every non-MLA architecture)."""
    return CacheLayout(tensors=2, heads=config.num_kv_heads, head_dim=config.head_dim)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One architecture's registration.

    name: the value of ModelConfig.architecture.
    module: the NNX model class, built as module(config, dtype=, rngs=).
    hf_architectures: the names in an HF config.json's `architectures` it accepts.
    hf_fields: config.json -> the ModelConfig fields beyond the common ones (hf_config.common_fields),
        or overriding them; raises ValueError naming the field for what it cannot serve.
    load_hf_param: the mapping of HF tensors the Llama naming does not cover (None: all default).
    fit_checkpoint: (config, has_tensor) -> the config a checkpoint's tensors support (e.g. MTP
        off when its tensors are absent); None: the config as it is.
    cache_layout: the paged KV cache of one layer.
    presets: named configs (real sizes for planning, tiny ones for tests).
    """

    name: str
    module: Callable[..., nnx.Module]
    hf_architectures: tuple[str, ...]
    hf_fields: Callable[[HFConfig], dict[str, Any]]
    load_hf_param: Callable[..., Any] | None = None  # (config, *weights.ParamLoader args)
    fit_checkpoint: Callable[[ModelConfig, Callable[[str], bool]], ModelConfig] | None = None
    cache_layout: Callable[[ModelConfig], CacheLayout] = gqa_cache_layout
    presets: tuple[ModelConfig, ...] = ()
