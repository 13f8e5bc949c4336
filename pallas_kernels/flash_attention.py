"""Causal prefill attention: the plain-jnp reference (kernel added below it).

q [B, T, Hq, D] attends to k/v [B, S, Hkv, D] with T <= S; query i sits at position S - T + i,
so a prefill chunk can attend to a longer contiguous context. GQA: query head h reads KV head
h // (Hq // Hkv). Softmax and accumulation are float32; the output has q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_attention_args(q_heads: int, kv_heads: int, sliding_window: int | None,
                         sinks: jax.Array | None) -> None:
  """Validates the arguments shared by flash and paged attention."""
  if kv_heads == 0 or q_heads % kv_heads:
    raise ValueError(f"q heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
  if sinks is not None and sinks.shape != (q_heads,):
    raise ValueError(f"sinks must have shape ({q_heads},), got {sinks.shape}")


def visible_mask(q_pos: jax.Array, k_pos: jax.Array, causal: bool,
                 sliding_window: int | None) -> jax.Array:
  """Which keys each query sees: k <= q (causal) and k > q - window. Broadcasts its inputs."""
  mask = jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), bool)
  if causal:
    mask &= k_pos <= q_pos
  if sliding_window is not None:
    mask &= k_pos > q_pos - sliding_window
  return mask


def masked_softmax_ref(s: jax.Array, mask: jax.Array, sinks: jax.Array | None) -> jax.Array:
  """Float32 softmax over the last axis of s [B, Hkv, G, T, S] where mask is True.

  sinks [Hkv, G] (or None) adds exp(sink - m) to each row's denominator (gpt-oss). A row with
  no visible key and no sink gives all-zero weights instead of NaN.
  """
  s = jnp.where(mask, s, -jnp.inf)
  m_i = s.max(axis=-1)  # [B, Hkv, G, T]
  if sinks is not None:
    m_i = jnp.maximum(m_i, sinks[None, :, :, None])
  m_i = jnp.where(jnp.isfinite(m_i), m_i, 0.0)
  p = jnp.exp(s - m_i[..., None])
  l_i = p.sum(axis=-1)
  if sinks is not None:
    l_i += jnp.exp(sinks[None, :, :, None] - m_i)
  return p / jnp.where(l_i > 0, l_i, 1.0)[..., None]


def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                              sliding_window: int | None = None,
                              sinks: jax.Array | None = None,
                              scale: float | None = None) -> jax.Array:
  """Attention of the last T positions over S keys in plain jnp (what the engine runs on CPU).

  q [B, T, Hq, D]; k, v [B, S, Hkv, D]; sinks [Hq] or None; scale None means 1/sqrt(D).
  Returns [B, T, Hq, D] in q.dtype.
  """
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  check_attention_args(hq, hkv, sliding_window, sinks)
  if t > s_len:
    raise ValueError(f"more queries ({t}) than keys ({s_len})")
  scale = d ** -0.5 if scale is None else scale
  q_btkgd = q.reshape(b, t, hkv, hq // hkv, d)
  s = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k, preferred_element_type=jnp.float32) * scale
  q_pos = jnp.arange(t)[:, None] + (s_len - t)  # [T, 1]
  k_pos = jnp.arange(s_len)[None, :]  # [1, S]
  mask = visible_mask(q_pos, k_pos, causal, sliding_window)
  sinks_kg = None if sinks is None else sinks.astype(jnp.float32).reshape(hkv, hq // hkv)
  p = masked_softmax_ref(s, mask, sinks_kg)  # [B, Hkv, G, T, S]
  o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
  return o.reshape(b, t, hq, d).astype(q.dtype)
