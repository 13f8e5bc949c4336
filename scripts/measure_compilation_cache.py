"""`make run`'s TTFT and `LLM.warmup()` time in a first process (empty persistent compilation
cache) and a second one (the cache the first wrote), beside a run with the cache off; one JSON.
The warm-up runs use a small configuration (one sequence, 256-token context, 256-token budget:
14 shapes). Each part is written as soon as it is measured.

  python scripts/measure_compilation_cache.py --out=benchmarks/results/compilation_cache_cpu.json
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from engine import compilation_cache

OUT = flags.DEFINE_string("out", "benchmarks/results/compilation_cache_cpu.json", "where the JSON goes")
MAKE_RUN = ["--model=smollm2-135m-instruct", "--chat", "--prompt=What is the capital of France?", "--max_tokens=64"]
WARMUP = ["--warmup", "--max_num_seqs=1", "--max_model_len=256", "--max_num_batched_tokens=256"]
GENERATE = Path(__file__).parent / "generate.py"


def generate(cache: str, extra: list[str]) -> dict:
    """scripts/generate.py with `make run`'s flags in a fresh process; its timings record."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, compilation_cache.ENV: cache}
        subprocess.run([sys.executable, str(GENERATE), *MAKE_RUN, *extra, f"--json_out={out.name}"], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def main(argv: list[str]) -> None:
    del argv
    results = {"command": " ".join(sys.argv), "load_average_at_start": os.getloadavg(), "runs": {}}
    for name, extra in (("make_run", []), ("warmup", WARMUP)):
        with tempfile.TemporaryDirectory() as cache:
            runs = {"first": generate(cache, extra), "second": generate(cache, extra)}
        if name == "make_run":
            runs["off"] = generate("off", extra)
        results["runs"][name] = runs
        key = "ttft_s" if name == "make_run" else "warmup_s"
        results[f"{name}_{key}_second_over_first"] = runs["second"][key] / runs["first"][key]
        print(name, {k: round(v[key], 3) for k, v in runs.items()}, flush=True)
        results["load_average_at_end"] = os.getloadavg()  # other jobs on a shared CPU skew the seconds
        Path(OUT.value).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    app.run(main)
