"""Llama 3 (also SmolLM2): GQA attention and a dense SwiGLU MLP in every block (decoder.GQADecoder)."""

from __future__ import annotations

from typing import Any

from models.architecture import Architecture
from models.config import ModelConfig, llama3_scaling
from models.decoder import GQADecoder
from models.loading.hf_config import HFConfig


def dense_hf_fields(hf: HFConfig) -> dict[str, Any]:
    """What a dense Llama-family config.json may say beyond the common fields: only what we serve."""
    hf.require("hidden_act", ("silu",), "silu")
    hf.require("mlp_bias", (False,), False)
    return {}


ARCHITECTURE = Architecture(
    name="llama", module=GQADecoder, hf_architectures=("LlamaForCausalLM",), hf_fields=dense_hf_fields,
    presets=(
        ModelConfig(name="smollm2-135m-instruct", architecture="llama", vocab_size=49152,
                    hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
        ModelConfig(name="llama3-8b", architecture="llama", vocab_size=128256, hidden_size=4096,
                    intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                    head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
                    rope_scaling=llama3_scaling(8.0, 8192)),
        ModelConfig(name="llama3.3-70b", architecture="llama", vocab_size=128256,
                    hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                    num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
                    rope_theta=500000.0, rope_scaling=llama3_scaling(8.0, 8192)),
        ModelConfig(name="tiny-llama", architecture="llama", vocab_size=256, hidden_size=64,
                    intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
                    rope_scaling=llama3_scaling(8.0, 32)),
    ))
