"""The decoder skeleton every model shares: pre-norm residual blocks between an embedding and an LM head.

A model assembly says which attention and which feed-forward each block holds: `GQADecoder`
serves every architecture whose blocks are GQA attention plus a dense or MoE feed-forward (Llama,
Qwen3, gpt-oss, Qwen3-MoE differ only in config); deepseek.py assembles MLA blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import Attention, AttentionMetadata, LayerCache
from models.config import ModelConfig
from models.hooks import ModelHooks, edit
from models.layers import MLP, Embedding, Linear, RMSNorm
from models.moe import MoE


class DecoderBlock(nnx.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)).

    attention(x, positions, cache, metadata, impl) -> (out, cache); ffn(x, impl, real) -> out, where
    real [B, T] marks the tokens that are not a step's padding (None: all are), which a MoE routes
    to no expert.
    """

    def __init__(self, config: ModelConfig, attention: nnx.Module, ffn: nnx.Module, *, dtype: jnp.dtype):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = ffn

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None,
                 metadata: AttentionMetadata | None, impl: str) -> tuple[jax.Array, LayerCache | None]:
        x, cache, _ = self.routed(x, positions, cache, metadata, impl)
        return x, cache

    def routed(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None,
               metadata: AttentionMetadata | None, impl: str) -> tuple[jax.Array, LayerCache | None, jax.Array | None]:
        """`__call__`, plus a MoE feed-forward's expert ids [B*T, k] (None: dense), for `Decoder.hooked`."""
        h, cache = self.self_attn(self.input_layernorm(x), positions, cache, metadata, impl)
        x = x + h
        real = None if metadata is None else metadata.real_tokens().reshape(x.shape[:2])
        normed = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, ids = self.mlp.routed(normed, impl, real)
            return x + y, cache, ids
        return x + self.mlp(normed, impl, real), cache, None


BlockFactory = Callable[[int], DecoderBlock]  # layer index -> block


class Decoder(nnx.Module):
    """Embedding, blocks, final norm and LM head (tied to the embedding when the config says so).

    `__call__` returns final hidden states and the updated cache; `logits` applies the LM head, so
    the engine computes logits only for the positions it samples.
    """

    def __init__(self, config: ModelConfig, make_block: BlockFactory, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([make_block(i) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        Linear((config.hidden_size,), (config.vocab_size,), ("embed", "vocab"), dtype=dtype, rngs=rngs))

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array, kv_cache: list[LayerCache] | None = None,
                 metadata: AttentionMetadata | None = None, *, attention_impl: str = "auto"
                 ) -> tuple[jax.Array, list[LayerCache] | None]:
        """Hidden states [B, T, D] after the final norm, and the updated per-layer cache.

        attention_impl picks the attention kernels and the experts' grouped GEMM (pallas_kernels.ops).
        """
        hidden, new_cache, _ = self.hooked(tokens_bt, positions_bt, kv_cache, metadata, attention_impl, None)
        return hidden, new_cache

    def hooked(self, tokens_bt: jax.Array, positions_bt: jax.Array, kv_cache: list[LayerCache] | None,
               metadata: AttentionMetadata | None, impl: str, hooks: ModelHooks | None
               ) -> tuple[jax.Array, list[LayerCache] | None, dict[str, jax.Array]]:
        """`__call__` with `hooks`' residual edits (models/hooks.py), plus what it read for the first
        batch row: "hidden_states" [T, num_layers + 1, D] (transformers' numbering, the last entry
        after the final norm) and, for a MoE model, "routed_experts" [T, num_moe_layers, k] int32
        (padding tokens: num_experts). Without hooks nothing is read (the reads are dead code)."""
        x = edit(hooks, 0, self.embed_tokens(tokens_bt))
        residuals, routed, new_cache = [x], [], [] if kv_cache is not None else None
        for i, layer in enumerate(self.layers):
            x, layer_cache, ids = layer.routed(x, positions_bt, None if kv_cache is None else kv_cache[i],
                                               metadata, impl)
            x = edit(hooks, i + 1, x)
            residuals.append(x)
            if new_cache is not None:
                new_cache.append(layer_cache)
            if ids is not None:
                routed.append(ids.reshape(*x.shape[:2], -1)[0])
        hidden = self.norm(x)
        if hooks is None:
            return hidden, new_cache, {}
        read = {"hidden_states": jnp.stack([r[0] for r in residuals[:-1]] + [hidden[0]], axis=1)}
        if routed:
            read["routed_experts"] = jnp.stack(routed, axis=1).astype(jnp.int32)
        return hidden, new_cache, read

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [..., vocab] from final hidden states."""
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden).astype(jnp.float32)


def feed_forward(config: ModelConfig, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Module:
    """Routed experts in the config's MoE layers, a dense SwiGLU MLP elsewhere."""
    if config.is_moe_layer(layer):
        return MoE(config, dtype=dtype, rngs=rngs)
    return MLP(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs, fmt=config.packed_format("linear"))


class GQADecoder(Decoder):
    """Every block is GQA attention (the config's biases, q/k norm, sinks, windows) + `feed_forward`."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        def block(layer: int) -> DecoderBlock:
            return DecoderBlock(config, Attention(config, dtype=dtype, rngs=rngs, layer=layer),
                                feed_forward(config, layer, dtype=dtype, rngs=rngs), dtype=dtype)
        super().__init__(config, block, dtype=dtype, rngs=rngs)
