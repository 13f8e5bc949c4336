"""Host time per engine step on a model whose device work is ~0 (tiny-llama): where the step's
wall time goes when the device is never the bottleneck.

    .venv/bin/python scripts/profile_step.py --output=benchmarks/results/cpu-tiny-llama-step-host.json

Runs `--requests` requests (prompts of `--prompt_len`, `--max_tokens` greedy tokens, at most
`--max_num_seqs` at once) step by step after a warm-up, and reports the median wall time of a
step by kind (steps that run a mixed ragged call, and decode steps), split into schedule,
dispatch (input arrays built and the jitted call launched), apply (output processing) and the
rest (mostly waiting for the sampled tokens), plus the whole run's wall time.
"""

from __future__ import annotations

import collections
import json
import statistics
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from engine import LLM, SamplingParams

_MODEL = flags.DEFINE_string("model", "tiny-llama", "Preset or checkpoint.")
_REQUESTS = flags.DEFINE_integer("requests", 64, "Requests in the run.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 48, "Prompt tokens per request.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Generated tokens per request.")
_MAX_NUM_SEQS = flags.DEFINE_integer("max_num_seqs", 32, "Engine concurrency.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 4, "Engine decode steps per call.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed runs of the workload (medians over them).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file to write.", required=True)


class Timer:
    """Accumulates wall seconds per label for the current step."""

    def __init__(self):
        self.current: dict[str, float] = collections.defaultdict(float)

    def wrap(self, obj: object, name: str, label: str) -> None:
        """Time obj.name under `label` (absent on older engines: left alone, so runs still compare)."""
        fn = getattr(obj, name, None)
        if fn is None:
            return

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[label] += time.perf_counter() - start
        setattr(obj, name, timed)


def run(llm: LLM, timer: Timer) -> dict[str, list[dict[str, float]]]:
    """Every step's parts (ms), grouped by step kind."""
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=_MAX_TOKENS.value, ignore_eos=True)
    for _ in range(_REQUESTS.value):
        llm.add_request([int(t) for t in rng.integers(0, llm.model.config.vocab_size, _PROMPT_LEN.value)], params)
    steps = collections.defaultdict(list)
    while llm.has_unfinished():
        timer.current.clear()
        start = time.perf_counter()
        llm.step()
        parts = {k: 1e3 * v for k, v in timer.current.items()}
        parts["step"] = 1e3 * (time.perf_counter() - start)
        parts["rest"] = parts["step"] - sum(v for k, v in parts.items() if k != "step")
        steps["mixed" if "dispatch_mixed" in parts else "decode"].append(parts)
    return steps


def summary(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median ms of each part over the steps of one kind."""
    keys = sorted({k for s in steps for k in s})
    return {"steps": len(steps), **{f"{k}_ms": statistics.median(s.get(k, 0.0) for s in steps) for k in keys}}


def main(argv: list[str]) -> None:
    del argv
    llm = LLM(_MODEL.value, max_num_seqs=_MAX_NUM_SEQS.value, max_model_len=_PROMPT_LEN.value + _MAX_TOKENS.value + 8,
              decode_steps=_DECODE_STEPS.value, page_size=16, max_num_batched_tokens=512, prefill_chunk=256)
    llm.warmup()
    timer = Timer()
    timer.wrap(llm.scheduler, "schedule", "schedule")
    timer.wrap(llm.runner, "run_mixed_arrays", "dispatch_mixed")
    timer.wrap(llm.runner, "run_decode_arrays", "dispatch_decode")
    timer.wrap(getattr(llm, "processor", None), "apply", "apply")
    run(llm, timer)  # warm caches (Python and XLA)
    walls, steps = [], collections.defaultdict(list)
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        for kind, parts in run(llm, timer).items():
            steps[kind] += parts
        walls.append(time.perf_counter() - start)
    wall = statistics.median(walls)
    report = {"model": _MODEL.value, "requests": _REQUESTS.value, "prompt_len": _PROMPT_LEN.value,
              "max_tokens": _MAX_TOKENS.value, "max_num_seqs": _MAX_NUM_SEQS.value, "decode_steps": _DECODE_STEPS.value,
              "attention": {k: getattr(getattr(llm, "attention", None), k, None) for k in ("decode", "mixed")},
              "run_s": wall, "run_s_all": walls, "output_tok_s": _REQUESTS.value * _MAX_TOKENS.value / wall,
              "kinds": {kind: summary(s) for kind, s in steps.items()}}
    output = Path(_OUTPUT.value)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("run_s", "output_tok_s", "kinds")}, indent=1))


if __name__ == "__main__":
    app.run(main)
