"""Logits processors built on engine/logits_processor.py, showing the extension point.

`logit_bias(k)` re-implements the built-in `logit_bias` (engine/penalties.py) for at most k tokens
per request, and `occurrence_penalties()` the built-in presence and frequency penalties over the
request's token counts (per-request device state); both give the built-ins' tokens. `ban_until(k)`
is new: up to k tokens are never sampled before the output holds `until` tokens (a per-token
min_tokens).

    llm = LLM(model, logits_processors=[logit_bias(8), ban_until(8)])
    SamplingParams(logits_processor_args={"logit_bias": {"token_ids": [5, 9], "bias": [3.0, -100.0]},
                                          "ban_until": {"token_ids": [2], "until": 10}})
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from engine.logits_processor import Arg, LogitsProcessor, Rows
from engine.request import LOGIT_BIAS_LIMIT


def logit_bias(k: int = 8) -> LogitsProcessor:
    """The built-in logit_bias for at most k tokens per row: token_ids [k] (-1: none) and their
    bias [k], clamped to [-100, 100] as the built-in clamps it."""
    return LogitsProcessor("logit_bias", _add_bias, {"token_ids": Arg((k,), "int32", -1, token_ids=True),
                                                     "bias": Arg((k,), "float32", 0.0)})


def _add_bias(logits: jax.Array, args: dict[str, jax.Array], rows: Rows) -> jax.Array:
    """logits [B, V] plus each row's clamped biases at its token ids (ids -1 add nothing)."""
    del rows
    bias = jnp.clip(args["bias"], -LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT)
    return logits.at[jnp.arange(logits.shape[0])[:, None], _ids(args["token_ids"], logits)].add(bias, mode="drop")


def occurrence_penalties() -> LogitsProcessor:
    """The built-in presence_penalty and frequency_penalty (OpenAI's formula over the generated
    tokens' counts), as a processor reading the request's counts on the device."""
    return LogitsProcessor("occurrence_penalties", _penalise, {"presence": Arg((), "float32", 0.0),
                                                               "frequency": Arg((), "float32", 0.0)},
                           reads_counts=True)


def _penalise(logits: jax.Array, args: dict[str, jax.Array], rows: Rows) -> jax.Array:
    """logits - frequency * count - presence * (count > 0), per row."""
    counts = rows.counts.astype(jnp.float32)
    return logits - args["frequency"][:, None] * counts - args["presence"][:, None] * (counts > 0)


def ban_until(k: int = 8) -> LogitsProcessor:
    """New: token_ids [k] (-1: none) get -inf while the output holds fewer than `until` tokens."""
    return LogitsProcessor("ban_until", _ban_until, {"token_ids": Arg((k,), "int32", -1, token_ids=True),
                                                     "until": Arg((), "int32", 0)})


def _ban_until(logits: jax.Array, args: dict[str, jax.Array], rows: Rows) -> jax.Array:
    """logits [B, V] with each row's token ids at -inf while rows.generated < until."""
    early = (rows.generated < args["until"])[:, None]
    ids = jnp.where(early, _ids(args["token_ids"], logits), logits.shape[-1])
    return logits.at[jnp.arange(logits.shape[0])[:, None], ids].set(-jnp.inf, mode="drop")


def _ids(token_ids: jax.Array, logits: jax.Array) -> jax.Array:
    """Token ids [B, k] with the padding -1 moved out of range (a scatter with mode="drop" skips it)."""
    return jnp.where(token_ids >= 0, token_ids, logits.shape[-1])
