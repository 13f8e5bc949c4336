"""Hugging Face checkpoint directories: config.json -> ModelConfig, safetensors read tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

from models.config import ModelConfig, rope_scaling_from_hf

_ARCHITECTURES = {"LlamaForCausalLM": "llama", "GptOssForCausalLM": "gpt_oss",
                  "DeepseekV3ForCausalLM": "deepseek_v3"}
# safetensors dtype -> numpy dtype (ml_dtypes for those numpy lacks: bf16, fp8, e8m0).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
           "F8_E8M0": ml_dtypes.float8_e8m0fnu, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def config_from_hf(hf: dict[str, Any], name: str) -> ModelConfig:
    """Map an HF `config.json` (transformers v4 or v5 spelling) onto ModelConfig."""
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    if archs[0] not in _ARCHITECTURES:
        raise ValueError(f"unsupported architecture {archs[0]!r} (supported: {', '.join(_ARCHITECTURES)})")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    heads = hf["num_attention_heads"]
    ctx = hf["max_position_embeddings"]
    arch = _ARCHITECTURES[archs[0]]
    extra = {"gpt_oss": _gpt_oss_fields, "deepseek_v3": _deepseek_v3_fields}.get(arch, lambda hf: {})(hf)
    return ModelConfig(**{**dict(
        name=name, architecture=_ARCHITECTURES[archs[0]], vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, max_position_embeddings=ctx,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling_from_hf(rope, ctx), tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False)), **extra})


def _gpt_oss_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """gpt-oss: the experts' width is `intermediate_size`; sliding window on even layers by default."""
    layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                            for i in range(layers)]
    return dict(num_experts=hf["num_local_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                moe_intermediate_size=hf["intermediate_size"], router="softmax_topk",
                expert_activation="gpt_oss_swiglu", swiglu_limit=hf.get("swiglu_limit", 7.0),
                swiglu_alpha=hf.get("swiglu_alpha", 1.702), attention_bias=hf.get("attention_bias", True),
                attention_sinks=True, sliding_window=hf.get("sliding_window"), layer_types=tuple(layer_types))


def _deepseek_v3_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3: MLA sizes (our head_dim is the q/k head, nope + rope), group-limited routing."""
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(f"unsupported DeepSeek routing scoring_func={hf.get('scoring_func')!r} "
                         f"topk_method={hf.get('topk_method')!r} (supported: sigmoid, noaux_tc)")
    nope, rope = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
    return dict(num_experts=hf["n_routed_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                moe_intermediate_size=hf["moe_intermediate_size"], num_shared_experts=hf.get("n_shared_experts", 0),
                first_k_dense=hf.get("first_k_dense_replace", 0), router="sigmoid_grouped",
                n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
                norm_topk_prob=hf.get("norm_topk_prob", True),
                routed_scaling_factor=hf.get("routed_scaling_factor", 1.0), q_lora_rank=hf.get("q_lora_rank") or 0,
                kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=nope, qk_rope_head_dim=rope,
                v_head_dim=hf["v_head_dim"], head_dim=nope + rope, rope_interleave=hf.get("rope_interleave", True),
                num_mtp_layers=hf.get("num_nextn_predict_layers", 0))


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
        """One tensor as float32 numpy (bf16 and fp8 go through ml_dtypes); KeyError if absent."""
        return np.asarray(self.get_raw(name), dtype=np.float32)

    def get_raw(self, name: str) -> np.ndarray:
        """One tensor in its stored dtype (uint8 for packed fp4 / e8m0 scales), memory-mapped: only
        the parts used are read; KeyError if absent."""
        path = self.directory / self.weight_map[name]
        try:
            return _read_tensor(path, name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from {path} (truncated or corrupt?): {e}") from e


def _read_tensor(path: Path, name: str) -> np.ndarray:
    """Memory-map one tensor straight from the file layout (8-byte header size, JSON header, data).

    Nothing is read until the array is used, and then only the bytes used: a sharded load reads
    just each shard's slice. (safetensors' numpy reader cannot produce bf16 or fp8 arrays.)
    """
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_size))[name]
    if info["dtype"] not in _DTYPES:
        raise ValueError(f"unsupported safetensors dtype {info['dtype']}")
    dtype, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"])
    start, end = info["data_offsets"]
    if end - start != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"header gives {end - start} bytes for shape {shape} of {info['dtype']}")
    if end == start:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + header_size + start, shape=shape)


def read_hf_config(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / 'config.json'} is not valid JSON: {e}") from e
