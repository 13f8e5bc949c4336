"""scripts/bench_kernels.py (XLA paths, small shapes) and scripts/bench_sampler.py run end to end on CPU and write JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kernels_writes_json_for_every_suite(tmp_path):
    out = tmp_path / "kernels.json"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), f"--output={out}", "--iters=2"],
        check=True,
        cwd=ROOT,
        timeout=300,
    )
    report = json.loads(out.read_text())
    assert report["small"] and report["platform"] == "cpu"
    assert report["peaks"]["matmul_tflops"] > 0 and report["peaks"]["copy_gbps"] > 0
    results = report["results"]
    assert not [r for r in results if "error" in r]
    assert {r["suite"] for r in results} == {"prefill", "decode", "ragged", "grouped"}
    assert {r["impl"] for r in results} == {"xla", "dense_matmul"}
    grouped = {r["case"] for r in results if r["suite"] == "grouped"}
    assert len(grouped) == 8  # 2 models x 2 projections x balanced/skewed routing
    for r in results:
        assert r["time_ms"] > 0 and r["tflops"] > 0 and r["gbps"] > 0


def test_bench_sampler_writes_json(tmp_path):
    """scripts/bench_sampler.py on SmolLM2's real logits: a time and the nucleus size per batch."""
    out = tmp_path / "sampler.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_sampler.py"), f"--output={out}", "--rows=1,2",
                    "--iters=1"], check=True, cwd=ROOT, timeout=300)
    points = json.loads(out.read_text())["points"]
    assert [p["rows"] for p in points] == [1, 2]
    assert all(p["ms"] > 0 and 1 <= p["kept_min"] <= p["kept_max"] < p["vocab"] for p in points)
