"""scripts/check_lowering.py lowers every full-size preset's engine steps for an abstract H100."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FULL_SIZE_PRESETS = ["llama3-8b", "llama3.3-70b", "gpt-oss-120b", "deepseek-v3"]


def run_check(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "check_lowering.py"), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("preset", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason="MLA head dim 576 exceeds SMEM and wgmma N"))
    if p == "deepseek-v3" else p for p in FULL_SIZE_PRESETS])
def test_full_size_preset_lowers_for_h100(preset):
    result = run_check(f"--model={preset}", "--batch=64", "--context=4096")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lowered" in result.stdout and "FAILED" not in result.stdout
