"""Llama-3-style dense decoder (also SmolLM2): pre-norm blocks of GQA attention and SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import Attention, AttentionMetadata, LayerCache
from models.config import ModelConfig
from models.layers import MLP, Embedding, Linear, RMSNorm


class DecoderLayer(nnx.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None,
                 metadata: AttentionMetadata | None, attention_impl: str) -> tuple[jax.Array, LayerCache | None]:
        h, cache = self.self_attn(self.input_layernorm(x), positions, cache, metadata, attention_impl)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
    """The decoder stack. `__call__` returns final hidden states; `logits` applies the LM head."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        Linear((config.hidden_size,), (config.vocab_size,), ("embed", "vocab"), dtype=dtype, rngs=rngs))

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array, kv_cache: list[LayerCache] | None = None,
                 metadata: AttentionMetadata | None = None, *, attention_impl: str = "auto"
                 ) -> tuple[jax.Array, list[LayerCache] | None]:
        """Hidden states [B, T, D] after the final norm, and the updated per-layer cache."""
        x = self.embed_tokens(tokens_bt)
        new_cache = [] if kv_cache is not None else None
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, positions_bt, None if kv_cache is None else kv_cache[i], metadata, attention_impl)
            if new_cache is not None:
                new_cache.append(layer_cache)
        return self.norm(x), new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [..., vocab] from final hidden states."""
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden).astype(jnp.float32)
