"""Every architecture the engine serves, registered once: to add one, write its model file (with
an `ARCHITECTURE` record, models/architecture.py) and add it to `ARCHITECTURES` below."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from models import deepseek, gpt_oss, llama, qwen3, qwen3_moe
from models.architecture import Architecture
from models.config import ModelConfig
from models.loading import quantized
from models.loading.hf_config import HFConfig, common_fields

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    llama.ARCHITECTURE,
    gpt_oss.ARCHITECTURE,
    deepseek.ARCHITECTURE,
    qwen3.ARCHITECTURE,
    qwen3_moe.ARCHITECTURE,
)}
PRESETS: dict[str, ModelConfig] = {p.name: p for a in ARCHITECTURES.values() for p in a.presets}
_BY_HF_NAME = {hf: a for a in ARCHITECTURES.values() for hf in a.hf_architectures}


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]


def get_preset(name: str) -> ModelConfig:
    """Look up a preset by name; the error lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def config_from_hf(hf: HFConfig, name: str, has_tensor: Callable[[str], bool] | None = None) -> ModelConfig:
    """The ModelConfig of an HF config.json; `has_tensor` (the checkpoint's tensor names) lets the
    architecture drop optional modules the checkpoint does not carry (DeepSeek-V3's MTP)."""
    archs = hf.get("architectures", None) or [hf.get("model_type", "?")]
    if archs[0] not in _BY_HF_NAME:
        raise hf.error("architectures", f"names unsupported architecture {archs[0]!r} "
                                        f"(supported: {', '.join(_BY_HF_NAME)})")
    arch = _BY_HF_NAME[archs[0]]
    try:
        config = ModelConfig(**{**common_fields(hf, name), "architecture": arch.name, **arch.hf_fields(hf),
                                "quantization": quantized.checkpoint_format(hf.get("quantization_config", None))})
    except ValueError as e:
        if str(e).startswith(hf.path):
            raise
        raise ValueError(f"{hf.path}: {e}") from None
    if arch.fit_checkpoint is not None and has_tensor is not None:
        config = arch.fit_checkpoint(config, has_tensor)
    return config


def build(config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Module:
    """The architecture's NNX module for `config`."""
    return get_architecture(config.architecture).module(config, dtype=dtype, rngs=rngs)


def served_config(config: ModelConfig, weights: str = quantized.NATIVE) -> ModelConfig:
    """The config of the model `weights` builds: the checkpoint's quantized layers packed ("native"),
    or dense (a dtype name: dequantized at load, models/loading/quantized.py)."""
    if quantized.dequantized_dtype(weights) is None:
        return config
    return dataclasses.replace(config, quantization=None)


def abstract_model(config: ModelConfig, dtype: jnp.dtype, weights: str = quantized.NATIVE) -> nnx.Module:
    """The model's structure with ShapeDtypeStruct leaves: nothing allocated. The default counts a
    quantized preset or checkpoint in its packed bytes (served_config)."""
    return nnx.eval_shape(lambda: build(served_config(config, weights), dtype=dtype, rngs=nnx.Rngs(0)))


def random_model(config: ModelConfig, dtype: jnp.dtype, seed: int = 0, weights: str = quantized.NATIVE) -> nnx.Module:
    """Random weights for `config` (packed ones random codes and scales: served_config)."""
    return build(served_config(config, weights), dtype=dtype, rngs=nnx.Rngs(seed))
