"""The serving benchmark's concurrency sweep (scripts/benchmark_serving.py, notebook 04): closed-loop
points in process, through a server or on the baselines, each scored into one JSON record."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from benchmarks import http_client, roofline
from benchmarks.compilations import count_compilations
from benchmarks.grounded import grounded_workload
from benchmarks.metrics import RequestTiming, cost_per_million_tokens, point_metrics
from benchmarks.workloads import Workload, make_workload
from engine.llm import LLM
from engine.request import SamplingParams
from engine.speculative.metrics import SpecMetrics
from models import ModelConfig

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every point shares: lengths, sampling, device pricing and roofline peaks."""

    isl: int
    osl: int
    range_ratio: float
    seed: int
    temperature: float
    hourly_rate: float
    num_devices: int
    peaks: roofline.DevicePeaks
    warmup: bool
    shared_prefix_len: int = 0
    num_turns: int = 1
    workload: str = "random"


@dataclasses.dataclass(frozen=True)
class BaselineSpec:
    """Which baselines run, where (venv python, GGUF) and how much of each point they get."""

    systems: list[str]
    python: str
    gguf: Path
    dtype: str
    batches: int  # transformers: batches of `concurrency` prompts per point
    llamacpp_prompts: int


def prefix_caching_values(values: list[str]) -> list[bool]:
    """The prefix-caching settings to sweep, from true/false (or 1/0) strings, in order."""
    table = {"true": True, "1": True, "false": False, "0": False}
    bad = [v for v in values if v.lower() not in table]
    if bad or not values:
        raise ValueError(f"prefix caching takes true/false values, got {values}")
    return [table[v.lower()] for v in values]


def settings_workload(settings: Settings, n: int, ratio: float, vocab_size: int, stream: int) -> Workload:
    """make_workload with the settings' lengths, seed, shared prefix and turns."""
    return make_workload(settings.seed, n, settings.isl, settings.osl, ratio, vocab_size, stream,
                         settings.shared_prefix_len, settings.num_turns)


def point_workload(llm: LLM, settings: Settings, n: int, ratio: float, stream: int) -> Workload:
    """The point's prompts: README passages (grounded), else random tokens with the settings' shared
    prefix and turns."""
    if settings.workload == "grounded":
        return grounded_workload(llm.model.tokenizer, settings.seed, n, settings.isl, settings.osl, ratio, stream)
    return settings_workload(settings, n, ratio, llm.model.config.vocab_size, stream)


def run_closed_loop(llm: LLM, workload: Workload, concurrency: int, temperature: float,
                    desc: str, finished: list | None = None) -> tuple[list[RequestTiming], float]:
    """Keep exactly `concurrency` requests in flight until all finish; timings and wall seconds
    (the finished requests are appended to `finished` when given)."""
    pending = collections.deque(zip(workload.prompts, workload.output_lens))
    in_flight, done = set(), []
    start = time.perf_counter()
    with tqdm(total=len(pending), desc=desc, leave=False) as bar:
        while pending or in_flight:
            while pending and len(in_flight) < concurrency:
                prompt, n = pending.popleft()
                params = SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True)
                in_flight.add(llm.add_request(prompt, params))
            for request in llm.step():
                in_flight.discard(request)
                done.append(request)
                bar.update(1)
    duration = time.perf_counter() - start
    if finished is not None:
        finished.extend(done)
    timings = [RequestTiming(r.metrics.arrival, tuple(r.metrics.token_times), len(r.prompt_token_ids)) for r in done]
    return timings, duration


def roofline_summary(config: ModelConfig, workload: Workload, concurrency: int, duration: float,
                     peaks: roofline.DevicePeaks, weight_bytes: float, kv_bytes: int) -> dict:
    """Ideal (roofline) seconds for this point's work and the fraction of it the run reached."""
    ideal = roofline.ideal_serving_seconds(config, [len(p) for p in workload.prompts], workload.output_lens,
                                           concurrency, peaks, weight_bytes, kv_bytes)
    context = int(np.mean([len(p) for p in workload.prompts]) + np.mean(workload.output_lens) / 2)
    step = peaks.seconds(roofline.decode_step_cost(config, [context] * concurrency, weight_bytes, kv_bytes))
    return {"ideal_s": ideal, "fraction": ideal / duration, "decode_bound_tok_s": concurrency / step,
            "weight_bytes_per_param": weight_bytes, "kv_bytes_per_value": kv_bytes}


def score_point(system: str, dtype: str, timings: list[RequestTiming], duration: float, concurrency: int,
                settings: Settings, roof: dict) -> dict:
    """One point's JSON record: metrics, interactivity, cost and roofline fraction."""
    m = point_metrics(timings, concurrency, settings.num_devices, duration)
    record = {"system": system, "dtype": dtype, **dataclasses.asdict(m), "speculation": None}
    record["cost_per_million_output_tokens_usd"] = cost_per_million_tokens(settings.hourly_rate, m.output_tok_s)
    record["cost_per_million_total_tokens_usd"] = cost_per_million_tokens(settings.hourly_rate, m.total_tok_s)
    record["roofline"] = roof
    return record


def engine_points(llm: LLM, settings: Settings, concurrencies: list[int], num_prompts: list[int],
                  dtype: str) -> list[dict]:
    """The engine's sweep: every shape bucket compiled first, per point a warm-up wave, then the
    scored closed loop (each point records the compilations it saw: 0 unless a bucket was missed)."""
    config, item = llm.model.config, jnp.dtype(llm.model.dtype).itemsize
    points = []
    system = "jaxserve+prefix_cache" if llm.config.enable_prefix_caching else "jaxserve"
    if settings.warmup:
        start = time.perf_counter()
        logging.info("compiled %d shape buckets in %.0f s", llm.warmup(), time.perf_counter() - start)
    for c, n in zip(concurrencies, num_prompts):
        if settings.warmup:
            warm = point_workload(llm, settings, c, 1.0, 10_000 + c)
            run_closed_loop(llm, warm, c, settings.temperature, f"warm-up c={c}")
        workload = point_workload(llm, settings, n, settings.range_ratio, c)
        before, done = dataclasses.replace(llm.prefix_cache.stats), []
        with count_compilations() as compilations:
            timings, duration = run_closed_loop(llm, workload, c, settings.temperature, f"{system} c={c}", done)
        cache = llm.prefix_cache.stats.since(before)
        roof = roofline_summary(config, workload, c, duration, settings.peaks, item, item)
        points.append({**score_point(system, dtype, timings, duration, c, settings, roof),
                       "compilations": compilations[0], "speculation": speculation_summary(llm, done),
                       "prefix_cache": {"enabled": llm.config.enable_prefix_caching, "queries": cache.queries,
                                        "hits": cache.hits, "hit_rate": cache.hit_rate}})
        logging.info("%s c=%d: %.1f output tok/s, %.1f tok/s/user, roofline %.0f%%, %d compilations, prefix cache "
                     "hits %d of %d prompt tokens (%.0f%%)", system, c, points[-1]["output_tok_s"],
                     points[-1]["interactivity"], 100 * roof["fraction"], compilations[0], cache.hits, cache.queries,
                     100 * cache.hit_rate)
    return points


def speculation_summary(llm: LLM, done: list) -> dict | None:
    """The point's speculative config and its summed counters (None without speculation)."""
    if llm.speculator is None:
        return None
    total = SpecMetrics()
    for request in done:
        total.merge(request.metrics.speculation)
    config = {k: v for k, v in dataclasses.asdict(llm.speculator.config).items() if v is not None}
    return {**config, **total.summary()}


def served_points(info: http_client.ServerInfo, settings: Settings, concurrencies: list[int],
                  num_prompts: list[int], dtype: str, config: ModelConfig, api_key: str | None) -> list[dict]:
    """engine_points through the server: per point a warm-up wave, then the scored closed loop
    (the server compiles its buckets itself: start ours with --warmup)."""
    points = []
    item = jnp.dtype(dtype).itemsize
    for c, n in zip(concurrencies, num_prompts):
        if settings.warmup:
            warm = make_workload(settings.seed, c, settings.isl, settings.osl, 1.0, config.vocab_size, 10_000 + c)
            http_client.run_closed_loop(info, warm.prompts, warm.output_lens, c, settings.temperature, api_key)
        workload = make_workload(settings.seed, n, settings.isl, settings.osl, settings.range_ratio, config.vocab_size, c)
        timings, duration = http_client.run_closed_loop(info, workload.prompts, workload.output_lens, c,
                                                        settings.temperature, api_key)
        roof = roofline_summary(config, workload, c, duration, settings.peaks, item, item)
        points.append({**score_point(info.system, dtype, timings, duration, c, settings, roof), "client": "http"})
        logging.info("c=%d (served): %.1f output tok/s, %.1f tok/s/user, TTFT p50 %.0f ms", c,
                     points[-1]["output_tok_s"], points[-1]["interactivity"], points[-1]["ttft_ms"]["median"])
    return points


def baseline_job(spec: BaselineSpec, settings: Settings, concurrencies: list[int], vocab: int) -> dict:
    """The job file for scripts/baselines.py: each system's points with the engine's own prompts."""
    def point(c: int, n: int) -> dict:
        w = settings_workload(settings, n, settings.range_ratio, vocab, c)
        return {"concurrency": c, "prompts": w.prompts, "output_lens": w.output_lens}
    points = {"transformers": [point(c, c * spec.batches) for c in concurrencies],
              "llamacpp": [point(1, spec.llamacpp_prompts)] if 1 in concurrencies else []}
    return {"gguf": str(spec.gguf), "dtype": spec.dtype, "threads": os.cpu_count(),
            "systems": {s: points[s] for s in spec.systems}}


def run_baselines(spec: BaselineSpec, settings: Settings, concurrencies: list[int],
                  config: ModelConfig) -> tuple[list[dict], dict]:
    """Run scripts/baselines.py in the baseline venv; score its timings like the engine's."""
    job = baseline_job(spec, settings, concurrencies, config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp, "job.json"), Path(tmp, "timings.json")
        job_path.write_text(json.dumps(job))
        subprocess.run([spec.python, str(REPO / "scripts/baselines.py"), f"--job={job_path}",
                        f"--output={out_path}"], check=True)
        result = json.loads(out_path.read_text())
    item = jnp.dtype(spec.dtype).itemsize
    dtype_bytes = {"transformers": (item, item),
                   "llamacpp": (20 / 32, 2)}  # Q4_1: 20 bytes per 32 weights; f16 KV cache
    points = []
    for system in spec.systems:
        for raw, sent in zip(result[system], job["systems"][system]):
            timings = [RequestTiming(r["arrival"], tuple(r["token_times"]), r["num_prompt_tokens"])
                       for r in raw["requests"]]
            workload = Workload(sent["prompts"], sent["output_lens"])
            roof = roofline_summary(config, workload, raw["concurrency"], raw["duration_s"], settings.peaks,
                                    *dtype_bytes[system])
            label = "Q4_1" if system == "llamacpp" else spec.dtype
            points.append(score_point(system, label, timings, raw["duration_s"], raw["concurrency"], settings, roof))
    return points, result["versions"]
