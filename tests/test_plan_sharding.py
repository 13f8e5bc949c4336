"""plan_sharding.py on simulated devices: gpt-oss-120b compiles from abstract shapes within the
time limit, its parameter count matches the config, its MXFP4 experts count their packed bytes,
it fits one H200, and the report is self-consistent."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharding.hlo import collectives, shape_bytes

ROOT = Path(__file__).resolve().parents[1]
GPT_OSS_120B_BYTES = 65.25e9  # MXFP4 experts + bf16 rest: OpenAI's 60.8 GiB checkpoint (docs/scale.md)
GPT_OSS_120B_EXPERT_BYTES = 36 * 128 * (2 * 2880 + 2880) * (2880 // 2 + 2880 // 32)  # e2m1 pairs + e8m0 scales


def plan(*flags: str) -> dict:
    """The script's JSON report for these flags (it must finish within two minutes)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "scripts/plan_sharding.py", *flags],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert elapsed < 120, f"plan took {elapsed:.0f} s"
    return json.loads(result.stdout)


def test_collectives_parsed_from_hlo():
    hlo = """
  %all-reduce.1 = f32[8,128]{1,0} all-reduce(f32[8,128]{1,0} %x), replica_groups={{0,1}}, to_apply=%add
  %a2a = (bf16[2,4]{1,0}, bf16[2,4]{1,0}) all-to-all(bf16[2,4]{1,0} %p, bf16[2,4]{1,0} %q), dimensions={0}
  %ag = bf16[16]{0} all-gather-start(bf16[2]{0} %y), dimensions={0}
  %add.3 = f32[8,128]{1,0} add(f32[8,128]{1,0} %a, f32[8,128]{1,0} %b)
"""
    assert shape_bytes("(f32[8,128], bf16[4])") == 8 * 128 * 4 + 8
    assert collectives(hlo) == {"all-reduce": {"count": 1, "bytes": 4096}, "all-to-all": {"count": 1, "bytes": 32},
                                "all-gather": {"count": 1, "bytes": 32}}


@pytest.mark.timeout(300)
def test_gpt_oss_120b_plan_on_8_devices():
    report = plan("--model=gpt-oss-120b", "--expert=8", "--rules=expert_dp", "--batch=64", "--context=2048")
    assert report["devices"] == 8 and report["mesh"] == {"data": 1, "tensor": 1, "expert": 8}
    assert report["param_count"] == pytest.approx(116.83e9, rel=1e-3)  # OpenAI's model card
    assert report["active_param_count"] - 201088 * 2880 == pytest.approx(5.13e9, rel=2e-2)
    assert report["weights"] == "native" and report["quantization"] == "mxfp4"
    per_device = report["per_device"]
    # Packed experts (most of the model) split 8 ways, attention and embeddings (bf16) replicated.
    rest = GPT_OSS_120B_BYTES - GPT_OSS_120B_EXPERT_BYTES
    assert per_device["param_bytes"] == pytest.approx(GPT_OSS_120B_EXPERT_BYTES / 8 + rest, rel=1e-2)
    # 64 x 2048 tokens x 36 layers x K,V x 8 heads x 64 x bf16, pages split over the 8 expert groups.
    assert per_device["kv_cache_bytes"] == pytest.approx(64 * 2048 * 36 * 2 * 8 * 64 * 2 / 8, rel=0.01)
    assert "all-to-all" in report["prefill"]["collectives"]  # prefill dispatches all-to-all
    assert report["decode"]["memory"]["temp_bytes"] > 0


@pytest.mark.timeout(600)
def test_gpt_oss_120b_native_fits_one_h200():
    """65.25 GB of weights (60.8 GiB) leave 90% of an H200 room for InferenceX's 8k1k at concurrency
    64 (bf16 KV, max length 8192 + 1024 + 256) and the steps; 90% of 100 GiB does not, and says why."""
    workload = ("--model=gpt-oss-120b", "--devices=1", "--concurrency=64", "--isl=8192", "--osl=1024")
    report = plan(*workload, "--hbm_gib=141")
    per_device = report["per_device"]
    assert (report["batch"], report["context"], report["headroom"]) == (64, 9472, 0.9)
    assert per_device["param_bytes"] == pytest.approx(GPT_OSS_120B_BYTES, rel=1e-3)
    assert per_device["kv_dtype"] == "bfloat16" and per_device["kv_token_bytes"] == 36 * 2 * 8 * 64 * 2
    assert per_device["kv_capacity_tokens"] == int((0.9 * 141 * 2**30 - per_device["param_bytes"])
                                                   // (36 * 2 * 8 * 64 * 2))
    assert report["fits"] and "does_not_fit" not in report
    # 90% of 100 GiB: weights + KV alone (102.4) do not fit: the numbers, and no compile to learn it
    small = plan(*workload, "--hbm_gib=100")
    assert not small["fits"] and "decode" not in small and "memory" not in small["prefill"]
    assert re.fullmatch(r"102\.4 GiB per device needed \(weights 60\.77, KV 41\.6\d, steps not compiled\), "
                        r"90\.0 GiB available \(90% of 100\.0\)", small["does_not_fit"]), small["does_not_fit"]

