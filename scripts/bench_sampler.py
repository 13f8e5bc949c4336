"""Times the sampler's filter (engine/sampler.filtered_logits: temperature, top-k, top-p, min-p) on
a real model's next-token logits at top_p < 1, the case that needs the nucleus threshold; writes
JSON. Run it against two checkouts (PYTHONPATH) to compare implementations on the same logits.

  .venv/bin/python scripts/bench_sampler.py --output=benchmarks/results/cpu-sampler-top-p.json
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import engine
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.grounded import SOURCE, paragraphs
from benchmarks.timing import time_ms
from engine.request import SamplingParams
from engine.sampler import SamplingTensors, filtered_logits
from models import load_model

_OUTPUT = flags.DEFINE_string("output", None, "JSON file to write", required=True)
_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Model whose next-token logits are filtered.")
_ROWS = flags.DEFINE_list("rows", ["1", "8", "32"], "Batch sizes (rows of distinct prompts' logits).")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Every row's top_p.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Every row's temperature.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed calls per measurement (median reported).")


def next_token_logits(model_name: str, rows: int) -> jax.Array:
    """[rows, V] logits after the first 24 tokens of distinct prose paragraphs."""
    model = load_model(model_name)
    encoded = [model.tokenizer.encode(t) for t in paragraphs(SOURCE.read_text())]
    ids = np.asarray([e[:24] for e in encoded if len(e) >= 24][:rows], np.int32)
    return jnp.asarray(model.forward(ids))[:, -1]


def measure(logits: jax.Array) -> dict:
    """Median ms of one filter call on `logits`, and how many tokens each row keeps."""
    rows, vocab = logits.shape
    params = [SamplingParams(temperature=_TEMPERATURE.value, top_p=_TOP_P.value)] * rows
    tensors = SamplingTensors.build(params, [0] * rows, rows)
    fn = jax.jit(filtered_logits)
    kept = np.isfinite(np.asarray(fn(logits, tensors))).sum(axis=-1)
    ms = time_ms(lambda: fn(logits, tensors), _ITERS.value)
    print(f"{rows:3d} x {vocab}: {ms:9.2f} ms; tokens kept per row {int(kept.min())}-{int(kept.max())}")
    return {"rows": rows, "vocab": vocab, "top_p": _TOP_P.value, "temperature": _TEMPERATURE.value, "ms": ms,
            "kept_min": int(kept.min()), "kept_max": int(kept.max())}


def main(argv: list[str]) -> None:
    del argv
    rows = [int(r) for r in _ROWS.value]
    logits = next_token_logits(_MODEL.value, max(rows))
    points = [measure(logits[:r]) for r in rows]
    tree = Path(engine.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    device = jax.devices()[0]
    report = {"model": _MODEL.value, "engine_tree": str(tree), "commit": commit, "device": device.device_kind,
              "platform": device.platform, "jax_version": jax.__version__, "points": points}
    with open(_OUTPUT.value, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
