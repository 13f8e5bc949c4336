"""FP8 KV cache vs the model-dtype cache (benchmarks/fp8_kv_accuracy.py): max and mean |Δlogit| and
greedy agreement at every position of fixed prompts, per model and dtype (JSON out).

    .venv/bin/python scripts/fp8_kv_accuracy.py [--output=benchmarks/results/fp8-kv-accuracy-cpu.json]
"""

from __future__ import annotations

import datetime
import json
import pathlib

import jax
from absl import app, flags

from benchmarks.fp8_kv_accuracy import compare
from models import load_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
_OUTPUT = flags.DEFINE_string("output", str(ROOT / "benchmarks" / "results" / "fp8-kv-accuracy-cpu.json"),
                              "Where the JSON goes.")
_MODELS = flags.DEFINE_list("models", ["tiny-llama", "tiny-deepseek-v3"], "Presets (random weights) or paths.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Model dtypes to compare in.")


def main(argv: list[str]) -> None:
    del argv
    results = [compare(load_model(name, dtype=dtype), name) for name in _MODELS.value for dtype in _DTYPES.value]
    report = {"date": datetime.date.today().isoformat(), "jax": jax.__version__, "backend": jax.default_backend(),
              "reference": "the same model with kv_cache_dtype='auto' (its dtype's pool), jnp attention path",
              "results": results}
    pathlib.Path(_OUTPUT.value).write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(f"{r['model']} {r['dtype']}: max |dlogit| {r['max_abs_dlogit']:.3g}, mean {r['mean_abs_dlogit']:.3g} "
              f"(logit std {r['logit_std']:.3g}), greedy agreement {r['greedy_agreement']:.3f}")


if __name__ == "__main__":
    app.run(main)
