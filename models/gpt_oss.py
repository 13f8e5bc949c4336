"""gpt-oss: pre-norm blocks of GQA attention (biases, learned sinks, sliding window on even
layers, YaRN rope) and a top-k softmax-routed MoE with clamped SwiGLU experts."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import Attention
from models.config import ModelConfig
from models.decoder import Decoder, DecoderBlock
from models.loading.weights import TensorGetter
from models.moe import MoE


class GptOss(Decoder):
    """The gpt-oss assembly: every block is GQA attention (sinks, per-layer window) + MoE."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        def block(layer: int) -> DecoderBlock:
            return DecoderBlock(config, Attention(config, dtype=dtype, rngs=rngs, layer=layer),
                                MoE(config, dtype=dtype, rngs=rngs), dtype=dtype)
        super().__init__(config, block, dtype=dtype, rngs=rngs)


def _deinterleave(gate_up: np.ndarray) -> np.ndarray:
    """gpt-oss stores gate and up interleaved on the last axis (g0 u0 g1 u1 ...); ours is [gate | up]."""
    return np.concatenate([gate_up[..., ::2], gate_up[..., 1::2]], axis=-1)


def load_hf_param(config: ModelConfig, path: tuple[str, ...], shape: tuple[int, ...],
                  get_tensor: TensorGetter) -> np.ndarray | None:
    """Our parameter at `path` from gpt-oss HF tensors, for the names the Llama mapping lacks.

    Experts (bf16 names; quantized checkpoints are dequantized to these names by the getter):
    gate_up_proj [E, D, 2I] interleaved, gate_up_proj_bias [E, 2I], down_proj [E, I, D] and
    down_proj_bias [E, D], already in our [in, out] order. None: use the default mapping.
    """
    prefix = "model." + ".".join(path[:-1])
    leaf = path[-1]
    if leaf == "sinks":
        return get_tensor(f"{prefix}.sinks")
    if path[-2] != "experts":
        return None
    tensor = get_tensor(f"{prefix}.{leaf}")
    return _deinterleave(tensor) if leaf.startswith("gate_up_proj") else tensor
