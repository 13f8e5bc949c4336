"""Where a loaded engine's time goes: the served workload (random ISL / OSL, ignore_eos) as an
in-process closed loop at each concurrency, every step timed by kind; writes JSON.

    .venv/bin/python scripts/profile_serving.py --concurrency=8,32 \
        --output=benchmarks/results/cpu-smollm2-step-profile.json

Kinds: `mixed` (prefill tokens, with or without decodes beside them), `decode` (one decode step
per call), `decode_multi` (decode_steps steps per call). Per kind: steps, total and median wall
seconds, median host seconds (wall minus the time blocked on the results), mean flat, prefill
and decode tokens; per point the time each request queued before its first token was scheduled,
its output metrics and the adaptive policies' measurements (engine/step_costs.py). It wraps the
scheduler's `schedule` and the step-cost recorder to see each step: the engine is unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from benchmarks import roofline
from benchmarks.metrics import point_metrics
from benchmarks.serving_sweep import run_closed_loop
from benchmarks.workloads import make_workload
from engine import LLM
from engine.config import optional_number_arg
from models import load_model

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Preset or checkpoint.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Weights and KV dtype.")
_CONCURRENCY = flags.DEFINE_list("concurrency", ["8", "32"], "Concurrency points.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", None, "Requests per point (default 6 x concurrency, >= 48).")
_ISL = flags.DEFINE_integer("isl", 256, "Longest prompt (lengths uniform in [0.8 L, L]).")
_OSL = flags.DEFINE_integer("osl", 64, "Longest output.")
_BUDGET = flags.DEFINE_integer("max_num_batched_tokens", None, "Token budget (default: the platform's).")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 4, "Most decode steps per call.")
_MIN_GAIN = flags.DEFINE_string("multi_step_min_gain", "auto", "EngineConfig.multi_step_min_gain: a number, none or auto.")
_RATIO = flags.DEFINE_string("mixed_step_ratio", "auto", "EngineConfig.mixed_step_ratio: a number, none or auto.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file to write.", required=True)


@dataclasses.dataclass
class StepLog:
    """Each step's scheduled work and measured cost, and when each request was first scheduled."""

    steps: list[dict] = dataclasses.field(default_factory=list)
    first_scheduled: dict[int, float] = dataclasses.field(default_factory=dict)

    def attach(self, llm: LLM) -> None:
        """Wrap llm's scheduler and step-cost recorder (instance attributes only) to log every step."""
        schedule, observe = llm.scheduler.schedule, llm.costs.observe

        def logged_schedule():
            out = schedule()
            now = time.perf_counter()
            for s in out.scheduled:
                self.first_scheduled.setdefault(s.request.request_id, now)
            prefill = sum(s.num_tokens for s in out.scheduled if s.request.is_prefilling)
            self.steps.append({"kind": _kind(out), "prefill": prefill, "decodes": len(out.scheduled) -
                               sum(s.request.is_prefilling for s in out.scheduled)})
            return out

        def logged_observe(tokens: int, seconds: float, wait_s: float, steps: int = 1, decode_only: bool = False):
            self.steps[-1] |= {"tokens": tokens, "seconds": seconds, "host_s": max(0.0, seconds - wait_s)}
            observe(tokens, seconds, wait_s, steps, decode_only)

        llm.scheduler.schedule, llm.costs.observe = logged_schedule, logged_observe


def _kind(out) -> str:
    if not out.is_decode_only:
        return "mixed"
    return "decode" if out.decode_steps == 1 else "decode_multi"


def summarize(steps: list[dict]) -> dict:
    """Per kind: count, seconds, medians and mean token counts (steps that ran to the end only)."""
    by_kind = collections.defaultdict(list)
    for s in steps:
        if "seconds" in s:
            by_kind[s["kind"]].append(s)
    out = {}
    for kind, rows in sorted(by_kind.items()):
        col = {k: np.array([r[k] for r in rows], float) for k in ("seconds", "host_s", "tokens", "prefill", "decodes")}
        out[kind] = {"steps": len(rows), "total_s": float(col["seconds"].sum()),
                     "median_ms": 1e3 * float(np.median(col["seconds"])),
                     "p99_ms": 1e3 * float(np.percentile(col["seconds"], 99)),
                     "median_host_ms": 1e3 * float(np.median(col["host_s"])),
                     "mean_tokens": float(col["tokens"].mean()), "mean_prefill_tokens": float(col["prefill"].mean()),
                     "mean_decodes": float(col["decodes"].mean())}
    return out


def decode_roofline_ms(llm: LLM, c: int, peaks: roofline.DevicePeaks) -> float:
    """The roofline time of a decode step of c sequences at the workload's mean context."""
    item = np.dtype(llm.model.dtype).itemsize
    context = int(0.9 * _ISL.value + _OSL.value / 2)
    return 1e3 * peaks.seconds(roofline.decode_step_cost(llm.model.config, [context] * c, item, item))


def profile_point(llm: LLM, c: int, n: int, peaks: roofline.DevicePeaks) -> dict:
    """A warm-up wave on other prompts, then the logged closed loop of n requests at concurrency c."""
    vocab = llm.model.config.vocab_size
    run_closed_loop(llm, make_workload(0, c, _ISL.value, _OSL.value, 1.0, vocab, stream=10_000 + c), c, 0.0,
                    f"warm-up c={c}")
    log, done = StepLog(), []
    log.attach(llm)
    workload = make_workload(0, n, _ISL.value, _OSL.value, 0.8, vocab, stream=c)
    timings, duration = run_closed_loop(llm, workload, c, 0.0, f"profile c={c}", done)
    del llm.scheduler.schedule, llm.costs.observe  # back to the class's methods
    queued = [log.first_scheduled[r.request_id] - r.metrics.arrival for r in done]
    line = llm.costs.line()
    return {"concurrency": c, "num_requests": n, "duration_s": duration,
            "metrics": dataclasses.asdict(point_metrics(timings, c, 1, duration)),
            "steps": summarize(log.steps),
            "queued_ms": {"median": 1e3 * float(np.median(queued)), "p99": 1e3 * float(np.percentile(queued, 99))},
            "step_cost_line": None if line is None else {"fixed_ms": 1e3 * line[0], "per_token_ms": 1e3 * line[1]},
            "decode_host_share": llm.costs.host_share(), "decode_roofline_ms": decode_roofline_ms(llm, c, peaks)}


def main(argv: list[str]) -> None:
    del argv
    concurrencies = [int(c) for c in _CONCURRENCY.value]
    model = load_model(_MODEL.value, dtype=_DTYPE.value)
    llm = LLM(model, max_num_seqs=max(concurrencies), max_model_len=_ISL.value + _OSL.value,
              max_num_batched_tokens=_BUDGET.value, decode_steps=_DECODE_STEPS.value, enable_prefix_caching=False,
              **optional_number_arg("multi_step_min_gain", _MIN_GAIN.value),
              **optional_number_arg("mixed_step_ratio", _RATIO.value))
    llm.warmup()
    peaks = roofline.device_peaks(_DTYPE.value)
    points = [profile_point(llm, c, _NUM_PROMPTS.value or max(48, 6 * c), peaks) for c in concurrencies]
    report = {"model": _MODEL.value, "dtype": _DTYPE.value, "isl": _ISL.value, "osl": _OSL.value,
              "engine": {k: v for k, v in dataclasses.asdict(llm.config).items() if not isinstance(v, tuple)},
              "peaks": {"bandwidth_gb_s": peaks.bandwidth / 1e9, "tflop_s": peaks.flops / 1e12, "source": peaks.source},
              "points": points}
    Path(_OUTPUT.value).write_text(json.dumps(report, indent=1) + "\n")
    for p in points:
        print(f"c={p['concurrency']}: {p['metrics']['output_tok_s']:.1f} output tok/s, TPOT p50 "
              f"{p['metrics']['tpot_ms']['median']:.0f} ms (decode roofline {p['decode_roofline_ms']:.0f}), queued p50 "
              f"{p['queued_ms']['median']:.0f} ms; " + "; ".join(
                  f"{k} {v['steps']} steps {v['total_s']:.1f} s (median {v['median_ms']:.0f} ms, host "
                  f"{v['median_host_ms']:.1f} ms, {v['mean_prefill_tokens']:.0f} prefill + {v['mean_decodes']:.1f} decodes)"
                  for k, v in p["steps"].items()))


if __name__ == "__main__":
    app.run(main)
