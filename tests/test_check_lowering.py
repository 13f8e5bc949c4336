"""scripts/check_lowering.py lowers every full-size preset's engine steps for an abstract H100."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FULL_SIZE_PRESETS = ["llama3-8b", "llama3.3-70b", "gpt-oss-120b", "deepseek-v3"]


def run_check(*flags: str) -> subprocess.CompletedProcess:
    """The script on this checkout's packages (PYTHONPATH: not whichever checkout is installed)."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "check_lowering.py"), *flags], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("preset", FULL_SIZE_PRESETS)
def test_full_size_preset_lowers_for_h100(preset):
    result = run_check(f"--model={preset}", "--batch=64", "--context=4096")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("lowered") == 2 and "FAILED" not in result.stdout  # decode and mixed steps


def test_a_kernel_that_cannot_lower_fails_the_check_by_name():
    """1024-token pages make paged attention's KV block 1024 tokens: too big for SMEM."""
    result = run_check("--model=llama3-8b", "--batch=2", "--context=4096", "--tokens=8", "--page_size=1024")
    assert result.returncode == 1
    assert "LOWERING FAILED: llama3-8b decode step: paged_attention(bfloat16[2, 1, 32, 128]" in result.stderr
    assert "exceeds available shared memory" in result.stderr
