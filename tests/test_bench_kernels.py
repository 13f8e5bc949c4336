"""scripts/bench_kernels.py runs end to end on CPU (XLA paths, small shapes) and writes JSON."""

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
