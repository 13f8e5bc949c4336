"""Accuracy of an FP8 (e4m3, per-tensor scale models.attention.KV_SCALE) KV cache against the model's
own dtype: every position's logits of fixed prompts run as one paged prefill (the engine's write-then-
attend), max / mean |Δlogit| and argmax (greedy) agreement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from engine import kv_cache
from models import LoadedModel
from models.attention import KV_SCALE, AttentionMetadata


def paged_logits(model: LoadedModel, token_ids: np.ndarray, kv_cache_dtype: str, page_size: int = 8) -> np.ndarray:
    """Logits [T, V] of one prompt prefilled through the paged cache (jnp attention path)."""
    t = len(token_ids)
    pages = -(-t // page_size)
    cache = kv_cache.allocate(model.config, pages + 1, page_size, model.dtype, kv_cache_dtype=kv_cache_dtype)
    meta = AttentionMetadata(jnp.arange(page_size, page_size + t, dtype=jnp.int32), jnp.array([0, t], jnp.int32),
                             jnp.array([t], jnp.int32), jnp.arange(1, pages + 1, dtype=jnp.int32)[None],
                             max_query_len=t)
    tokens, positions = jnp.asarray(token_ids, jnp.int32)[None], jnp.arange(t, dtype=jnp.int32)[None]
    hidden, _ = model.model(tokens, positions, cache, meta, attention_impl="xla")
    return np.asarray(model.model.logits(hidden[0]).astype(jnp.float32))


def compare(model: LoadedModel, name: str, count: int = 4, length: int = 48, seed: int = 0) -> dict:
    """FP8 vs the model-dtype pool ("auto") over `count` random prompts of `length` tokens."""
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (count, length))
    deltas, agree, std = [], [], []
    for row in ids:
        want, got = paged_logits(model, row, "auto"), paged_logits(model, row, "fp8_e4m3")
        deltas.append(np.abs(got - want))
        agree.append(got.argmax(-1) == want.argmax(-1))
        std.append(want.std())
    delta = np.stack(deltas)
    return {"model": name, "dtype": jnp.dtype(model.dtype).name,
            "kv_reference": kv_cache.pool_dtype(model.dtype, sm90=False).name, "kv_scale": KV_SCALE,
            "prompts": [count, length], "max_abs_dlogit": float(delta.max()), "mean_abs_dlogit": float(delta.mean()),
            "logit_std": float(np.mean(std)), "greedy_agreement": float(np.stack(agree).mean()),
            "backend": jax.default_backend()}
