"""Hugging Face checkpoint directories: config.json -> ModelConfig, safetensors read tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from models.config import ModelConfig, rope_scaling_from_hf

_ARCHITECTURES = {"LlamaForCausalLM": "llama"}


def config_from_hf(hf: dict[str, Any], name: str) -> ModelConfig:
    """Map an HF `config.json` (transformers v4 or v5 spelling) onto ModelConfig."""
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    if archs[0] not in _ARCHITECTURES:
        raise ValueError(f"unsupported architecture {archs[0]!r} (supported: {', '.join(_ARCHITECTURES)})")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    heads = hf["num_attention_heads"]
    ctx = hf["max_position_embeddings"]
    return ModelConfig(
        name=name, architecture=_ARCHITECTURES[archs[0]], vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, max_position_embeddings=ctx,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling_from_hf(rope, ctx), tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False))


def eos_ids_from_hf(directory: Path, hf: dict[str, Any]) -> list[int]:
    """EOS ids, preferring generation_config.json (it lists every stop id of chat models)."""
    gen_path = directory / "generation_config.json"
    eos = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.exists() else None
    eos = hf.get("eos_token_id") if eos is None else eos
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


class SafetensorsCheckpoint:
    """Tensors of a single-file or sharded (`model.safetensors.index.json`) checkpoint, read lazily."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").exists():
            weight_map = {n: "model.safetensors" for n in self._names(directory / "model.safetensors")}
        else:
            raise ValueError(f"{directory} has config.json but no model.safetensors or model.safetensors.index.json")
        self.directory = directory
        self.weight_map: dict[str, str] = weight_map

    @staticmethod
    def _names(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="numpy") as f:
                return list(f.keys())
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e

    def get_tensor(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy (bf16 goes through ml_dtypes); KeyError if absent."""
        path = self.directory / self.weight_map[name]
        try:
            with safe_open(str(path), framework="numpy") as f:
                return np.asarray(f.get_tensor(name), dtype=np.float32)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from {path} (truncated or corrupt?): {e}") from e


def read_hf_config(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / 'config.json'} is not valid JSON: {e}") from e
