"""scripts/profile_decode.py runs end to end on tiny-llama and its numbers hang together."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_profile_decode_writes_consistent_json(tmp_path):
    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_decode.py"), "--model=tiny-llama",
                    "--batch=1,4", "--context=40", "--iters=3", "--trace", f"--output={out}"],
                   check=True, cwd=tmp_path, timeout=300)
    report = json.loads(out.read_text())
    assert report["model"] == "tiny-llama" and report["context"] == 40
    assert report["attention_impl"] in ("cpu", "xla")  # "auto" on CPU: the faster one, measured
    assert report["peaks"]["source"] == "probe" and report["peaks"]["bandwidth_gb_s"] > 0
    assert [p["batch"] for p in report["points"]] == [1, 4]
    for p in report["points"]:
        assert p["step_ms"] > 0 and p["attention_ms"] > 0
        assert p["tok_s"] == pytest.approx(1e3 * p["batch"] / p["step_ms"])
        assert p["roofline_fraction"] == pytest.approx(p["roofline_step_ms"] / p["step_ms"])
        assert 0 < p["roofline_fraction"] < 1
        ops = p["ops_per_call"]
        assert ops and all(op["ms"] > 0 and op["count"] >= 1 and "[" in op["shape"] for op in ops)
        assert [op["ms"] for op in ops] == sorted((op["ms"] for op in ops), reverse=True)
