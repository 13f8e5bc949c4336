"""One model's no-cache forward under a mesh layout: its step time, the collectives XLA inserted and
its largest logit difference from the single-device run (scripts/shard_experiment.py, notebook 03)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import time_ms
from models.loaded_model import LoadedModel, _forward
from sharding import RULES, make_mesh, shard_model
from sharding.hlo import collectives
from sharding.rules import batch_sharding


def parse_layout(text: str) -> tuple[dict[str, int], str]:
    """"tensor=2,expert=4:expert_dp" -> ({"tensor": 2, "expert": 4}, "expert_dp")."""
    axes, _, rules = text.partition(":")
    sizes = {}
    for item in axes.split(","):
        name, _, size = item.partition("=")
        sizes[name.strip()] = int(size)
    return sizes, rules or "default"


def time_step(loaded: LoadedModel, tokens: np.ndarray, iters: int) -> float:
    """Median seconds of one forward (blocking on the result)."""
    return time_ms(lambda: loaded.forward(tokens), iters) / 1e3


def run_layout(base: LoadedModel, tokens: np.ndarray, reference: np.ndarray, layout: str, iters: int = 5) -> dict:
    """Time and collectives of the forward under one layout; max |logits - single-device logits|."""
    sizes, rules_name = parse_layout(layout)
    mesh, rules = make_mesh(**sizes), RULES[rules_name]
    loaded = dataclasses.replace(base, model=shard_model(base.model, mesh, rules), mesh=mesh, rules=rules)
    graphdef, state = nnx.split(loaded.model)
    batch = jax.device_put(jnp.asarray(tokens, jnp.int32), batch_sharding(tokens.shape, mesh, rules))
    hlo = _forward.lower(graphdef, state, batch).compile().as_text()
    return {"layout": sizes, "rules": rules_name, "step_s": time_step(loaded, tokens, iters),
            "max_abs_diff": float(np.abs(np.asarray(loaded.forward(tokens)) - reference).max()),
            "collectives": collectives(hlo)}
