"""Roofline bytes and FLOPs against hand-computed numbers for tiny-llama.

tiny-llama: vocab 256, hidden 64, MLP 128, 2 layers, 4 heads, 2 KV heads of 16, untied embeddings.
Per layer: attention 64*16*(2*4+2*2) = 12288, MLP 3*64*128 = 24576, norms 128 -> 36992;
total 2*36992 + 2*256*64 + 64 = 106816; read per step (the input embedding is only gathered) 90432.
KV per token: 2 (K, V) * 2 layers * 2 heads * 16 * 4 bytes = 512; attention FLOPs per key per
layer: 2 * 4 heads * (16 + 16) = 256.
"""

import dataclasses

import pytest

from benchmarks import roofline
from models import get_preset, param_counts

TINY = get_preset("tiny-llama")


def test_param_counts():
    assert param_counts(TINY).total == 106816
    assert roofline.weight_params_read(TINY, 1) == 90432
    assert roofline.matmul_params_per_token(TINY) == 90432
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    assert roofline.weight_params_read(tied, 1) == param_counts(tied).total  # the tied table is the LM head


@pytest.mark.parametrize("preset,total,active,active_counts_embedding", [
    ("llama3-8b", 8.03e9, None, None), ("qwen3-8b", 8.2e9, None, None),
    ("gpt-oss-120b", 116.83e9, 5.13e9, False),  # OpenAI's model card: 116.83B, 5.13B active
    ("qwen3-30b-a3b", 30.5e9, 3.3e9, True),  # Qwen3 technical report
    ("deepseek-v3", 671e9, 37e9, True),  # DeepSeek-V3 report: 671B (the MTP module apart), 37B activated
])
def test_param_counts_match_published_sizes(preset, total, active, active_counts_embedding):
    """Counted from the parameter tree: the published totals and activated counts of the real models."""
    p = param_counts(get_preset(preset))
    assert p.total == pytest.approx(total, rel=3e-3)
    if active is None:
        assert p.active == p.total and p.routed_expert == 0
    else:
        assert p.active - (0 if active_counts_embedding else p.embedding) == pytest.approx(active, rel=2e-2)


def test_decode_step_cost():
    cost = roofline.decode_step_cost(TINY, [10, 20], weight_bytes=4, kv_dtype_bytes=4)
    # weights 90432*4 + KV writes 2*512 + KV reads 2 layers * 256 B * 30 tokens
    assert cost.bytes == 361728 + 1024 + 15360
    # 2 FLOPs * 90432 weights * 2 tokens + 256 * 30 keys * 2 layers
    assert cost.flops == 361728 + 15360


def test_prefill_chunk_cost():
    cost = roofline.prefill_chunk_cost(TINY, chunk=3, start=2, weight_bytes=4, kv_dtype_bytes=4)
    assert cost.bytes == 361728 + 3 * 512 + 2 * 256 * 2  # weights, 3 KV writes, 2 cached tokens read
    assert cost.flops == 2 * 90432 * 3 + 256 * 2 * (3 + 4 + 5)  # queries at positions 3, 4, 5 (causal)


def test_sliding_window_caps_keys():
    windowed = dataclasses.replace(TINY, layer_types=("sliding_attention", "full_attention"), sliding_window=4)
    cost = roofline.attention_cost(windowed, [10], [10], kv_dtype_bytes=4)
    assert cost.flops == 256 * (4 + 10) and cost.bytes == 256 * (4 + 10)


def test_moe_active_experts():
    moe = get_preset("tiny-gpt-oss")  # 4 experts, top-2, both layers MoE
    assert roofline.active_experts(moe, 1) == pytest.approx(2.0)
    assert roofline.active_experts(moe, 2) == pytest.approx(3.0)  # 4 * (1 - (1/2)^2)
    expert = 3 * 64 * 32 + 2 * 32 + 64
    untied = param_counts(moe).total - moe.vocab_size * moe.hidden_size
    assert roofline.weight_params_read(moe, 1) == pytest.approx(untied - 2 * 2 * expert)
    assert roofline.weight_params_read(moe, 2) == pytest.approx(untied - 2 * 1 * expert)
    assert roofline.matmul_params_per_token(moe) == untied - 2 * 2 * expert


def test_device_seconds_take_the_slower_roof():
    peaks = roofline.DevicePeaks("test", bandwidth=100.0, flops=1000.0)
    assert peaks.seconds(roofline.StepCost(bytes=200.0, flops=1000.0)) == 2.0
    assert peaks.seconds(roofline.StepCost(bytes=50.0, flops=3000.0)) == 3.0


def test_ideal_serving_seconds():
    peaks = roofline.DevicePeaks("test", bandwidth=1e9, flops=1e12)
    got = roofline.ideal_serving_seconds(TINY, [8, 8], [5, 5], concurrency=2, peaks=peaks, weight_bytes=4,
                                         kv_dtype_bytes=4, prefill_chunk=4)
    prefill = sum(peaks.seconds(roofline.prefill_chunk_cost(TINY, 4, s, 4, 4)) for s in (0, 4)) * 2
    decode = 8 / 2 * peaks.seconds(roofline.decode_step_cost(TINY, [10, 10], 4, 4))  # mean context 8 + 5/2
    assert got == pytest.approx(prefill + decode)


def test_serving_estimate():
    """Prefill chunks cost their FLOPs and KV traffic (not the weights the decode steps read), the
    decode steps run at the mean context, devices pool their peaks; throughput counts input + output
    tokens per GPU (InferenceX), tok/s/user is one over the decode step."""
    peaks = roofline.DevicePeaks("test", bandwidth=1e9, flops=1e12)
    got = roofline.serving_estimate(TINY, isl=8, osl=5, concurrency=2, devices=2, peaks=peaks, weight_bytes=4,
                                    kv_dtype_bytes=4, prefill_chunk=4)
    pooled = roofline.DevicePeaks("2 x test", bandwidth=2e9, flops=2e12)
    chunks = [roofline.prefill_chunk_cost(TINY, 4, s, 4, 4) for s in (0, 4)]
    weights = 2 * roofline.weight_params_read(TINY, 4) * 4
    prefill = pooled.seconds(roofline.StepCost(sum(c.bytes for c in chunks) - weights, sum(c.flops for c in chunks)))
    step = pooled.seconds(roofline.decode_step_cost(TINY, [10, 10], 4, 4))  # context 8 + 5 // 2
    seconds = 2 * prefill + 4 * step
    assert got["prefill_seconds_per_request"] == pytest.approx(prefill) and prefill < sum(map(pooled.seconds, chunks))
    assert got["run_seconds"] == pytest.approx(seconds) and got["tok_s_per_user"] == pytest.approx(1 / step)
    assert got["total_tok_s_per_gpu"] == pytest.approx(2 * 13 / seconds / 2)
    assert got["output_tok_s_per_gpu"] == pytest.approx(2 * 5 / seconds / 2)


def test_gpu_table():
    assert roofline.GPU_PEAKS["h100"].bandwidth == 3.35e12 and roofline.GPU_PEAKS["h100"].flops == 989e12
    assert roofline.GPU_PEAKS["h200"].bandwidth == 4.8e12 and roofline.GPU_PEAKS["b200"].bandwidth == 8e12


def test_probe_peaks_are_positive():
    peaks = roofline.probe_peaks(bandwidth_mib=8, matmul_n=128, repeats=1)
    assert peaks.source == "probe" and peaks.bandwidth > 1e8 and peaks.flops > 1e8
