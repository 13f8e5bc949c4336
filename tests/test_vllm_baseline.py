"""scripts/benchmark_serving.py --baseline=vllm without vLLM, torch or the network: the comparison's
ratios and target check, both servers' command lines and environments, the HF copy made once per GGUF,
a server subprocess started, waited for and stopped with its process group, and our server's XLA
compilation counter from /metrics to each served point (the warm-up waves using other prompts)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import types
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import pytest

from benchmarks import serving_sweep
from benchmarks.compilations import on_compilation
from benchmarks.comparison import compare, format_comparison
from benchmarks.hf_copy import STAMP, hf_copy
from benchmarks.http_client import ServerInfo, state_sample
from benchmarks.metrics import RequestTiming, StateSample
from benchmarks.roofline import DevicePeaks
from benchmarks.server_process import ServerProcess, free_port
from benchmarks.vllm_baseline import ServerLaunch, ServeSettings, jaxserve_launch, served_run, vllm_launch
from models.loaded_model import load_config
from server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[1]
SERVE = ServeSettings("smollm2", "float32", max_model_len=320, max_num_seqs=8, kv_cache_bytes=1 << 30,
                      enable_prefix_caching=True)


# ---- the comparison ------------------------------------------------------------------------------


def point(system: str, c: int, tok_s: float, ttft: float, tpot: float, itl50: float, itl99: float,
          decode_bound_tok_s: float = 100.0, compilations: int | None = 0) -> dict:
    return {"system": system, "concurrency": c, "output_tok_s": tok_s, "ttft_ms": {"median": ttft},
            "tpot_ms": {"median": tpot}, "itl_ms": {"median": itl50, "p99": itl99},
            "roofline": {"decode_bound_tok_s": decode_bound_tok_s}, "compilations": compilations}


def test_own_targets_itl_spread_tpot_over_roofline_and_compilations():
    points = [point("jaxserve-served", 8, 90.0, 200, 60, 30, 90, decode_bound_tok_s=400.0),  # step 20 ms
              point("jaxserve-served", 1, 30.0, 50.0, 20.0, 0.0, 80.0, compilations=2),
              point("jaxserve-served", 32, 90.0, 200, 121, 40, 121, decode_bound_tok_s=533.3),
              point("vllm-cpu", 8, 60.0, 100, 120, 1, 130)]
    rows = compare(points, "jaxserve-served", ["vllm-cpu"])["own_targets"]["rows"]
    assert [r["concurrency"] for r in rows] == [1, 8, 32]  # ours only, in order
    one, eight, big = rows
    assert one["itl_p99_over_p50"] is None and not one["itl_smooth"] and one["compilations"] == 2  # bursts
    assert eight["itl_p99_over_p50"] == 3.0 and eight["itl_smooth"]  # exactly 3x passes
    assert big["itl_p99_over_p50"] > 3.0 and not big["itl_smooth"]
    assert eight["roofline_decode_step_ms"] == pytest.approx(20.0) and eight["tpot_over_roofline"] == pytest.approx(3.0)
    assert not eight["tpot_near_roofline"]
    assert big["tpot_over_roofline"] == pytest.approx(121 / 60.0, rel=1e-3) and not big["tpot_near_roofline"]
    table = format_comparison(compare(points, "jaxserve-served", ["vllm-cpu"]))
    assert "| 8 | 3.00 | 60 / 20 ms (3.00x) | 0 |" in table and "| 1 | - |" in table


def test_comparison_ratios_and_target():
    points = [point("jaxserve-served", 1, 30.0, 50.0, 20.0, 0.0, 80.0),
              point("jaxserve-served", 8, 90.0, 200, 60, 1, 240),
              point("vllm-cpu", 1, 20.0, 100.0, 40.0, 40.0, 50.0), point("vllm-cpu", 8, 60.5, 100, 120, 0, 130),
              point("vllm-cpu-default", 8, 45.0, 400, 180, 2, 200), point("vllm-cpu-default", 16, 50, 1, 1, 1, 1)]
    c = compare(points, "jaxserve-served", ["vllm-cpu", "vllm-cpu-default"])
    rows = {(r["concurrency"], r["baseline"]): r for r in c["rows"]}
    assert list(rows) == [(1, "vllm-cpu"), (8, "vllm-cpu"), (8, "vllm-cpu-default")]  # no c=16 of ours
    one = rows[1, "vllm-cpu"]
    assert one["ours"]["output_tok_s"] == 30 and one["theirs"]["ttft_p50_ms"] == 100
    assert one["output_tok_s_ratio"] == 1.5 and one["meets_target"]  # exactly the target passes
    assert (one["ttft_p50_ms_ratio"], one["tpot_p50_ms_ratio"], one["itl_p99_ms_ratio"]) == (0.5, 0.5, 1.6)
    assert one["itl_p50_ms_ratio"] == 0.0
    eight = rows[8, "vllm-cpu"]
    assert eight["output_tok_s_ratio"] == pytest.approx(90 / 60.5) and not eight["meets_target"]
    assert eight["itl_p50_ms_ratio"] is None  # theirs is 0: no ratio
    assert rows[8, "vllm-cpu-default"]["output_tok_s_ratio"] == 2.0 and rows[8, "vllm-cpu-default"]["meets_target"]
    assert c["target"] == {"metric": "output_tok_s_ratio", "min": 1.5} and not c["meets_target"]
    assert compare(points[:1] + points[2:3], "jaxserve-served", ["vllm-cpu"])["meets_target"]
    assert not compare(points[:1], "jaxserve-served", ["vllm-cpu"])["meets_target"]  # nothing compared
    table = format_comparison(c)
    assert "| 8 | vllm-cpu | 90.0 / 60.5 (1.49x) |" in table and "| - (-) |" not in table
    assert table.count("| yes |") == 2 and table.count("| no |") == 1


# ---- the servers' command lines and environments ------------------------------------------------


def flag_pairs(command: list[str]) -> dict[str, str | None]:
    """{--flag: its value (the next word unless that is a flag) or None}."""
    out = {}
    for i, word in enumerate(command):
        if word.startswith("--"):
            nxt = command[i + 1] if i + 1 < len(command) else None
            out[word] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def test_vllm_command_line_and_environment(tmp_path):
    launch = vllm_launch("/venv/bin/python", Path("/hf/model"), 8123, SERVE, "tuned", cpu_count=6, log_dir=tmp_path)
    assert launch.command[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    f = flag_pairs(launch.command)
    assert {k: f[k] for k in ("--model", "--dtype", "--port", "--served-model-name", "--max-model-len",
                              "--max-num-seqs", "--kv-cache-memory-bytes")} == {
        "--model": "/hf/model", "--dtype": "float32", "--port": "8123", "--served-model-name": "smollm2",
        "--max-model-len": "320", "--max-num-seqs": "8", "--kv-cache-memory-bytes": str(1 << 30)}
    assert "--enable-prefix-caching" in f and "--no-enable-prefix-caching" not in f
    assert "--max-num-batched-tokens" not in f  # vLLM's default unless given
    assert launch.system == "vllm-cpu" and launch.url == "http://127.0.0.1:8123"
    assert launch.log_path == tmp_path / "vllm-cpu.log"
    base = {"OMP_NUM_THREADS": "99", "VLLM_CPU_OMP_THREADS_BIND": "auto", "PATH": "/bin"}
    env = launch.environ(base)
    assert (env["OMP_NUM_THREADS"], env["VLLM_CPU_OMP_THREADS_BIND"], env["PATH"]) == ("6", "nobind", "/bin")
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    default = vllm_launch("py", Path("/hf"), 1, SERVE, "default", cpu_count=6, log_dir=tmp_path)
    env = default.environ(base)
    assert "OMP_NUM_THREADS" not in env and "VLLM_CPU_OMP_THREADS_BIND" not in env  # vLLM's own choice
    assert default.system == "vllm-cpu-default" and env["PATH"] == "/bin"
    other = ServeSettings("m", "bfloat16", 64, 2, 1 << 20, enable_prefix_caching=False, max_num_batched_tokens=32)
    f = flag_pairs(vllm_launch("py", Path("/hf"), 1, other, "tuned", 2, tmp_path).command)
    assert "--no-enable-prefix-caching" in f and "--enable-prefix-caching" not in f
    assert f["--max-num-batched-tokens"] == "32" and f["--dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="unknown vLLM config"):
        vllm_launch("py", Path("/hf"), 1, SERVE, "fast", 2, tmp_path)


def test_jaxserve_command_line_matches_vllms_settings_and_serve_py_flags(tmp_path):
    launch = jaxserve_launch("/py", "smollm2-135m-instruct", 9000, SERVE, ["--decode_steps=4", "--noasync_scheduling"],
                             tmp_path)
    flags = dict(w[2:].split("=", 1) if "=" in w else (w[2:], None) for w in launch.command[2:])
    assert flags == {"model": "smollm2-135m-instruct", "warmup": None, "host": "127.0.0.1", "port": "9000",
                     "served_model_name": "smollm2", "dtype": "float32", "max_model_len": "320", "max_num_seqs": "8",
                     "kv_cache_bytes": str(1 << 30), "enable_prefix_caching": "true", "decode_steps": "4",
                     "noasync_scheduling": None}
    assert launch.command[1] == str(ROOT / "scripts" / "serve.py") and launch.env == {}
    # every flag is one scripts/serve.py defines (a bool may be negated)
    defined = set(re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', (ROOT / "scripts" / "serve.py").read_text()))
    assert {name.removeprefix("no") if name not in defined else name for name in flags} <= defined


# ---- the HF copy ---------------------------------------------------------------------------------


def fake_converter(tmp_path: Path, fail: bool = False) -> Path:
    """A 'python' that records its calls and makes the --output directory (or fails)."""
    script = tmp_path / ("failing" if fail else "python")
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n" + (
        "echo 'no torch here' >&2; exit 3\n" if fail else
        'for a in "$@"; do case "$a" in --output=*) mkdir -p "${a#--output=}"; touch "${a#--output=}/config.json";; '
        "esac; done\n"))
    script.chmod(0o755)
    return script


def test_hf_copy_is_made_once_per_gguf(tmp_path):
    gguf, out = tmp_path / "m.gguf", tmp_path / "hf" / "m-float32"
    gguf.write_bytes(b"GGUF" + bytes(12))
    python = str(fake_converter(tmp_path))

    def calls() -> int:
        return len((tmp_path / "calls").read_text().splitlines()) if (tmp_path / "calls").exists() else 0
    assert hf_copy(gguf, out, python, tmp_path / "convert.log") == out and calls() == 1
    assert f"--gguf={gguf}" in (tmp_path / "calls").read_text() and (out / "config.json").exists()
    assert json.loads((out / STAMP).read_text())["size"] == 16
    hf_copy(gguf, out, python, tmp_path / "convert.log")
    assert calls() == 1  # reused
    gguf.write_bytes(b"GGUF" + bytes(20))  # another file under the same name
    hf_copy(gguf, out, python, tmp_path / "convert.log")
    assert calls() == 2
    other = tmp_path / "other"
    with pytest.raises(RuntimeError, match="no torch here"):
        hf_copy(gguf, other, str(fake_converter(tmp_path, fail=True)), tmp_path / "fail.log")
    assert not (other / STAMP).exists()


# ---- the server subprocess -----------------------------------------------------------------------

FAKE_SERVER = """
import http.server, json, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[2], "w").write(str(child.pid))
time.sleep(0.5)  # not ready at once
MODELS = json.dumps({"data": [{"id": "smollm2", "owned_by": "vllm", "max_model_len": 320}]}).encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path in ("/health", "/v1/models") else 404)
        self.end_headers()
        if self.path == "/v1/models":
            self.wfile.write(MODELS)
    def log_message(self, *args):
        pass
print("fake server up", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" in status.read_text()
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return gone(pid)


def test_server_process_waits_for_health_and_stops_its_process_group(tmp_path):
    port = free_port()
    server = ServerProcess([sys.executable, "-c", FAKE_SERVER, str(port), str(tmp_path / "child")],
                           f"http://127.0.0.1:{port}", tmp_path / "logs" / "fake.log", dict(os.environ))
    with server:
        assert 0.4 < server.wait_ready(timeout_s=30, poll_s=0.1) < 30
        child = int((tmp_path / "child").read_text())
        assert not gone(child)
    assert server.proc.returncode is not None and "fake server up" in (tmp_path / "logs" / "fake.log").read_text()
    assert wait_gone(child)  # the server's worker went with it


def test_served_run_sweeps_the_started_server_as_its_system(tmp_path):
    """served_run: the sweep sees the server's entry under the launch's system name, with the launch's
    settings as its engine (vLLM reports none: prefix caching is known from them), then it is stopped."""
    port = free_port()
    launch = ServerLaunch("vllm-cpu", [sys.executable, "-c", FAKE_SERVER, str(port), str(tmp_path / "child")], SERVE,
                          port, {}, tmp_path / "vllm-cpu.log")
    seen = []

    def sweep(info: ServerInfo) -> list[dict]:
        seen.append(httpx.get(f"{info.base_url}/health").status_code)
        return [{"system": info.system, "engine": info.engine}]
    points, info, record = served_run(launch, 30, sweep)
    assert seen == [200] and points == [{"system": "vllm-cpu", "engine": dataclasses.asdict(SERVE)}]
    assert (info.model, info.max_model_len, info.engine["enable_prefix_caching"]) == ("smollm2", 320, True)
    assert (record["owned_by"], record["system"], record["log"]) == ("vllm", "vllm-cpu", str(tmp_path / "vllm-cpu.log"))
    assert wait_gone(int((tmp_path / "child").read_text()))


def test_server_process_that_dies_raises_with_its_log(tmp_path):
    server = ServerProcess([sys.executable, "-c", "import sys; print('bad flag --foo'); sys.exit(2)"],
                           f"http://127.0.0.1:{free_port()}", tmp_path / "dead.log")
    with pytest.raises(RuntimeError, match=r"exited \(2\) before it was ready(.|\n)*bad flag --foo"):
        server.wait_ready(timeout_s=30, poll_s=0.05)
    assert server.stop() == 2


# ---- compilations: our /metrics counter, read per served point -----------------------------------


def test_server_counts_xla_compilations_in_metrics():
    metrics = ServerMetrics("m", num_pages=5)
    assert state_sample(metrics.render()).compilations == 0
    stop = on_compilation(metrics.xla_compiled)
    try:
        jax.jit(lambda x: x * 3 + 1)(jnp.arange(7.0)).block_until_ready()  # a new program: compiled here
    finally:
        stop()
    text = metrics.render()
    assert "# TYPE jaxserve_xla_compilations_total counter" in text
    counted = state_sample(text).compilations
    assert counted >= 1
    jax.jit(lambda x: x * 5 - 2)(jnp.arange(9.0)).block_until_ready()  # after stop(): not counted
    assert state_sample(metrics.render()).compilations == counted


def test_served_points_record_compilations_and_warm_up_on_other_prompts(monkeypatch):
    """served_points reads the server's counter before and after each scored loop (None from a server
    without it); each warm-up wave sends prompts no scored request sends, and both servers get the
    same scored prompts."""
    calls = []
    counter = {"jaxserve": 0}

    def fake_loop(info, prompts, output_lens, concurrency, temperature, api_key, interval_s=0.0):
        calls.append((info.system, prompts, interval_s))
        compiled = None if info.system == "vllm-cpu" else counter["jaxserve"]
        if compiled is not None:
            counter["jaxserve"] += 3 if interval_s else 10  # the warm-up wave compiles more than the point
        after = None if compiled is None else counter["jaxserve"]
        timings = [RequestTiming(0.0, tuple(0.1 * (i + 1) for i in range(n)), len(p))
                   for p, n in zip(prompts, output_lens)]
        sampler = types.SimpleNamespace(before=StateSample(0.0, 0, 0, compilations=compiled),
                                        after=StateSample(0.0, 0, 0, compilations=after), samples=[])
        return timings, 1.0, sampler
    monkeypatch.setattr(serving_sweep.http_client, "run_closed_loop", fake_loop)
    settings = serving_sweep.Settings(isl=16, osl=4, range_ratio=0.5, seed=0, temperature=0.0, hourly_rate=0.1,
                                      num_devices=1, peaks=DevicePeaks("cpu", 45e9, 0.475e12, "flag"), warmup=True)
    config = load_config("tiny-llama")
    points = {system: serving_sweep.served_points(ServerInfo("http://x", "m", system), settings, [1, 4], [3, 6],
                                                  "float32", config, None)
              for system in ("jaxserve", "vllm-cpu")}
    assert [p["compilations"] for p in points["jaxserve"]] == [3, 3]
    assert [p["compilations"] for p in points["vllm-cpu"]] == [None, None]
    # no warm-up prompt starts like a scored one (what a prefix cache would find: here its first 8 tokens)
    warm = [tuple(p[:8]) for system, prompts, interval in calls if not interval for p in prompts]
    scored = [tuple(p[:8]) for system, prompts, interval in calls if interval for p in prompts]
    assert len(warm) == 2 * (1 + 4) and len(scored) == 2 * (3 + 6)
    assert not set(warm) & set(scored)
    assert [c[1] for c in calls if c[0] == "jaxserve"] == [c[1] for c in calls if c[0] == "vllm-cpu"]
