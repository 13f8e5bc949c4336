"""Native (packed) vs dequantized-at-load serving of the quantized fixtures, per format and dtype:
max and mean |delta logit| and greedy agreement over fixed prompts (JSON out).

    .venv/bin/python scripts/quantized_accuracy.py [--output=benchmarks/results/quantized-accuracy-cpu.json]
"""

from __future__ import annotations

import datetime
import json
import pathlib

import jax
from absl import app, flags

from benchmarks.quantized_accuracy import compare

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ("quantized-gpt-oss-mxfp4-hf", "quantized-deepseek-v3-fp8-hf")  # scripts/make_quantized_fixtures.py
_OUTPUT = flags.DEFINE_string("output", str(ROOT / "benchmarks" / "results" / "quantized-accuracy-cpu.json"),
                              "Where the JSON goes.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Model dtypes to compare in.")


def main(argv: list[str]) -> None:
    del argv
    results = [compare(ROOT / "tests" / "fixtures" / name, dtype) for name in FIXTURES for dtype in _DTYPES.value]
    report = {"date": datetime.date.today().isoformat(), "jax": jax.__version__, "backend": jax.default_backend(),
              "reference": "the same checkpoint dequantized at load (weights=<dtype>)", "results": results}
    pathlib.Path(_OUTPUT.value).write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(f"{r['checkpoint']} {r['numerics']} {r['dtype']}: max |dlogit| {r['max_abs_dlogit']:.3g}, "
              f"mean {r['mean_abs_dlogit']:.3g} (logit std {r['logit_std']:.3g}), greedy agreement "
              f"{r['greedy_agreement']:.3f}")


if __name__ == "__main__":
    app.run(main)
