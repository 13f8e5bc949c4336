"""Qwen3-MoE: Qwen3 attention (q/k norm) and softmax top-k routed SwiGLU experts, with optional
dense layers (`mlp_only_layers`, `decoder_sparse_step`); decoder.GQADecoder assembles it."""

from __future__ import annotations

from typing import Any

from models.architecture import Architecture
from models.config import ModelConfig, MoEConfig
from models.decoder import GQADecoder
from models.loading.hf_config import HFConfig
from models.moe import load_per_expert_param
from models.qwen3 import qwen3_hf_fields


def _dense_layers(hf: HFConfig) -> tuple[int, ...]:
    """transformers' rule: layer i routes unless listed in mlp_only_layers or (i + 1) % step != 0."""
    layers, step = hf.int("num_hidden_layers"), hf.int("decoder_sparse_step", 1)
    if step < 1:
        raise hf.error("decoder_sparse_step", f"is {step}, expected >= 1")
    only = set(hf.get("mlp_only_layers", []))
    return tuple(i for i in range(layers) if i in only or (i + 1) % step)


def _hf_fields(hf: HFConfig) -> dict[str, Any]:
    experts = hf.int("num_experts") if "num_experts" in hf.raw else hf.int("num_local_experts")  # v4 / v5 name
    moe = MoEConfig(num_experts=experts, num_experts_per_tok=hf.int("num_experts_per_tok"),
                    intermediate_size=hf.int("moe_intermediate_size"), dense_layers=_dense_layers(hf),
                    router="softmax_topk", norm_topk_prob=hf.bool("norm_topk_prob", False))
    return {**qwen3_hf_fields(hf), "moe": moe}


def _preset(name: str, moe: MoEConfig, **sizes: Any) -> ModelConfig:
    return ModelConfig(name=name, architecture="qwen3_moe", rms_norm_eps=1e-6, rope_theta=1e6, qk_norm=True,
                       moe=moe, **sizes)


ARCHITECTURE = Architecture(
    name="qwen3_moe", module=GQADecoder, hf_architectures=("Qwen3MoeForCausalLM",), hf_fields=_hf_fields,
    load_hf_param=load_per_expert_param,
    presets=(
        _preset("qwen3-30b-a3b", MoEConfig(num_experts=128, num_experts_per_tok=8, intermediate_size=768),
                vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                num_kv_heads=4, head_dim=128, max_position_embeddings=40960),
        _preset("tiny-qwen3-moe", MoEConfig(num_experts=8, num_experts_per_tok=2, intermediate_size=32,
                                            dense_layers=(0,), norm_topk_prob=True),
                vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, max_position_embeddings=512),
    ))
