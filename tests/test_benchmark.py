"""scripts/benchmark_serving.py end to end on tiny-llama, its JSON checked against benchmarks/schema.json."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

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


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_serving", ROOT / "scripts" / "benchmark_serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_validator_rejects_bad_documents():
    with pytest.raises(AssertionError):
        validate({"schema_version": 1}, SCHEMA)
    with pytest.raises(AssertionError):
        validate({"a": True}, {"properties": {"a": {"type": "integer"}}})


def test_workload_is_seeded_and_in_range():
    bench = load_script()
    a = bench.make_workload(seed=3, n=50, isl=40, osl=20, ratio=0.5, vocab_size=100, stream=2)
    assert a == bench.make_workload(seed=3, n=50, isl=40, osl=20, ratio=0.5, vocab_size=100, stream=2)
    assert a != bench.make_workload(seed=3, n=50, isl=40, osl=20, ratio=0.5, vocab_size=100, stream=4)
    assert all(20 <= len(p) <= 40 for p in a.prompts) and all(10 <= n <= 20 for n in a.output_lens)
    assert all(0 <= t < 100 for p in a.prompts for t in p)
    assert min(len(p) for p in a.prompts) < 40 and min(a.output_lens) < 20  # lengths do vary


def test_end_to_end_tiny_llama(tmp_path):
    output = tmp_path / "tiny.json"
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_serving.py"), "--model=tiny-llama",
                    "--isl=24", "--osl=8", "--concurrency=1,2", "--num_prompts=4", f"--output={output}",
                    "--peak_bandwidth_gb_s=45", "--peak_tflop_s=0.475"], check=True, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    report = json.loads(output.read_text())
    validate(report, SCHEMA)
    assert elapsed < 60, f"benchmark took {elapsed:.0f} s"
    assert [p["concurrency"] for p in report["points"]] == [1, 2]
    for p in report["points"]:
        assert p["system"] == "jaxserve" and p["num_requests"] == 4
        assert 4 * 6 <= p["output_tokens"] <= 4 * 8 and 4 * 19 <= p["input_tokens"] <= 4 * 24
        assert p["output_tok_s"] == pytest.approx(p["output_tokens"] / p["duration_s"])
        assert p["interactivity"] == pytest.approx(1000 / p["tpot_ms"]["median"])
        assert 0 < p["roofline"]["fraction"] < 1
        assert p["compilations"] == 0  # LLM.warmup compiled every bucket the scored loop used
    assert any(p["on_frontier"] for p in report["points"])
    assert report["device"]["peaks_source"] == "flag" and report["device"]["peak_bandwidth_gb_s"] == 45
    for suffix in ("-pareto.png", "-latency.png"):
        assert (tmp_path / f"tiny{suffix}").read_bytes()[:4] == b"\x89PNG"


def test_served_end_to_end_tiny_llama(tmp_path):
    """scripts/serve.py on a free port, driven by benchmark_serving.py --base_url: the same JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    output = tmp_path / "served.json"
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--model=tiny-llama",
                                   "--port=0", "--max_model_len=32", "--max_num_seqs=2"],
                                  stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp_path, env=env)
    watchdog = threading.Timer(180, server.kill)
    watchdog.start()
    try:
        ready = server.stdout.readline()  # "jaxserve: serving 'tiny-llama' at http://127.0.0.1:PORT/v1 ..."
        url = re.search(r"http://127\.0\.0\.1:\d+", ready)
        assert url, f"no URL from serve.py: {ready!r}; log:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_serving.py"), f"--base_url={url[0]}",
                        "--model=tiny-llama", "--isl=24", "--osl=8", "--concurrency=1,2", "--num_prompts=4",
                        f"--output={output}", "--peak_bandwidth_gb_s=45", "--peak_tflop_s=0.475", "--noplot"],
                       check=True, cwd=tmp_path, env=env)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
        watchdog.cancel()
    assert server.returncode == 0
    report = json.loads(output.read_text())
    validate(report, SCHEMA)
    assert report["server"] == {"base_url": url[0], "model": "tiny-llama", "system": "jaxserve"}
    assert report["engine"]["max_num_seqs"] == 2 and report["engine"]["max_model_len"] == 32
    assert [p["concurrency"] for p in report["points"]] == [1, 2]
    for p in report["points"]:
        assert p["system"] == "jaxserve" and p["client"] == "http" and p["num_requests"] == 4
        assert 4 * 6 <= p["output_tokens"] <= 4 * 8 and 4 * 19 <= p["input_tokens"] <= 4 * 24
        assert p["output_tok_s"] == pytest.approx(p["output_tokens"] / p["duration_s"])
        assert p["ttft_ms"]["median"] > 0 and 0 < p["roofline"]["fraction"] < 1
