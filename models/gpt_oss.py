"""gpt-oss: GQA attention (biases, learned sinks, sliding window on even layers, YaRN rope) and a
top-k softmax-routed MoE with clamped SwiGLU experts in every block (decoder.GQADecoder)."""

from __future__ import annotations

from typing import Any

import numpy as np

from models.architecture import Architecture
from models.config import ModelConfig, MoEConfig, RopeScaling
from models.decoder import GQADecoder
from models.loading import quantized as packed
from models.loading.hf_config import HFConfig
from models.loading.weights import TensorGetter


def _moe(num_experts: int, intermediate_size: int, experts_per_tok: int, limit: float = 7.0,
         alpha: float = 1.702) -> MoEConfig:
    """Every layer routes: softmax over the top k (router bias), biased clamped-SwiGLU experts."""
    return MoEConfig(num_experts=num_experts, num_experts_per_tok=experts_per_tok, intermediate_size=intermediate_size,
                     router="softmax_topk", router_bias=True, norm_topk_prob=True, activation="gpt_oss_swiglu",
                     swiglu_limit=limit, swiglu_alpha=alpha)


def _alternating_windows(num_layers: int) -> tuple[str, ...]:
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers))


def _hf_fields(hf: HFConfig) -> dict[str, Any]:
    """gpt-oss: the experts' width is `intermediate_size`; sliding window on even layers by default."""
    layers = hf.int("num_hidden_layers")
    return dict(moe=_moe(hf.int("num_local_experts"), hf.int("intermediate_size"), hf.int("num_experts_per_tok"),
                         hf.float("swiglu_limit", 7.0), hf.float("swiglu_alpha", 1.702)),
                rms_norm_eps=hf.float("rms_norm_eps", 1e-5), attention_bias=hf.bool("attention_bias", True),
                attention_sinks=True, sliding_window=hf.get("sliding_window", None),
                layer_types=tuple(hf.get("layer_types", None) or _alternating_windows(layers)))


def _deinterleave(gate_up: packed.HFWeight, name: str) -> packed.HFWeight:
    """gpt-oss stores gate and up interleaved along out (g0 u0 g1 u1 ...); ours is [gate | up]. On a
    packed (MXFP4) weight this permutes its rows with their scales: exact."""
    n = gate_up.shape[-1]
    return packed.take_out(gate_up, np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)]), name)


def load_hf_param(config: ModelConfig, path: tuple[str, ...], shape: tuple[int, ...],
                  get_tensor: TensorGetter) -> packed.HFWeight | None:
    """Our parameter at `path` from gpt-oss HF tensors, for the names the Llama mapping lacks.

    Experts (bf16 names: the getter dequantizes or packs an MXFP4 checkpoint's *_blocks + *_scales):
    gate_up_proj [E, D, 2I] interleaved, gate_up_proj_bias [E, 2I], down_proj [E, I, D] and
    down_proj_bias [E, D], already in our [in, out] order. None: use the default mapping.
    """
    prefix = "model." + ".".join(path[:-1])
    leaf = path[-1]
    if leaf == "sinks":
        return get_tensor(f"{prefix}.sinks")
    if path[-2] != "experts":
        return None
    name = f"{prefix}.{leaf}"
    return _deinterleave(get_tensor(name), name) if leaf.startswith("gate_up_proj") else get_tensor(name)


def _preset(name: str, num_layers: int, num_experts: int, *, moe_size: int = 2880, experts_per_tok: int = 4,
            **sizes: Any) -> ModelConfig:
    """gpt-oss at the released sizes (experts in MXFP4, as OpenAI ships them) unless `sizes` say otherwise."""
    defaults: dict[str, Any] = dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_heads=64, num_kv_heads=8, head_dim=64,
        max_position_embeddings=131072, sliding_window=128, rope_theta=150000.0,
        rope_scaling=RopeScaling(kind="yarn", factor=32.0, original_max_position_embeddings=4096, truncate=False),
        quantization="mxfp4")
    return ModelConfig(name=name, architecture="gpt_oss", num_layers=num_layers, rms_norm_eps=1e-5,
                       attention_bias=True, attention_sinks=True, layer_types=_alternating_windows(num_layers),
                       moe=_moe(num_experts, moe_size, experts_per_tok), **{**defaults, **sizes})


ARCHITECTURE = Architecture(
    name="gpt_oss", module=GQADecoder, hf_architectures=("GptOssForCausalLM",), hf_fields=_hf_fields,
    load_hf_param=load_hf_param,
    presets=(
        _preset("gpt-oss-20b", num_layers=24, num_experts=32),
        _preset("gpt-oss-120b", num_layers=36, num_experts=128),
        _preset("tiny-gpt-oss", num_layers=2, num_experts=4, moe_size=32, experts_per_tok=2, vocab_size=256,
                hidden_size=64, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=16,
                max_position_embeddings=128, sliding_window=8,
                rope_scaling=RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=32,
                                         truncate=False), quantization=None),
    ))
