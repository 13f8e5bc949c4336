"""Llama-3-style dense decoder (also SmolLM2): blocks of GQA attention and a SwiGLU MLP."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.attention import Attention
from models.config import ModelConfig
from models.decoder import Decoder, DecoderBlock
from models.layers import MLP


class Llama(Decoder):
    """The Llama assembly: every block is GQA attention + dense SwiGLU MLP."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        def block(layer: int) -> DecoderBlock:
            return DecoderBlock(config, Attention(config, dtype=dtype, rngs=rngs, layer=layer),
                                MLP(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs), dtype=dtype)
        super().__init__(config, block, dtype=dtype, rngs=rngs)
