"""scripts/benchmark_serving.py end to end on tiny-llama, its JSON checked against benchmarks/schema.json;
its workloads (benchmarks/workloads.py) seeded and shaped."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from benchmarks.serving_sweep import prefix_caching_values
from benchmarks.workloads import make_workload, max_model_len

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "benchmarks" / "schema.json").read_text())
TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
         "integer": int, "number": (int, float)}


def validate(value, schema: dict, where: str = "$") -> None:
    """The JSON Schema subset benchmarks/schema.json uses: type, enum, required, properties, items, minItems."""
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    is_bool = isinstance(value, bool)
    if types and not any(isinstance(value, TYPES[t]) and (t == "boolean" or not is_bool) for t in types):
        raise AssertionError(f"{where}: {value!r} is not of type {types}")
    if "enum" in schema and value not in schema["enum"]:
        raise AssertionError(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        missing = set(schema.get("required", [])) - set(value)
        assert not missing, f"{where}: missing {sorted(missing)}"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                validate(value[key], sub, f"{where}.{key}")
    if isinstance(value, list):
        assert len(value) >= schema.get("minItems", 0), f"{where}: too few items"
        for i, item in enumerate(value):
            validate(item, schema.get("items", {}), f"{where}[{i}]")


def test_validator_rejects_bad_documents():
    with pytest.raises(AssertionError):
        validate({"schema_version": 1}, SCHEMA)
    with pytest.raises(AssertionError):
        validate({"a": True}, {"properties": {"a": {"type": "integer"}}})


def test_workload_is_seeded_and_in_range():
    a = make_workload(seed=3, n=50, isl=40, osl=20, ratio=0.5, vocab_size=100, stream=2)
    assert a == make_workload(seed=3, n=50, isl=40, osl=20, ratio=0.5, vocab_size=100, stream=2)
    assert a != make_workload(seed=3, n=50, isl=40, osl=20, ratio=0.5, vocab_size=100, stream=4)
    assert all(20 <= len(p) <= 40 for p in a.prompts) and all(10 <= n <= 20 for n in a.output_lens)
    assert all(0 <= t < 100 for p in a.prompts for t in p)
    assert min(len(p) for p in a.prompts) < 40 and min(a.output_lens) < 20  # lengths do vary


def test_shared_prefix_and_multi_turn_workloads():
    a = make_workload(seed=3, n=6, isl=10, osl=5, ratio=1.0, vocab_size=100, stream=2, shared_prefix_len=7)
    b = make_workload(seed=3, n=6, isl=10, osl=5, ratio=1.0, vocab_size=100, stream=9, shared_prefix_len=7)
    prefix = a.prompts[0][:7]
    assert all(p[:7] == prefix and len(p) == 17 for p in a.prompts + b.prompts) and a.prompts[0] != b.prompts[0]
    m = make_workload(seed=3, n=6, isl=10, osl=5, ratio=1.0, vocab_size=100, stream=2, shared_prefix_len=7,
                      num_turns=3)
    # two conversations, turn by turn: turn t resends prefix + t-1 (user, reply) pairs + a user turn
    assert [len(p) for p in m.prompts] == [17, 17, 32, 32, 47, 47] and m.output_lens == [5] * 6
    assert m.prompts[2][:17] == m.prompts[0] and m.prompts[4][:32] == m.prompts[2]
    assert max_model_len(isl=10, osl=5, shared_prefix_len=7, num_turns=3) == 52
    assert prefix_caching_values(["false", "True"]) == [False, True]
    with pytest.raises(ValueError, match="true/false"):
        prefix_caching_values(["yes"])


def test_end_to_end_tiny_llama(tmp_path):
    output = tmp_path / "tiny.json"
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_serving.py"), "--model=tiny-llama",
                    "--isl=24", "--osl=8", "--concurrency=1,2", "--num_prompts=4", f"--output={output}",
                    "--peak_bandwidth_gb_s=45", "--peak_tflop_s=0.475", "--shared_prefix_len=16",
                    "--enable_prefix_caching=false,true"], check=True, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    report = json.loads(output.read_text())
    validate(report, SCHEMA)
    assert [(p["system"], p["concurrency"]) for p in report["points"]] == [
        ("jaxserve", 1), ("jaxserve", 2), ("jaxserve+prefix_cache", 1), ("jaxserve+prefix_cache", 2)]
    assert report["workload"]["shared_prefix_len"] == 16
    for p in report["points"]:
        assert p["num_requests"] == 4
        assert 4 * 6 <= p["output_tokens"] <= 4 * 8 and 4 * (16 + 19) <= p["input_tokens"] <= 4 * (16 + 24)
        cache = p["prefix_cache"]
        assert cache["enabled"] == (p["system"] == "jaxserve+prefix_cache")
        # caching on: each request finds the shared prefix's (16-token) page, cached by the warm-up wave
        assert (cache["queries"], cache["hits"]) == ((p["input_tokens"], 4 * 16) if cache["enabled"] else (0, 0))
        assert p["output_tok_s"] == pytest.approx(p["output_tokens"] / p["duration_s"])
        assert p["interactivity"] == pytest.approx(1000 / p["tpot_ms"]["median"])
        assert 0 < p["roofline"]["fraction"] < 1
        assert p["compilations"] == 0  # LLM.warmup compiled every bucket the scored loop used
    assert any(p["on_frontier"] for p in report["points"])
    assert report["device"]["peaks_source"] == "flag" and report["device"]["peak_bandwidth_gb_s"] == 45
    for suffix in ("-pareto.png", "-latency.png"):
        assert (tmp_path / f"tiny{suffix}").read_bytes()[:4] == b"\x89PNG"
    assert elapsed < 120, f"benchmark took {elapsed:.0f} s (two engines, alone: ~40 s)"  # CI time guard


def test_speculative_points_side_by_side(tmp_path):
    """--speculative_config with --compare_no_speculation: the same point without and with n-gram
    speculation in one JSON, the speculative one carrying its counters."""
    output = tmp_path / "spec.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_serving.py"), "--model=tiny-llama",
                    "--isl=24", "--osl=12", "--concurrency=2", "--num_prompts=4", f"--output={output}",
                    "--peak_bandwidth_gb_s=45", "--peak_tflop_s=0.475", "--plot=false", "--compare_no_speculation",
                    "--max_num_batched_tokens=64", "--prefill_chunk=32",
                    '--speculative_config={"method": "synthetic", "num_speculative_tokens": 3, "acceptance_length": 2.5}'],
                   check=True, cwd=tmp_path)
    report = json.loads(output.read_text())
    validate(report, SCHEMA)
    plain, spec = report["points"]
    assert plain["speculation"] is None and plain["compilations"] == 0 and spec["compilations"] == 0
    s = spec["speculation"]
    assert s["method"] == "synthetic" and s["num_speculative_tokens"] == 3 and s["proposed"] > 0
    assert 1.5 < s["mean_acceptance_length"] <= 3.5  # synthetic: 2.5 on average, fewer near max_tokens


@contextlib.contextmanager
def serving(tmp_path: Path, *flags: str) -> Iterator[str]:
    """scripts/serve.py on tiny-llama on a free port, for the block's duration: its base URL. It must
    stop cleanly on Ctrl-C (exit 0)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--model=tiny-llama",
                                   "--port=0", *flags], stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp_path,
                                  env=env)
    watchdog = threading.Timer(180, server.kill)
    watchdog.start()
    try:
        ready = server.stdout.readline()  # "jaxserve: serving 'tiny-llama' at http://127.0.0.1:PORT/v1 ..."
        url = re.search(r"http://127\.0\.0\.1:\d+", ready)
        assert url, f"no URL from serve.py: {ready!r}; log:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        yield url[0]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
        watchdog.cancel()
    assert server.returncode == 0


def test_served_end_to_end_tiny_llama(tmp_path):
    """scripts/serve.py on a free port, driven by benchmark_serving.py --base_url: the same JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    output = tmp_path / "served.json"
    with serving(tmp_path, "--max_model_len=32", "--max_num_seqs=2") as base_url:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_serving.py"), f"--base_url={base_url}",
                        "--model=tiny-llama", "--isl=24", "--osl=8", "--concurrency=1,2", "--num_prompts=4",
                        f"--output={output}", "--peak_bandwidth_gb_s=45", "--peak_tflop_s=0.475", "--noplot"],
                       check=True, cwd=tmp_path, env=env)
    report = json.loads(output.read_text())
    validate(report, SCHEMA)
    assert report["server"] == {"base_url": base_url, "model": "tiny-llama", "system": "jaxserve"}
    assert report["engine"]["max_num_seqs"] == 2 and report["engine"]["max_model_len"] == 32
    assert [p["concurrency"] for p in report["points"]] == [1, 2]
    for p in report["points"]:
        assert p["system"] == "jaxserve" and p["client"] == "http" and p["num_requests"] == 4
        assert 4 * 6 <= p["output_tokens"] <= 4 * 8 and 4 * 19 <= p["input_tokens"] <= 4 * 24
        assert p["output_tok_s"] == pytest.approx(p["output_tokens"] / p["duration_s"])
        assert p["ttft_ms"]["median"] > 0 and 0 < p["roofline"]["fraction"] < 1
        assert isinstance(p["compilations"], int)  # read from the server's jaxserve_xla_compilations_total


BENCH = [sys.executable, str(ROOT / "scripts" / "benchmark_serving.py"), "--model=tiny-llama",
         "--peak_bandwidth_gb_s=45", "--peak_tflop_s=0.475", "--noplot"]
AGENTIC = ["--workload=agentic", "--num_turns=3", "--num_sessions=3", "--concurrency=2", "--shared_prefix_len=16",
           "--isl=16", "--tool_result_len=8", "--osl=4", "--think_time_s=0.01"]


def check_agentic(report: dict) -> dict:
    """The agentic point's JSON: 3 sessions x 3 turns, prompts growing turn by turn, per-turn TTFT."""
    validate(report, SCHEMA)
    assert report["schema_version"] == 3
    w = report["workload"]
    assert (w["kind"], w["num_turns"], w["num_sessions"], w["tool_result_len"], w["think_time_s"]) == (
        "agentic", 3, 3, 8, 0.01)
    [p] = report["points"]
    a = p["agentic"]
    assert p["num_requests"] == 9 and (a["num_sessions"], a["num_turns"], a["think_time_dist"]) == (3, 3, "fixed")
    turns = a["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and all(t["num_requests"] == 3 for t in turns)
    # turn 1: the system prompt, a user message and a tool result (16 + [12, 16] + [6, 8]); each later turn
    # adds the reply it resends, a user message and a tool result
    assert 34 <= turns[0]["prompt_tokens_mean"] <= 40
    for t, u in zip(turns, turns[1:]):
        assert 3 + 12 + 6 <= u["prompt_tokens_mean"] - t["prompt_tokens_mean"] <= 4 + 16 + 8
    assert all(t["ttft_ms"]["median"] > 0 and t["ttft_ms"]["p99"] >= t["ttft_ms"]["median"] for t in turns)
    s = p["server_state"]
    assert s["kv_cache_usage"]["max"] > 0 and s["num_requests_running"]["max"] >= 1 and s["num_samples"] > 0
    return p


def test_agentic_end_to_end_tiny_llama(tmp_path):
    """--workload=agentic in process: each request's prefix-cache hits counted as it is admitted;
    a later turn's requests find their conversation so far, the first only the system prompt."""
    output = tmp_path / "agentic.json"
    start = time.perf_counter()
    subprocess.run([*BENCH, *AGENTIC, f"--output={output}", "--nowarmup"], check=True, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    p = check_agentic(json.loads(output.read_text()))
    assert p["system"] == "jaxserve+prefix_cache" and p["prefix_cache"]["enabled"]  # on by default for agentic
    turns = p["agentic"]["turns"]
    assert turns[0]["prefix_cache_hits"] <= 3 * 16  # at most the system prompt's page
    for later in turns[1:]:
        assert later["prefix_cache_hits"] > turns[0]["prefix_cache_hits"]
        assert later["prefix_cache_hit_rate"] > turns[0]["prefix_cache_hit_rate"]
    hits = sum(t["prefix_cache_hits"] for t in turns)
    assert hits == p["prefix_cache"]["hits"] == p["server_state"]["prefix_cache"]["hits"]
    assert sum(t["prefix_cache_queries"] for t in turns) == p["prefix_cache"]["queries"] == p["input_tokens"]
    assert elapsed < 120, f"agentic benchmark took {elapsed:.0f} s (alone: ~13 s)"  # CI time guard


def test_scaled_8k1k_end_to_end_tiny_llama(tmp_path):
    """--workload=8k1k --scale=1/256: the random workload at ISL 32 / OSL 4 (8:1, range ratio 0.8)."""
    output = tmp_path / "8k1k.json"
    start = time.perf_counter()
    subprocess.run([*BENCH, "--workload=8k1k", "--scale=0.00390625", "--concurrency=2", "--num_prompts=4",
                    f"--output={output}", "--nowarmup"], check=True, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    report = json.loads(output.read_text())
    validate(report, SCHEMA)
    w = report["workload"]
    assert (w["kind"], w["isl"], w["osl"], w["scale"], w["range_ratio"]) == ("8k1k", 32, 4, 0.00390625, 0.8)
    assert report["engine"]["max_model_len"] == 36
    [p] = report["points"]
    assert p["num_requests"] == 4 and 4 * 25 <= p["input_tokens"] <= 4 * 32 and 4 * 3 <= p["output_tokens"] <= 4 * 4
    assert p["server_state"]["source"] == "engine" and p["server_state"]["kv_cache_usage"]["max"] > 0
    assert elapsed < 120, f"8k1k benchmark took {elapsed:.0f} s (alone: ~10 s)"  # CI time guard


def test_served_agentic_and_8k1k_tiny_llama(tmp_path):
    """Both new workloads against scripts/serve.py: per-turn TTFT from the client, KV-cache usage,
    queue and prefix-cache counters from the server's /metrics (vLLM's names)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with serving(tmp_path, "--max_model_len=128", "--max_num_seqs=2") as base_url:
        served = [*BENCH, f"--base_url={base_url}", "--metrics_interval_s=0.05"]
        subprocess.run([*served, *AGENTIC, f"--output={tmp_path / 'agentic.json'}"], check=True, cwd=tmp_path, env=env)
        subprocess.run([*served, "--workload=8k1k", "--scale=0.00390625", "--concurrency=2", "--num_prompts=4",
                        f"--output={tmp_path / '8k1k.json'}"], check=True, cwd=tmp_path, env=env)
    p = check_agentic(json.loads((tmp_path / "agentic.json").read_text()))
    assert p["client"] == "http" and p["server_state"]["source"] == "metrics"
    # our server does not report a request's cached tokens (usage.prompt_tokens_details): per-turn hits unknown
    assert all(t["prefix_cache_hits"] is None for t in p["agentic"]["turns"])
    assert "prefix_cache" in p, ("/metrics has no prefix-cache counters: server/engine_loop.py's _publish_state must "
                                 "pass llm.prefix_cache.stats' queries and hits to ServerMetrics.engine_state")
    cache = p["prefix_cache"]  # from vllm:prefix_cache_{queries,hits}_total before and after
    assert cache["enabled"] and cache["queries"] == p["input_tokens"]
    # more than every request's system-prompt page: later turns found their conversations
    assert cache["hits"] > 9 * 16 and cache["hit_rate"] > 0.4
    report = json.loads((tmp_path / "8k1k.json").read_text())
    validate(report, SCHEMA)
    [q] = report["points"]
    assert (report["workload"]["isl"], report["workload"]["osl"]) == (32, 4) and q["num_requests"] == 4
    assert q["server_state"]["num_samples"] > 0 and q["prefix_cache"]["queries"] == q["input_tokens"]
