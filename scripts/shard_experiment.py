"""Run one model under several mesh layouts; step time and collective bytes side by side (JSON).

  python scripts/shard_experiment.py --model=tiny-gpt-oss \\
      --layouts="data=8;tensor=2,expert=4;data=2,tensor=2,expert=2" --batch=8 --seq=64

Each layout is "axis=size,..." over (data, tensor, expert) and an optional ":rules" suffix
(default, expert_dp, tensor_experts). The step is the no-cache forward of --batch x --seq tokens;
its logits are checked against the single-device run. On CPU (simulated devices) the times show
the overheads, not real interconnect costs; the collective bytes are what a GPU run would move.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app, flags

from benchmarks.mesh_layouts import run_layout, time_step
from models import load_model

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "tiny-gpt-oss", "Preset (random weights unless it ships weights).")
flags.DEFINE_string("layouts", "data=8;tensor=2,expert=4;data=2,tensor=2,expert=2",
                    "Semicolon-separated layouts: axis=size,...[:rules].")
flags.DEFINE_integer("batch", 8, "Rows per step.")
flags.DEFINE_integer("seq", 64, "Tokens per row.")
flags.DEFINE_integer("iters", 5, "Timed steps per layout (after one warm-up).")
flags.DEFINE_integer("devices", 8, "Simulated CPU devices (ignored on GPU).")


def main(argv: list[str]) -> None:
    del argv
    if jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_num_cpu_devices", FLAGS.devices)  # before the first backend use
    base = load_model(FLAGS.model)
    tokens = np.random.default_rng(0).integers(0, base.config.vocab_size, (FLAGS.batch, FLAGS.seq))
    reference = np.asarray(base.forward(tokens))
    results = [{"layout": {"devices": 1}, "rules": "none", "step_s": time_step(base, tokens, FLAGS.iters),
                "max_abs_diff": 0.0, "collectives": {}}]
    results += [run_layout(base, tokens, reference, layout, FLAGS.iters) for layout in FLAGS.layouts.split(";")]
    print(json.dumps({"model": FLAGS.model, "batch": FLAGS.batch, "seq": FLAGS.seq, "runs": results}, indent=2))


if __name__ == "__main__":
    app.run(main)
