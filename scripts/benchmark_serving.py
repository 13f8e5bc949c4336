"""InferenceMAX-style serving benchmark: a closed-loop concurrency sweep, one JSON, Pareto plots.

    .venv/bin/python scripts/benchmark_serving.py --model=smollm2-135m-instruct --isl=256 --osl=256 \
        --concurrency=1,2,4,8,16,32,64 --max_num_prompts=160 --baseline=transformers,llamacpp \
        --output=benchmarks/results/cpu-smollm2-float32.json

Speculative decoding (engine/spec): `--speculative_config='{"method": "ngram", "num_speculative_tokens": 4}'`
(vLLM's dict; `"method": "synthetic", "acceptance_length": a` is a fixed-acceptance mode for
comparisons with published numbers, NOT lossless); `--compare_no_speculation` runs the same
points without it first, side by side in one JSON; `--workload=grounded` asks the model to repeat
or rewrite README passages (input-grounded: where n-gram drafts are right), `random` is random tokens.

Random-token prompts from a fixed seed, input/output lengths uniform in [r*L, L], ignore_eos. At
each concurrency a warm-up wave runs first (after `LLM.warmup` compiled every shape bucket) and
is not scored; then exactly `concurrency` requests stay in flight (a new one is added whenever
one finishes) until `num_prompts` have finished. `--shared_prefix_len` starts every prompt with the
same tokens and `--num_turns` replays multi-turn conversations (benchmarks/workloads.py);
`--enable_prefix_caching=false,true` runs the sweep once per value, side by side. The JSON layout
is in the README and benchmarks/schema.json; baselines run in the `make baselines` venv through
scripts/baselines.py.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import itertools
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from tqdm.auto import tqdm


from benchmarks import http_client, roofline, workloads
from benchmarks.grounded import grounded_prompts
from benchmarks.compilations import count_compilations
from engine.llm import LLM
from benchmarks.metrics import HOURLY_RATES_USD, RequestTiming, cost_per_million_tokens, pareto_frontier, point_metrics  # noqa: E501
from engine.config import EngineConfig
from engine.request import SamplingParams
from engine.spec.metrics import SpecMetrics
from models import ModelConfig, load_model, param_counts
from models.loaded_model import EMBEDDED_WEIGHTS, embedded_weights_path, load_config

SCHEMA_VERSION = 2  # 2: per-point speculation and prefix-cache counters
REPO = Path(__file__).resolve().parents[1]

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Preset name, .gguf file or checkpoint dir.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Engine weight and KV dtype.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/benchmark.json", "Result JSON path.")
_ISL = flags.DEFINE_integer("isl", 256, "Maximum input length L (lengths uniform in [r*L, L]).")
_OSL = flags.DEFINE_integer("osl", 256, "Maximum output length L (lengths uniform in [r*L, L]).")
_RANGE_RATIO = flags.DEFINE_float("range_ratio", 0.8, "r: the shortest length as a fraction of L.")
_CONCURRENCY = flags.DEFINE_list("concurrency", ["1", "2", "4", "8", "16", "32", "64"], "Concurrency points.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", None, "Requests per point (default 10 x concurrency).")
_MAX_NUM_PROMPTS = flags.DEFINE_integer("max_num_prompts", 640, "Cap on requests per point.")
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed (prompts, lengths).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy, as vLLM's bench).")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 4, "Engine decode steps per host sync.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Engine KV page size.")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", None, "Engine prefill chunk (default: the engine's).")
_MAX_BATCHED = flags.DEFINE_integer("max_num_batched_tokens", None, "Engine token budget per (ragged) step "
                                    "(default: the engine's, by platform).")
_MAX_NUM_SEQS = flags.DEFINE_integer("max_num_seqs", None, "Engine sequence slots (default: the largest concurrency).")
_ASYNC = flags.DEFINE_bool("async_scheduling", False, "Engine: dispatch a decode call's successor before its tokens.")
_ATTENTION = flags.DEFINE_string("attention_impl", "auto", "Engine attention ops (pallas_kernels/ops.py IMPLS).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Run an unscored warm-up wave at each point first.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 1, "Devices the throughput is divided by.")
_RATE = flags.DEFINE_float("hourly_rate", None, "$ per device-hour; default from the GPU table, else --cpu_rate.")
_CPU_RATE = flags.DEFINE_float("cpu_rate", 0.10, "$ per hour for a CPU device (a small cloud VM).")
_BASELINE = flags.DEFINE_list("baseline", [], "Baselines to run beside the engine: transformers, llamacpp.")
_BASELINE_PYTHON = flags.DEFINE_string("baseline_python", ".venv-baselines/bin/python",
                                       "Python of the `make baselines` venv.")
_BASELINE_GGUF = flags.DEFINE_string("baseline_gguf", None, "GGUF for the baselines (default: the model's).")
_BASELINE_DTYPE = flags.DEFINE_string("baseline_dtype", "float32", "transformers' torch dtype.")
_BASELINE_BATCHES = flags.DEFINE_integer("baseline_batches", 1, "transformers: batches of `concurrency` per point.")
_LLAMACPP_PROMPTS = flags.DEFINE_integer("llamacpp_num_prompts", 4, "llama.cpp: requests (one stream).")
_PEAK_BW = flags.DEFINE_float("peak_bandwidth_gb_s", None, "Device bandwidth; set with --peak_tflop_s to skip "
                               "the table and the CPU probe.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflop_s", None, "Device matmul peak in the engine dtype.")
_PREFIX_CACHING = flags.DEFINE_list("enable_prefix_caching", ["false"], "Engine prefix caching: true or "
                                     "false, or a list (false,true) to run the sweep once per value.")
_SHARED_PREFIX = flags.DEFINE_integer("shared_prefix_len", 0, "Tokens every prompt starts with (a system prompt).")
_NUM_TURNS = flags.DEFINE_integer("num_turns", 1, "Turns per replayed conversation (> 1: each request resends "
                                  "the conversation so far, user turns of --isl, recorded replies of --osl tokens).")
_PLOT = flags.DEFINE_bool("plot", True, "Write PNG plots beside the JSON (scripts/plot_results.py).")
_SPEC = flags.DEFINE_string("speculative_config", None, "JSON dict of LLM's speculative_config (vLLM's names).")
_COMPARE_SPEC = flags.DEFINE_bool("compare_no_speculation", False, "Also run every point without speculation.")
_WORKLOAD = flags.DEFINE_enum("workload", "random", ["random", "grounded"],
                              "random tokens, or repeat/rewrite prompts over README passages (needs a tokenizer).")
_BASE_URL = flags.DEFINE_string("base_url", None, "Run the sweep against the OpenAI-compatible server at this URL "
                                "(http://host:port: scripts/serve.py, vLLM, SGLang) instead of in process; "
                                "--model then only gives the config (no weights are loaded).")
_SERVED_MODEL = flags.DEFINE_string("served_model_name", None, "With --base_url: the model's name in the API "
                                    "(default: the server's first /v1/models entry).")
_API_KEY = flags.DEFINE_string("api_key", None, "With --base_url: sent as Authorization: Bearer KEY.")


@dataclasses.dataclass(frozen=True)
class Workload:
    """Prompts and their output lengths."""

    prompts: list[list[int]]
    output_lens: list[int]


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


def uniform_lengths(rng: np.random.Generator, n: int, length: int, ratio: float) -> np.ndarray:
    """n integers uniform in [max(1, floor(ratio * length)), length]."""
    return rng.integers(max(1, int(ratio * length)), length + 1, size=n)


def make_workload(seed: int, n: int, isl: int, osl: int, ratio: float, vocab_size: int, stream: int = 0,
                  shared_prefix_len: int = 0, num_turns: int = 1) -> Workload:
    """Deterministic in (seed, stream): the same call gives the same prompts to every system. The
    prompts start with the seed's shared prefix; num_turns > 1 makes them multi-turn replays."""
    rng = np.random.default_rng([seed, stream])
    input_lens = uniform_lengths(rng, n, isl, ratio)
    output_lens = [int(x) for x in uniform_lengths(rng, n, osl, ratio)]
    prompts = [rng.integers(0, vocab_size, size=int(m)).tolist() for m in input_lens]
    if num_turns > 1:
        replies = [rng.integers(0, vocab_size, size=m).tolist() for m in output_lens]
        prompts, output_lens = workloads.multi_turn(prompts, replies, num_turns)
    prefix = workloads.shared_prefix(seed, shared_prefix_len, vocab_size)
    return Workload([prefix + p for p in prompts], output_lens)


def settings_workload(settings: Settings, n: int, ratio: float, vocab_size: int, stream: int) -> Workload:
    """make_workload with the settings' lengths, seed, shared prefix and turns."""
    return make_workload(settings.seed, n, settings.isl, settings.osl, ratio, vocab_size, stream,
                         settings.shared_prefix_len, settings.num_turns)


def max_model_len(isl: int, osl: int, shared_prefix_len: int, num_turns: int) -> int:
    """The longest request a workload makes: the prefix, then every turn's input and output."""
    return shared_prefix_len + num_turns * (isl + osl)


def grounded_workload(llm: LLM, seed: int, n: int, isl: int, osl: int, ratio: float, stream: int = 0) -> Workload:
    """README-passage prompts of about isl tokens; output lengths as make_workload's."""
    if llm.model.tokenizer is None:
        raise app.UsageError("--workload=grounded needs a model with a tokenizer")
    rng = np.random.default_rng([seed, stream])
    output_lens = [int(x) for x in uniform_lengths(rng, n, osl, ratio)]
    return Workload(grounded_prompts(llm.model.tokenizer, n, isl, int(rng.integers(2**31))), output_lens)


def point_workload(llm: LLM, settings: Settings, n: int, ratio: float, stream: int) -> Workload:
    """The point's prompts: README passages (grounded), else random tokens with the settings' shared
    prefix and turns."""
    if settings.workload == "grounded":
        return grounded_workload(llm, settings.seed, n, settings.isl, settings.osl, ratio, stream)
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


def mark_frontier(points: list[dict]) -> None:
    """Set `on_frontier` per system: no other point of that system beats it on both axes."""
    for system in {p["system"] for p in points}:
        mine = [p for p in points if p["system"] == system]
        keep = set(pareto_frontier([(p["output_tok_s"], p["interactivity"]) for p in mine]))
        for i, p in enumerate(mine):
            p["on_frontier"] = i in keep


def hourly_rate(device_kind: str, override: float | None, cpu_rate: float) -> float:
    """$ per device-hour: the override, else the GPU table, else the CPU rate."""
    if override is not None:
        return override
    for key, rate in HOURLY_RATES_USD.items():
        if key in device_kind.lower():
            return rate
    return cpu_rate


def device_peaks(dtype: str, bandwidth_gb_s: float | None, tflop_s: float | None) -> roofline.DevicePeaks:
    """Given peaks when both are set, else the GPU table or a CPU probe."""
    if (bandwidth_gb_s is None) != (tflop_s is None):
        raise app.UsageError("set both --peak_bandwidth_gb_s and --peak_tflop_s, or neither")
    if bandwidth_gb_s is not None:
        return roofline.DevicePeaks(f"{jax.devices()[0].device_kind} ({dtype})", bandwidth_gb_s * 1e9,
                                    tflop_s * 1e12, source="flag")
    return roofline.device_peaks(dtype)


def default_gguf(model: str) -> Path:
    if model.endswith(".gguf"):
        return Path(model)
    if model in EMBEDDED_WEIGHTS:
        return embedded_weights_path(model)
    raise app.UsageError(f"--baseline needs a GGUF: pass --baseline_gguf for {model!r}")


def report_header(llm: LLM, settings: Settings, started: datetime.datetime) -> dict:
    """Model, device, engine and workload sections of the result JSON."""
    device = jax.devices()[0]
    return header_for(llm.model.config, jnp.dtype(llm.model.dtype).name, dataclasses.asdict(llm.config),
                      {"platform": device.platform, "kind": device.device_kind}, settings, started)


def header_for(config: ModelConfig, dtype: str, engine: dict, device: dict, settings: Settings,
               started: datetime.datetime) -> dict:
    """report_header's sections from their parts (a served run gets them from the server)."""
    peaks = settings.peaks
    return {
        "schema_version": SCHEMA_VERSION,
        "started_at": started.isoformat(timespec="seconds"),
        "model": {"name": config.name, "num_params": param_counts(config).total, "dtype": dtype,
                  "config": dataclasses.asdict(config)},
        "device": {"platform": device["platform"], "kind": device["kind"], "count": settings.num_devices,
                   "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                   "hourly_rate_usd": settings.hourly_rate, "peak_bandwidth_gb_s": peaks.bandwidth / 1e9,
                   "peak_tflop_s": peaks.flops / 1e12, "peaks_source": peaks.source},
        "engine": engine,
        "workload": {"kind": settings.workload, "isl": settings.isl, "osl": settings.osl,
                     "range_ratio": settings.range_ratio,
                     "seed": settings.seed, "temperature": settings.temperature, "ignore_eos": True,
                     "warmup": settings.warmup, "shared_prefix_len": settings.shared_prefix_len,
                     "num_turns": settings.num_turns},
    }


def main(argv: list[str]) -> None:
    del argv
    started, load_at_start = datetime.datetime.now().astimezone(), list(os.getloadavg())
    concurrencies = sorted({int(c) for c in _CONCURRENCY.value})
    num_prompts = [min(_NUM_PROMPTS.value or 10 * c, _MAX_NUM_PROMPTS.value) for c in concurrencies]
    num_prompts = [max(n, c) for n, c in zip(num_prompts, concurrencies)]
    if _BASE_URL.value:
        return served_main(started, load_at_start, concurrencies, num_prompts)
    if _WORKLOAD.value == "grounded" and _BASELINE.value:
        raise app.UsageError("baselines run the random workload only")
    spec = json.loads(_SPEC.value) if _SPEC.value else None
    settings = Settings(_ISL.value, _OSL.value, _RANGE_RATIO.value, _SEED.value, _TEMPERATURE.value,
                        hourly_rate(jax.devices()[0].device_kind, _RATE.value, _CPU_RATE.value), _NUM_DEVICES.value,
                        device_peaks(_DTYPE.value, _PEAK_BW.value, _PEAK_TFLOPS.value), _WARMUP.value,
                        _SHARED_PREFIX.value, _NUM_TURNS.value, _WORKLOAD.value)
    if settings.shared_prefix_len < 0 or settings.num_turns < 1:
        raise app.UsageError("--shared_prefix_len must be >= 0 and --num_turns >= 1")
    logging.info("peaks: %s", settings.peaks)
    model, points = load_model(_MODEL.value, dtype=_DTYPE.value), []
    speculative_configs = [None, spec] if spec is not None and _COMPARE_SPEC.value else [spec]
    for caching, speculative_config in itertools.product(prefix_caching_values(_PREFIX_CACHING.value),
                                                         speculative_configs):
        llm = LLM(model, max_num_seqs=_MAX_NUM_SEQS.value or max(concurrencies), decode_steps=_DECODE_STEPS.value,
                  page_size=_PAGE_SIZE.value,
                  max_model_len=max_model_len(_ISL.value, _OSL.value, _SHARED_PREFIX.value, _NUM_TURNS.value),
                  prefill_chunk=_PREFILL_CHUNK.value, max_num_batched_tokens=_MAX_BATCHED.value, seed=_SEED.value,
                  async_scheduling=_ASYNC.value, enable_prefix_caching=caching, speculative_config=speculative_config,
                  attention_impl=_ATTENTION.value)
        points += engine_points(llm, settings, concurrencies, num_prompts, _DTYPE.value)
    versions = {"jax": jax.__version__}
    header = report_header(llm, settings, started)
    output = Path(_OUTPUT.value)
    # The engine's points are saved before the (slow) baselines run, then rewritten with them.
    write_outputs(finish_report(header, points, versions, load_at_start), output, _PLOT.value and not _BASELINE.value)
    if _BASELINE.value:
        gguf = Path(_BASELINE_GGUF.value) if _BASELINE_GGUF.value else default_gguf(_MODEL.value)
        spec = BaselineSpec(_BASELINE.value, _BASELINE_PYTHON.value, gguf, _BASELINE_DTYPE.value,
                            _BASELINE_BATCHES.value, _LLAMACPP_PROMPTS.value)
        more, baseline_versions = run_baselines(spec, settings, concurrencies, llm.model.config)
        versions.update(baseline_versions)
        write_outputs(finish_report(header, points + more, versions, load_at_start), output, _PLOT.value)


def prefix_caching_values(values: list[str]) -> list[bool]:
    """--enable_prefix_caching's values as bools, in order."""
    table = {"true": True, "1": True, "false": False, "0": False}
    bad = [v for v in values if v.lower() not in table]
    if bad or not values:
        raise app.UsageError(f"--enable_prefix_caching takes true/false values, got {values}")
    return [table[v.lower()] for v in values]


def served_main(started: datetime.datetime, load_at_start: list[float], concurrencies: list[int],
                num_prompts: list[int]) -> None:
    """--base_url: the same sweep, metrics and JSON through a server's streamed /v1/completions
    (benchmarks/http_client.py); the engine, dtype and device come from the server when it says."""
    info = http_client.server_info(_BASE_URL.value, _SERVED_MODEL.value, _API_KEY.value)
    config, dtype = load_config(_MODEL.value), info.dtype or _DTYPE.value
    device = info.device or {"platform": "remote", "kind": "unknown"}
    engine = {**{f.name: None for f in dataclasses.fields(EngineConfig)}, "max_model_len": info.max_model_len,
              **(info.engine or {})}
    if engine["max_num_seqs"] is not None and engine["max_num_seqs"] < max(concurrencies):
        logging.warning("the server runs at most %d sequences: higher concurrencies queue", engine["max_num_seqs"])
    settings = Settings(_ISL.value, _OSL.value, _RANGE_RATIO.value, _SEED.value, _TEMPERATURE.value,
                        hourly_rate(device["kind"], _RATE.value, _CPU_RATE.value), _NUM_DEVICES.value,
                        served_peaks(device["kind"], dtype), _WARMUP.value)
    logging.info("server %s (%s, model %r); peaks: %s", info.base_url, info.system, info.model, settings.peaks)
    points = served_points(info, settings, concurrencies, num_prompts, dtype, config)
    header = {**header_for(config, dtype, engine, device, settings, started),
              "server": {"base_url": info.base_url, "model": info.model, "system": info.system}}
    versions = {"jax": jax.__version__, "httpx": http_client.httpx.__version__}
    write_outputs(finish_report(header, points, versions, load_at_start), Path(_OUTPUT.value), _PLOT.value)


def served_peaks(kind: str, dtype: str) -> roofline.DevicePeaks:
    """The flags' peaks, else the GPU table by the server's device kind, else a probe of this
    machine (right for a server on this host)."""
    if _PEAK_BW.value is not None or _PEAK_TFLOPS.value is not None:
        return device_peaks(dtype, _PEAK_BW.value, _PEAK_TFLOPS.value)
    for key, peaks in roofline.GPU_PEAKS.items():
        if key in kind.lower():
            return peaks
    return roofline.probe_peaks(dtype)


def served_points(info: http_client.ServerInfo, settings: Settings, concurrencies: list[int],
                  num_prompts: list[int], dtype: str, config: ModelConfig) -> list[dict]:
    """engine_points through the server: per point a warm-up wave, then the scored closed loop
    (the server compiles its buckets itself: start ours with --warmup)."""
    points = []
    item = jnp.dtype(dtype).itemsize
    for c, n in zip(concurrencies, num_prompts):
        if settings.warmup:
            warm = make_workload(settings.seed, c, settings.isl, settings.osl, 1.0, config.vocab_size, 10_000 + c)
            http_client.run_closed_loop(info, warm.prompts, warm.output_lens, c, settings.temperature, _API_KEY.value)
        workload = make_workload(settings.seed, n, settings.isl, settings.osl, settings.range_ratio, config.vocab_size, c)
        timings, duration = http_client.run_closed_loop(info, workload.prompts, workload.output_lens, c,
                                                        settings.temperature, _API_KEY.value)
        roof = roofline_summary(config, workload, c, duration, settings.peaks, item, item)
        points.append({**score_point(info.system, dtype, timings, duration, c, settings, roof), "client": "http"})
        logging.info("c=%d (served): %.1f output tok/s, %.1f tok/s/user, TTFT p50 %.0f ms", c,
                     points[-1]["output_tok_s"], points[-1]["interactivity"], points[-1]["ttft_ms"]["median"])
    return points


def finish_report(header: dict, points: list[dict], versions: dict, load_at_start: list[float]) -> dict:
    """The header plus points (with their frontier flags), versions, finish time and load averages."""
    points = [dict(p) for p in points]
    mark_frontier(points)
    report = {**header, "versions": versions, "points": points,
              "finished_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    # Other jobs on a shared CPU skew the numbers: keep the 1/5/15-minute load averages beside them.
    report["device"] = {**header["device"], "load_average_at_start": load_at_start,
                        "load_average_at_end": list(os.getloadavg())}
    return report


def write_outputs(report: dict, output: Path, plot: bool) -> None:
    """The JSON, the table on stdout and (plot) PNGs named after the JSON."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(finite_or_null(report), indent=1, allow_nan=False))
    print(format_table(report["points"]))
    if plot:
        from benchmarks.plots import plot_files  # noqa: PLC0415 (matplotlib only when plotting)
        for path in plot_files([output], output.with_suffix("")):
            print(f"wrote {path}")
    print(f"wrote {output}")


def finite_or_null(value):
    """The report with NaN and infinities as null (JSON has neither)."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def spec_label(point: dict) -> str:
    """"-" without speculation, else method, k and the mean acceptance length."""
    s = point.get("speculation")
    if not s:
        return "-"
    return f"{s['method']} k={s['num_speculative_tokens']} accept {s['mean_acceptance_length'] or 0:.2f}"


def format_table(points: list[dict]) -> str:
    """A Markdown table of the headline numbers of every point."""
    rows = ["| system | dtype | spec | conc | out tok/s/dev | tok/s/user | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
            "| E2E p50 s | roofline | $/M out |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        served = " (http)" if p.get("client") == "http" else ""
        rows.append(f"| {p['system']}{served} | {p['dtype']} | {spec_label(p)} | {p['concurrency']} | "
                    f"{p['output_tok_s']:.1f} | "
                    f"{p['interactivity']:.1f} | {p['ttft_ms']['median']:.0f} | {p['ttft_ms']['p99']:.0f} | "
                    f"{p['tpot_ms']['median']:.1f} | {p['e2e_ms']['median'] / 1e3:.1f} | "
                    f"{100 * p['roofline']['fraction']:.0f}% | {p['cost_per_million_output_tokens_usd']:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    app.run(main)
