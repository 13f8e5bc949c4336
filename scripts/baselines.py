"""Baseline systems for benchmark_serving.py: Hugging Face transformers and llama.cpp.

Runs in the separate Python 3.11 venv that `make baselines` builds (torch CPU, transformers,
llama-cpp-python); imports nothing from this repo. benchmark_serving.py writes a job file and reads
back per-request timestamps, which it scores with the engine's own metric functions:

    .venv-baselines/bin/python scripts/baselines.py --job=job.json --output=timings.json

Job: {"gguf": path, "dtype": "float32", "threads": 2,
      "systems": {"transformers": [point, ...], "llamacpp": [point, ...]}}
      with point = {"concurrency": c, "prompts": [[ids]], "output_lens": [n]}
Output: {"versions": {...}, "<system>": [{"concurrency": c, "duration_s": s,
         "requests": [{"arrival": t, "token_times": [t, ...], "num_prompt_tokens": n}]}]}

transformers runs static batches of `concurrency` prompts (left padding, greedy, EOS suppressed
by min_new_tokens); a batch decodes to its longest output and each request is credited with its
own requested output length. llama.cpp (Q4_1 GGUF as shipped, greedy) runs one stream at a time,
so it is only run at concurrency 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

_JOB = flags.DEFINE_string("job", None, "Job JSON written by benchmark_serving.py.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the timings JSON.", required=True)


def _record(arrival: float, token_times: list[float], num_prompt_tokens: int) -> dict:
    return {"arrival": arrival, "token_times": token_times, "num_prompt_tokens": num_prompt_tokens}


class _StepClock:
    """A transformers StoppingCriteria that stamps the time each decoding step finishes."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _load_transformers(gguf: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=getattr(torch, dtype))
    return model.eval()


def _transformers_batch(model, prompts: list[list[int]], output_lens: list[int]) -> list[dict]:
    """One static batch, left-padded; returns each request's timings."""
    import torch
    from transformers import StoppingCriteriaList
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    clock, steps = _StepClock(), max(output_lens)
    arrival = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
    return [_record(arrival, clock.times[:n], len(p)) for p, n in zip(prompts, output_lens)]


def run_transformers(job: dict, points: list[dict]) -> list[dict]:
    """Every point: batches of `concurrency` prompts, one after another; the first batch is a warm-up."""
    import torch
    torch.set_num_threads(job["threads"])
    model = _load_transformers(Path(job["gguf"]), job["dtype"])
    results = []
    for point in points:
        c, prompts, lens = point["concurrency"], point["prompts"], point["output_lens"]
        _transformers_batch(model, prompts[:c], [min(8, n) for n in lens[:c]])  # warm-up, not scored
        start, requests = time.perf_counter(), []
        for i in range(0, len(prompts), c):
            requests += _transformers_batch(model, prompts[i:i + c], lens[i:i + c])
        results.append({"concurrency": c, "duration_s": time.perf_counter() - start, "requests": requests})
    return results


def _llamacpp_request(llm, prompt: list[int], output_len: int) -> dict:
    arrival, times = time.perf_counter(), []
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        times.append(time.perf_counter())
        if len(times) == output_len:
            break
    return _record(arrival, times, len(prompt))


def run_llamacpp(job: dict, points: list[dict]) -> list[dict]:
    """One stream at a time (llama-cpp-python serves one sequence), whatever the point's concurrency."""
    from llama_cpp import Llama
    longest = max(len(pr) + n for p in points for pr, n in zip(p["prompts"], p["output_lens"]))
    llm = Llama(model_path=job["gguf"], n_ctx=longest + 16, n_threads=job["threads"], n_batch=512, verbose=False)
    _llamacpp_request(llm, points[0]["prompts"][0], 8)  # warm-up
    results = []
    for point in points:
        start = time.perf_counter()
        requests = [_llamacpp_request(llm, p, n) for p, n in zip(point["prompts"], point["output_lens"])]
        results.append({"concurrency": 1, "duration_s": time.perf_counter() - start, "requests": requests})
    return results


def _versions(systems: dict) -> dict:
    versions = {}
    if "transformers" in systems:
        import torch
        import transformers
        versions.update(torch=torch.__version__, transformers=transformers.__version__)
    if "llamacpp" in systems:
        import llama_cpp
        versions["llama_cpp_python"] = llama_cpp.__version__
    return versions


def main(argv: list[str]) -> None:
    del argv
    job = json.loads(Path(_JOB.value).read_text())
    runners = {"transformers": run_transformers, "llamacpp": run_llamacpp}
    unknown = set(job["systems"]) - set(runners)
    if unknown:
        raise app.UsageError(f"unknown baselines {sorted(unknown)} (known: {', '.join(runners)})")
    out = {"versions": _versions(job["systems"])}
    for system, points in job["systems"].items():
        out[system] = runners[system](job, points) if points else []
    Path(_OUTPUT.value).write_text(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
