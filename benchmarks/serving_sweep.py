"""The serving benchmark's concurrency sweep (scripts/benchmark_serving.py, notebook 04): closed-loop
points in process, through a server or on the baselines, each scored into one JSON record; agentic
sessions (benchmarks/workloads.py) in process or served, scored per turn too."""

from __future__ import annotations

import collections
import contextlib
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
from benchmarks.metrics import (RequestTiming, StateSample, TurnResult, cost_per_million_tokens, point_metrics,
                                state_summary, turn_summary)
from benchmarks.workloads import AgentSession, Workload, agentic_sessions, make_workload
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
    workload: str = "random"  # random, grounded, a shape (8k1k ...: random at its scaled lengths) or agentic
    scale: float = 1.0  # a shape's lengths: isl and osl above are already scaled
    tool_result_len: int = 0  # agentic: tool result tokens per turn (max; isl is the user message's)
    num_sessions: int | None = None  # agentic: sessions per point (default: the concurrency)
    think_time_s: float = 0.0  # agentic: mean seconds between a turn's reply and the next turn
    think_time_dist: str = "fixed"  # fixed or exponential
    metrics_interval_s: float = 0.25  # served: /metrics scrape period

    @property
    def agentic(self) -> bool:
        return self.workload == "agentic"


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


def settings_sessions(settings: Settings, n: int, ratio: float, vocab_size: int, stream: int,
                      num_turns: int | None = None) -> list[AgentSession]:
    """agentic_sessions with the settings' lengths, seed, system prompt, turns and think times."""
    return agentic_sessions(settings.seed, n, num_turns or settings.num_turns, settings.isl, settings.tool_result_len,
                            settings.osl, ratio, vocab_size, stream, settings.shared_prefix_len,
                            settings.think_time_s, settings.think_time_dist)


def sessions_workload(sessions: list[AgentSession]) -> Workload:
    """Every request of the sessions as one Workload (for the roofline)."""
    turns = [(s, t) for s in sessions for t in range(len(s.turns))]
    return Workload([s.prompt(t) for s, t in turns], [s.output_len(t) for s, t in turns])


def point_workload(llm: LLM, settings: Settings, n: int, ratio: float, stream: int) -> Workload:
    """The point's prompts: README passages (grounded), else random tokens with the settings' shared
    prefix and turns."""
    if settings.workload == "grounded":
        return grounded_workload(llm.model.tokenizer, settings.seed, n, settings.isl, settings.osl, ratio, stream)
    return settings_workload(settings, n, ratio, llm.model.config.vocab_size, stream)


def engine_state(llm: LLM) -> StateSample:
    """The engine's KV-cache usage (pages held / pool), running and waiting requests and prefix-cache
    totals: what the server's /metrics shows."""
    allocator, scheduler, stats = llm.allocator, llm.scheduler, llm.prefix_cache.stats
    return StateSample((allocator.capacity - allocator.num_free) / max(1, allocator.capacity),
                       len(scheduler.running), len(scheduler.waiting), stats.queries, stats.hits)


@contextlib.contextmanager
def prefix_hits_by_request(llm: LLM):
    """{request id: prompt tokens the prefix cache served it} for the requests admitted inside (a
    readmission after preemption adds), counted by wrapping the cache's `record`."""
    cache, hits = llm.prefix_cache, collections.Counter()
    record = cache.record

    def counting(request, num_hit_pages: int) -> None:
        record(request, num_hit_pages)
        hits[request.request_id] += num_hit_pages * cache.page_size
    cache.record = counting
    try:
        yield hits
    finally:
        del cache.record  # the class's method again


def run_agentic(llm: LLM, sessions: list[AgentSession], concurrency: int, temperature: float, desc: str,
                samples: list | None = None) -> tuple[list[TurnResult], float]:
    """`concurrency` sessions at once (the next starts when one ends), each adding its turns in
    order, turn t (its whole conversation so far) once the previous one finished and turn t's think
    time passed; every request's TurnResult and the wall seconds (the engine's state after every
    step appended to `samples` when given)."""
    pending = collections.deque(enumerate(sessions))
    active: dict[int, list] = {}  # session index -> [next turn, when it may be sent (None: in flight)]
    in_flight, done = {}, []
    with prefix_hits_by_request(llm) as hits, tqdm(total=sum(len(s.turns) for s in sessions), desc=desc,
                                                   leave=False) as bar:
        start = time.perf_counter()
        while pending or active:
            now = time.perf_counter()
            while pending and len(active) < concurrency:
                active[pending.popleft()[0]] = [0, now]
            for i, state in active.items():
                if state[1] is not None and state[1] <= now:
                    session, t = sessions[i], state[0]
                    params = SamplingParams(temperature=temperature, max_tokens=session.output_len(t), ignore_eos=True)
                    in_flight[llm.add_request(session.prompt(t), params)] = i
                    state[1] = None
            if not in_flight:  # every active session is thinking
                time.sleep(max(0.0, min(s[1] for s in active.values()) - time.perf_counter()))
                continue
            for request in llm.step():
                i = in_flight.pop(request)
                t = active[i][0]
                timing = RequestTiming(request.metrics.arrival, tuple(request.metrics.token_times),
                                       len(request.prompt_token_ids))
                done.append(TurnResult(i, t, timing, hits[request.request_id] if llm.prefix_cache.enabled else None))
                bar.update(1)
                if t + 1 == len(sessions[i].turns):
                    del active[i]
                else:
                    active[i] = [t + 1, time.perf_counter() + sessions[i].turns[t + 1].think_s]
            if samples is not None:
                samples.append(engine_state(llm))
        duration = time.perf_counter() - start
    return done, duration


def run_closed_loop(llm: LLM, workload: Workload, concurrency: int, temperature: float,
                    desc: str, finished: list | None = None,
                    samples: list | None = None) -> tuple[list[RequestTiming], float]:
    """Keep exactly `concurrency` requests in flight until all finish; timings and wall seconds
    (the finished requests are appended to `finished` when given, the engine's state after every
    step to `samples`)."""
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
            if samples is not None:
                samples.append(engine_state(llm))
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
        if settings.agentic:
            points.append(agentic_engine_point(llm, settings, c, dtype, system))
            continue
        if settings.warmup:
            warm = point_workload(llm, settings, c, 1.0, 10_000 + c)
            run_closed_loop(llm, warm, c, settings.temperature, f"warm-up c={c}")
        workload = point_workload(llm, settings, n, settings.range_ratio, c)
        before, done, samples = dataclasses.replace(llm.prefix_cache.stats), [], []
        state = engine_state(llm)
        with count_compilations() as compilations:
            timings, duration = run_closed_loop(llm, workload, c, settings.temperature, f"{system} c={c}", done,
                                                samples)
        cache = llm.prefix_cache.stats.since(before)
        roof = roofline_summary(config, workload, c, duration, settings.peaks, item, item)
        points.append({**score_point(system, dtype, timings, duration, c, settings, roof),
                       "compilations": compilations[0], "speculation": speculation_summary(llm, done),
                       "prefix_cache": {"enabled": llm.config.enable_prefix_caching, "queries": cache.queries,
                                        "hits": cache.hits, "hit_rate": cache.hit_rate},
                       "server_state": state_summary(state, engine_state(llm), samples, "engine")})
        logging.info("%s c=%d: %.1f output tok/s, %.1f tok/s/user, roofline %.0f%%, %d compilations, prefix cache "
                     "hits %d of %d prompt tokens (%.0f%%)", system, c, points[-1]["output_tok_s"],
                     points[-1]["interactivity"], 100 * roof["fraction"], compilations[0], cache.hits, cache.queries,
                     100 * cache.hit_rate)
    return points


def agentic_record(settings: Settings, results: list[TurnResult], num_sessions: int) -> dict:
    """A point's `agentic` section: the sessions' shape and per-turn TTFT, E2E and prefix-cache hits."""
    return {"num_sessions": num_sessions, "num_turns": settings.num_turns, "tool_result_len": settings.tool_result_len,
            "think_time_s": settings.think_time_s, "think_time_dist": settings.think_time_dist,
            "turns": turn_summary(results)}


def agentic_engine_point(llm: LLM, settings: Settings, c: int, dtype: str, system: str) -> dict:
    """One agentic point in process: a warm-up wave of one-turn sessions, then the scored sessions,
    each request's prefix-cache hits counted as it is admitted."""
    vocab, item = llm.model.config.vocab_size, jnp.dtype(llm.model.dtype).itemsize
    if settings.warmup:
        run_agentic(llm, settings_sessions(settings, c, 1.0, vocab, 10_000 + c, num_turns=1), c,
                    settings.temperature, f"warm-up c={c}")
    sessions = settings_sessions(settings, settings.num_sessions or c, settings.range_ratio, vocab, c)
    before, samples, state = dataclasses.replace(llm.prefix_cache.stats), [], engine_state(llm)
    with count_compilations() as compilations:
        results, duration = run_agentic(llm, sessions, c, settings.temperature, f"{system} agentic c={c}", samples)
    cache = llm.prefix_cache.stats.since(before)
    roof = roofline_summary(llm.model.config, sessions_workload(sessions), c, duration, settings.peaks, item, item)
    point = {**score_point(system, dtype, [r.timing for r in results], duration, c, settings, roof),
             "compilations": compilations[0],
             "prefix_cache": {"enabled": llm.config.enable_prefix_caching, "queries": cache.queries,
                              "hits": cache.hits, "hit_rate": cache.hit_rate},
             "server_state": state_summary(state, engine_state(llm), samples, "engine"),
             "agentic": agentic_record(settings, results, len(sessions))}
    log_agentic(system, c, point)
    return point


def log_agentic(system: str, c: int, point: dict) -> None:
    turns = " | ".join(f"t{t['turn']} TTFT p50 {t['ttft_ms']['median']:.0f} ms"
                       + (f" hits {100 * t['prefix_cache_hit_rate']:.0f}%" if t["prefix_cache_hit_rate"] is not None
                          else "") for t in point["agentic"]["turns"])
    cache = point.get("prefix_cache") or {}
    logging.info("%s agentic c=%d: %.1f output tok/s, prefix cache hit rate %s, KV usage max %s; %s", system, c,
                 point["output_tok_s"], cache.get("hit_rate"), point["server_state"]["kv_cache_usage"]["max"], turns)


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
    caching = (info.engine or {}).get("enable_prefix_caching")
    for c, n in zip(concurrencies, num_prompts):
        if settings.agentic:
            points.append(agentic_served_point(info, settings, c, dtype, config, api_key, caching))
            continue
        if settings.warmup:
            warm = settings_workload(settings, c, 1.0, config.vocab_size, 10_000 + c)
            http_client.run_closed_loop(info, warm.prompts, warm.output_lens, c, settings.temperature, api_key)
        workload = settings_workload(settings, n, settings.range_ratio, config.vocab_size, c)
        timings, duration, sampler = http_client.run_closed_loop(info, workload.prompts, workload.output_lens, c,
                                                                 settings.temperature, api_key,
                                                                 settings.metrics_interval_s)
        roof = roofline_summary(config, workload, c, duration, settings.peaks, item, item)
        points.append({**score_point(info.system, dtype, timings, duration, c, settings, roof), "client": "http",
                       **served_state(sampler, caching)})
        logging.info("%s c=%d (served): %.1f output tok/s, %.1f tok/s/user, TTFT p50 %.0f ms, compilations %s",
                     info.system, c, points[-1]["output_tok_s"], points[-1]["interactivity"],
                     points[-1]["ttft_ms"]["median"], points[-1]["compilations"])
    return points


def served_state(sampler: http_client.MetricsSampler, caching: bool | None) -> dict:
    """A served point's `server_state` from /metrics, its `compilations` (the server's XLA compilations
    during the point; None from a server that does not count them) and, where the server counts them,
    its `prefix_cache` (enabled as the server's engine says, else as its counters show)."""
    state = state_summary(sampler.before, sampler.after, sampler.samples, "metrics")
    before, after = sampler.before.compilations, sampler.after.compilations
    out = {"server_state": state, "compilations": None if None in (before, after) else int(after - before)}
    cache = state["prefix_cache"]
    if cache["queries"] is None:
        return out
    enabled = caching if caching is not None else cache["hits"] > 0
    return {**out, "prefix_cache": {"enabled": enabled, **cache, "hit_rate": cache["hit_rate"] or 0.0}}


def agentic_served_point(info: http_client.ServerInfo, settings: Settings, c: int, dtype: str, config: ModelConfig,
                         api_key: str | None, caching: bool | None) -> dict:
    """One agentic point through the server: a warm-up wave of one-turn sessions, then the scored
    sessions, with /metrics sampled throughout."""
    item = jnp.dtype(dtype).itemsize
    if settings.warmup:
        http_client.run_agentic(info, settings_sessions(settings, c, 1.0, config.vocab_size, 10_000 + c, num_turns=1),
                                c, settings.temperature, api_key)
    sessions = settings_sessions(settings, settings.num_sessions or c, settings.range_ratio, config.vocab_size, c)
    results, duration, sampler = http_client.run_agentic(info, sessions, c, settings.temperature, api_key,
                                                         settings.metrics_interval_s)
    roof = roofline_summary(config, sessions_workload(sessions), c, duration, settings.peaks, item, item)
    point = {**score_point(info.system, dtype, [r.timing for r in results], duration, c, settings, roof),
             "client": "http", **served_state(sampler, caching),
             "agentic": agentic_record(settings, results, len(sessions))}
    log_agentic(info.system, c, point)
    return point


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
