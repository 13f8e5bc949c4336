"""Research hooks inside the forward pass: read the residual stream and the MoE routing, and edit
the residual stream (steering, activation patching), per flat token of a ragged step.

Layer numbering is transformers' `output_hidden_states`: entry 0 is the embeddings, entry i the
residual stream after decoder layer i (1-based), and the last entry (i = num_layers) is the final
RMSNorm applied to it, exactly as transformers returns it. An edit "at layer i" changes entry i
before anything reads it: layer 0 edits the embeddings the first block sees, the last layer edits
the residual before the final norm.

Edits come as `ModelHooks.lanes` lanes of per-token rows, so requests with different edits share
one step: token t of lane j, when `layer[j, t] == i`, becomes `x * keep[j, t] + delta[j, t]` after
layer i (keep 1: steering, delta = scale * vector; keep 0: patching, delta = the new value).
`Decoder.hooked` (models/decoder.py) applies the edits and returns what it read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelHooks:
    """A step's residual edits: per lane and flat token the layer edited (-1: none) [K, T], the
    factor kept [K, T] and the row added [K, T, D] (float32, cast to the activations' dtype)."""

    layer: jax.Array
    keep: jax.Array
    delta: jax.Array

    @property
    def lanes(self) -> int:
        return self.layer.shape[0]


def edit(hooks: ModelHooks | None, layer: int, x_btd: jax.Array) -> jax.Array:
    """The residual after `layer` with every lane's edits at that layer applied, in lane order
    (unchanged without hooks)."""
    if hooks is None:
        return x_btd
    for j in range(hooks.lanes):
        hit = (hooks.layer[j] == layer)[None, :, None]
        edited = x_btd * hooks.keep[j][None, :, None].astype(x_btd.dtype) + hooks.delta[j][None].astype(x_btd.dtype)
        x_btd = jnp.where(hit, edited, x_btd)
    return x_btd
