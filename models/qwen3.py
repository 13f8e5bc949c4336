"""Qwen3 (dense): Llama blocks with an RMSNorm over each head of q and k before rotary (config.qk_norm)
and no attention biases (decoder.GQADecoder)."""

from __future__ import annotations

from typing import Any

from models.architecture import Architecture
from models.config import ModelConfig
from models.decoder import GQADecoder
from models.llama import dense_hf_fields
from models.loading.hf_config import HFConfig


def qwen3_hf_fields(hf: HFConfig) -> dict[str, Any]:
    """Qwen3's attention: q/k norm always; sliding-window layers are not served."""
    hf.require("use_sliding_window", (False,), False)
    return {**dense_hf_fields(hf), "qk_norm": True}


ARCHITECTURE = Architecture(
    name="qwen3", module=GQADecoder, hf_architectures=("Qwen3ForCausalLM",), hf_fields=qwen3_hf_fields,
    presets=(
        ModelConfig(name="qwen3-8b", architecture="qwen3", vocab_size=151936, hidden_size=4096,
                    intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, qk_norm=True),
        ModelConfig(name="tiny-qwen3", architecture="qwen3", vocab_size=256, hidden_size=64,
                    intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6, qk_norm=True,
                    tie_word_embeddings=True),
    ))
