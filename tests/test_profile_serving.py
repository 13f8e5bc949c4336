"""scripts/profile_serving.py runs end to end on tiny-llama and its step profile adds up."""

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_profile_serving_writes_consistent_json(tmp_path):
    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_serving.py"), "--model=tiny-llama",
                    "--concurrency=4", "--num_prompts=12", "--isl=40", "--osl=12", "--max_num_batched_tokens=64",
                    "--multi_step_min_gain=none", f"--output={out}"], check=True, cwd=tmp_path, timeout=300)
    report = json.loads(out.read_text())
    (point,) = report["points"]
    assert point["concurrency"] == 4 and point["num_requests"] == 12
    steps = point["steps"]
    assert set(steps) <= {"mixed", "decode", "decode_multi"} and "mixed" in steps and "decode_multi" in steps
    assert steps["decode_multi"]["mean_prefill_tokens"] == 0 and steps["mixed"]["mean_prefill_tokens"] > 0
    # 12 prompts of 32-40 tokens: every prompt token is computed once, in mixed steps
    prefill = steps["mixed"]["steps"] * steps["mixed"]["mean_prefill_tokens"]
    assert 12 * 32 <= prefill <= 12 * 40
    assert sum(k["total_s"] for k in steps.values()) <= point["duration_s"]
    assert all(0 <= k["median_host_ms"] <= k["median_ms"] for k in steps.values())
    assert point["metrics"]["output_tok_s"] > 0 and point["decode_roofline_ms"] > 0
    assert 0 <= point["queued_ms"]["median"] <= point["queued_ms"]["p99"]
