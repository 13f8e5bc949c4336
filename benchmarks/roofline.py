"""Roofline: bytes and FLOPs of a decode step and a prefill chunk from a ModelConfig, and device peaks.

A step's roofline time is max(bytes / bandwidth, FLOPs / peak): weights are read once per step
(MoE: only the experts the step's tokens route to, in expectation), each sequence reads its own
KV context, and every token does 2 FLOPs per matmul weight plus attention over its context.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from engine.kv_cache import bytes_per_token
from models.config import ModelConfig
from models.param_counts import param_counts


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Bytes moved and FLOPs done by one step."""

    bytes: float
    flops: float

    def __add__(self, other: "StepCost") -> "StepCost":
        return StepCost(self.bytes + other.bytes, self.flops + other.flops)


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    """Memory bandwidth (bytes/s) and matmul peak (FLOP/s) of one device; source: 'table' or 'probe'."""

    name: str
    bandwidth: float
    flops: float
    source: str = "table"

    def seconds(self, cost: StepCost) -> float:
        """The roofline time of `cost`: whichever of memory and compute takes longer."""
        return max(cost.bytes / self.bandwidth, cost.flops / self.flops)


# Dense bf16 peaks (no sparsity) and HBM bandwidth.
GPU_PEAKS = {
    "h100": DevicePeaks("H100 SXM", 3.35e12, 989e12),
    "h200": DevicePeaks("H200", 4.8e12, 989e12),
    "b200": DevicePeaks("B200", 8.0e12, 2250e12),
}


def active_experts(config: ModelConfig, num_tokens: int) -> float:
    """Expected distinct routed experts per MoE layer hit by `num_tokens` tokens (uniform routing)."""
    e, k = config.moe.num_experts, config.moe.num_experts_per_tok
    return e * (1.0 - (1.0 - k / e) ** num_tokens)


def weight_params_read(config: ModelConfig, num_tokens: int) -> float:
    """Parameters one step over `num_tokens` tokens reads (an untied input embedding only gathers rows)."""
    p = param_counts(config)
    params = p.total - p.embedding
    if config.moe is not None:
        params -= (p.num_experts - active_experts(config, num_tokens)) * p.routed_expert
    return params


def matmul_params_per_token(config: ModelConfig) -> int:
    """Weights each token multiplies by (its top-k experts only)."""
    p = param_counts(config)
    return p.active - p.embedding


def _attention_flops_per_key(config: ModelConfig) -> int:
    """FLOPs of one query attending to one key: QK^T plus PV over all heads."""
    v_dim = config.mla.v_head_dim if config.mla else config.head_dim
    return 2 * config.num_heads * (config.head_dim + v_dim)


def _keys_seen(config: ModelConfig, layer: int, context: int) -> int:
    window = config.layer_sliding_window(layer)
    return context if window is None else min(context, window)


def attention_cost(config: ModelConfig, query_contexts: Sequence[int], kv_contexts: Sequence[int],
                   kv_dtype_bytes: int) -> StepCost:
    """Attention FLOPs over each query's context and the KV bytes each sequence reads, all layers."""
    per_layer_kv = bytes_per_token(config, kv_dtype_bytes) / config.num_layers
    flops = bytes_ = 0.0
    for layer in range(config.num_layers):
        flops += _attention_flops_per_key(config) * sum(_keys_seen(config, layer, c) for c in query_contexts)
        bytes_ += per_layer_kv * sum(_keys_seen(config, layer, c) for c in kv_contexts)
    return StepCost(bytes_, flops)


def decode_step_cost(config: ModelConfig, context_lens: Sequence[int], weight_bytes: float,
                     kv_dtype_bytes: int) -> StepCost:
    """One decode step: one new token per sequence; context_lens include the new token."""
    batch = len(context_lens)
    weights = StepCost(weight_params_read(config, batch) * weight_bytes,
                       2.0 * matmul_params_per_token(config) * batch)
    kv_write = StepCost(batch * bytes_per_token(config, kv_dtype_bytes), 0.0)
    return weights + kv_write + attention_cost(config, context_lens, context_lens, kv_dtype_bytes)


def prefill_chunk_cost(config: ModelConfig, chunk: int, start: int, weight_bytes: float,
                       kv_dtype_bytes: int) -> StepCost:
    """One prefill chunk of `chunk` tokens after `start` cached ones (causal attention)."""
    weights = StepCost(weight_params_read(config, chunk) * weight_bytes,
                       2.0 * matmul_params_per_token(config) * chunk)
    kv_write = StepCost(chunk * bytes_per_token(config, kv_dtype_bytes), 0.0)
    queries = [start + i + 1 for i in range(chunk)]
    return weights + kv_write + attention_cost(config, queries, [start], kv_dtype_bytes)


def ideal_serving_seconds(config: ModelConfig, input_lens: Sequence[int], output_lens: Sequence[int],
                          concurrency: int, peaks: DevicePeaks, weight_bytes: float, kv_dtype_bytes: int,
                          prefill_chunk: int = 512) -> float:
    """Roofline time of a serving run: every prompt prefilled in chunks, then decode at batch
    `concurrency` at the mean context (prompt + half the output), one token per sequence per step."""
    prefill = 0.0
    for n in input_lens:
        for start in range(0, n, prefill_chunk):
            prefill += peaks.seconds(prefill_chunk_cost(config, min(prefill_chunk, n - start), start,
                                                        weight_bytes, kv_dtype_bytes))
    decode_tokens = sum(max(0, n - 1) for n in output_lens)
    mean_context = int(np.mean(input_lens) + np.mean(output_lens) / 2)
    step = peaks.seconds(decode_step_cost(config, [mean_context] * concurrency, weight_bytes, kv_dtype_bytes))
    return prefill + decode_tokens / concurrency * step


def serving_estimate(config: ModelConfig, isl: int, osl: int, concurrency: int, devices: int, peaks: DevicePeaks,
                     weight_bytes: float, kv_dtype_bytes: int, prefill_chunk: int = 512) -> dict[str, float]:
    """Roofline estimate of an InferenceX-style run on `devices` GPUs of `peaks` (their bandwidth and
    FLOPs pooled, perfect overlap and scaling: an upper bound): `concurrency` requests of isl
    input and osl output tokens. Throughput counts input + output tokens per GPU, as InferenceX
    does; tok/s/user is one over the decode step at that concurrency. A request's prefill chunks
    ride in mixed steps whose weights the decode rows read anyway, so they cost their FLOPs and KV
    traffic only. weight_bytes: per parameter (a packed model's bytes / its parameters)."""
    pooled = DevicePeaks(f"{devices} x {peaks.name}", devices * peaks.bandwidth, devices * peaks.flops)
    starts = range(0, isl, prefill_chunk)
    chunks = [prefill_chunk_cost(config, min(prefill_chunk, isl - s), s, weight_bytes, kv_dtype_bytes) for s in starts]
    weights = sum(weight_params_read(config, min(prefill_chunk, isl - s)) * weight_bytes for s in starts)
    prefill = pooled.seconds(StepCost(sum(c.bytes for c in chunks) - weights, sum(c.flops for c in chunks)))
    step = pooled.seconds(decode_step_cost(config, [isl + osl // 2] * concurrency, weight_bytes, kv_dtype_bytes))
    seconds = concurrency * prefill + (osl - 1) * step
    return {"decode_step_ms": 1e3 * step, "prefill_seconds_per_request": prefill, "run_seconds": seconds,
            "total_tok_s_per_gpu": concurrency * (isl + osl) / seconds / devices,
            "output_tok_s_per_gpu": concurrency * osl / seconds / devices, "tok_s_per_user": 1.0 / step}


def _best_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def probe_peaks(dtype: str = "float32", *, bandwidth_mib: int = 256, matmul_n: int = 2048,
                repeats: int = 5) -> DevicePeaks:
    """Measure the default device's read bandwidth (a jitted sum) and matmul peak (an n^3 matmul)."""
    x = jnp.ones((bandwidth_mib << 20) // 4, jnp.float32)
    bandwidth = x.nbytes / _best_seconds(jax.jit(jnp.sum), x, repeats=repeats)
    a = jnp.ones((matmul_n, matmul_n), dtype)
    flops = 2.0 * matmul_n**3 / _best_seconds(jax.jit(jnp.matmul), a, a, repeats=repeats)
    return DevicePeaks(f"{jax.devices()[0].device_kind} ({dtype})", bandwidth, flops, source="probe")


def device_peaks(dtype: str = "float32", kind: str | None = None) -> DevicePeaks:
    """Table peaks for a known GPU kind (default: the default device's; a server's, say), else a
    probe of this machine's default device."""
    kind = (jax.devices()[0].device_kind if kind is None else kind).lower()
    for key, peaks in GPU_PEAKS.items():
        if key in kind:
            return peaks
    return probe_peaks(dtype)
