"""Run one model under several mesh layouts; step time and collective bytes side by side (JSON).

  python scripts/shard_experiment.py --model=tiny-gpt-oss \\
      --layouts="data=8;tensor=2,expert=4;data=2,tensor=2,expert=2" --batch=8 --seq=64

Each layout is "axis=size,..." over (data, tensor, expert) and an optional ":rules" suffix
(default, expert_dp, tensor_experts). The step is the no-cache forward of --batch x --seq tokens;
its logits are checked against the single-device run. On CPU (simulated devices) the times show
the overheads, not real interconnect costs; the collective bytes are what a GPU run would move.
"""

from __future__ import annotations

import dataclasses
import json
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "tiny-gpt-oss", "Preset (random weights unless it ships weights).")
flags.DEFINE_string("layouts", "data=8;tensor=2,expert=4;data=2,tensor=2,expert=2",
                    "Semicolon-separated layouts: axis=size,...[:rules].")
flags.DEFINE_integer("batch", 8, "Rows per step.")
flags.DEFINE_integer("seq", 64, "Tokens per row.")
flags.DEFINE_integer("iters", 5, "Timed steps per layout (after one warm-up).")
flags.DEFINE_integer("devices", 8, "Simulated CPU devices (ignored on GPU).")


def parse_layout(text: str) -> tuple[dict[str, int], str]:
    """"tensor=2,expert=4:expert_dp" -> ({"tensor": 2, "expert": 4}, "expert_dp")."""
    axes, _, rules = text.partition(":")
    sizes = {}
    for item in axes.split(","):
        name, _, size = item.partition("=")
        sizes[name.strip()] = int(size)
    return sizes, rules or "default"


def time_step(loaded, tokens, iters: int) -> float:
    """Median seconds of one forward (blocking on the result)."""
    import jax
    jax.block_until_ready(loaded.forward(tokens))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(loaded.forward(tokens))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_layout(base, tokens, reference, layout: str) -> dict:
    """Time and collectives of the forward under one layout; max |logits - single-device logits|."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from models.loaded_model import _forward
    from sharding import RULES, make_mesh, shard_model
    from sharding.hlo import collectives
    from sharding.rules import batch_sharding
    sizes, rules_name = parse_layout(layout)
    mesh, rules = make_mesh(**sizes), RULES[rules_name]
    loaded = dataclasses.replace(base, model=shard_model(base.model, mesh, rules), mesh=mesh, rules=rules)
    graphdef, state = nnx.split(loaded.model)
    batch = jax.device_put(jnp.asarray(tokens, jnp.int32), batch_sharding(tokens.shape, mesh, rules))
    hlo = _forward.lower(graphdef, state, batch).compile().as_text()
    return {"layout": sizes, "rules": rules_name, "step_s": time_step(loaded, tokens, FLAGS.iters),
            "max_abs_diff": float(np.abs(np.asarray(loaded.forward(tokens)) - reference).max()),
            "collectives": collectives(hlo)}


def main(argv: list[str]) -> None:
    del argv
    import jax
    if jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_num_cpu_devices", FLAGS.devices)
    import numpy as np
    from models import load_model
    base = load_model(FLAGS.model)
    tokens = np.random.default_rng(0).integers(0, base.config.vocab_size, (FLAGS.batch, FLAGS.seq))
    reference = np.asarray(base.forward(tokens))
    results = [{"layout": {"devices": 1}, "rules": "none", "step_s": time_step(base, tokens, FLAGS.iters),
                "max_abs_diff": 0.0, "collectives": {}}]
    results += [run_layout(base, tokens, reference, layout) for layout in FLAGS.layouts.split(";")]
    print(json.dumps({"model": FLAGS.model, "batch": FLAGS.batch, "seq": FLAGS.seq, "runs": results}, indent=2))


if __name__ == "__main__":
    app.run(main)
