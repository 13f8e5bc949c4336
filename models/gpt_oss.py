"""gpt-oss: pre-norm blocks of GQA attention (biases, learned sinks, sliding window on even
layers, YaRN rope) and a top-k softmax-routed MoE with clamped SwiGLU experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import Attention, AttentionMetadata, LayerCache
from models.config import ModelConfig
from models.layers import Embedding, Linear, RMSNorm
from models.loading.weights import TensorGetter
from models.moe import MoE


class GptOssBlock(nnx.Module):
    """x + attn(norm(x)), then x + moe(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs, layer=layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = MoE(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None,
                 metadata: AttentionMetadata | None, impl: str) -> tuple[jax.Array, LayerCache | None]:
        h, cache = self.self_attn(self.input_layernorm(x), positions, cache, metadata, impl)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), impl), cache


class GptOss(nnx.Module):
    """The decoder stack. `__call__` returns final hidden states; `logits` applies the LM head."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([GptOssBlock(config, i, dtype=dtype, rngs=rngs) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.lm_head = Linear((config.hidden_size,), (config.vocab_size,), ("embed", "vocab"), dtype=dtype, rngs=rngs)

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array, kv_cache: list[LayerCache] | None = None,
                 metadata: AttentionMetadata | None = None, *, attention_impl: str = "auto"
                 ) -> tuple[jax.Array, list[LayerCache] | None]:
        """Hidden states [B, T, D] after the final norm, and the updated per-layer K/V pages.

        attention_impl also picks the grouped-GEMM implementation of the experts.
        """
        x = self.embed_tokens(tokens_bt)
        new_cache = [] if kv_cache is not None else None
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, positions_bt, None if kv_cache is None else kv_cache[i], metadata, attention_impl)
            if new_cache is not None:
                new_cache.append(layer_cache)
        return self.norm(x), new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [..., vocab] from final hidden states."""
        return self.lm_head(hidden).astype(jnp.float32)



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
