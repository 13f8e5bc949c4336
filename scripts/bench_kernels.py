"""Times the attention and grouped-GEMM kernels against their baselines; writes JSON.

On an H100/H200: Pallas (Mosaic GPU) vs cuDNN (`jax.nn.dot_product_attention`), the XLA
reference, `jax.lax.ragged_dot` and a dense matmul of the same FLOPs, at real model shapes, with
the device's measured peak matmul TFLOP/s and copy GB/s so each result reads as a fraction of
the physical limit. Elsewhere (CPU): the XLA paths at shrunken shapes, so tests exercise it.

  python scripts/bench_kernels.py --output=benchmarks/results/kernels_h100.json
"""

import dataclasses
import json
from typing import Callable

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import time_ms
from pallas_kernels import ops
from pallas_kernels import paged_attention as pa
from pallas_kernels import ragged_paged_attention as rpa
from pallas_kernels import ragged_paged_attention_mgpu as rpm

OUTPUT = flags.DEFINE_string("output", None, "JSON file to write", required=True)
SMALL = flags.DEFINE_bool("small", None, "shrunken shapes (default: on when not on an sm_90 GPU)")
ITERS = flags.DEFINE_integer("iters", 20, "timed calls per measurement (median reported)")
SUITES = flags.DEFINE_list("suites", ["prefill", "decode", "ragged", "grouped"], "what to benchmark")

# Model shapes, from the published configs.
LLAMA3_8B = dict(q_heads=32, kv_heads=8, head_dim=128)
GPT_OSS_120B_EXPERTS = dict(experts=128, top_k=4, hidden=2880, intermediate=2880)
DEEPSEEK_V3_EXPERTS = dict(experts=256, top_k=8, hidden=7168, intermediate=2048)
DEEPSEEK_V3_EXPERT_PARALLEL = 8  # its 256 experts do not fit one GPU: time one EP shard of 32
PAGE_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark point: a name, the impls to time (each a thunk) and its FLOPs and bytes."""

    suite: str
    name: str
    impls: dict[str, Callable[[], jax.Array]]
    flops: float
    bytes: float


def measure_peaks(small: bool, iters: int) -> dict[str, float]:
    """Peak bf16 matmul TFLOP/s and copy GB/s of this device, measured once."""
    n = 512 if small else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda x: x @ x)
    matmul_ms = time_ms(lambda: mm(a), iters)
    x = jnp.ones(((1 << 20) if small else (1 << 31),), jnp.bfloat16)
    copy = jax.jit(lambda y: y * 2)
    copy_ms = time_ms(lambda: copy(x), iters)
    return {"matmul_tflops": 2 * n**3 / matmul_ms / 1e9, "copy_gbps": 2 * x.nbytes / copy_ms / 1e6}


def jitted(fn: Callable, *args) -> Callable[[], jax.Array]:
    """A thunk that runs jit(fn) on fixed args."""
    compiled = jax.jit(fn)
    return lambda: compiled(*args)


def normal(key: int, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.key(key), shape, jnp.bfloat16)


def prefill_cases(small: bool, on_gpu: bool) -> list[Case]:
    """Causal self-attention prefill at Llama-3-8B heads, 1k-8k tokens (batch 1)."""
    hq, hkv, d = (4, 2, 64) if small else tuple(LLAMA3_8B.values())
    cases = []
    for t in ((128,) if small else (1024, 2048, 4096, 8192)):
        q, k, v = normal(0, (1, t, hq, d)), normal(1, (1, t, hkv, d)), normal(2, (1, t, hkv, d))
        impls = {"xla": jitted(lambda q, k, v: ops.flash_attention(q, k, v, impl="xla"), q, k, v)}
        if on_gpu:
            impls["pallas"] = jitted(lambda q, k, v: ops.flash_attention(q, k, v, impl="pallas"), q, k, v)
            impls["cudnn"] = jitted(
                lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"), q, k, v
            )
        flops = 4 * hq * d * t * (t + 1) / 2
        cases.append(Case("prefill", f"llama3_8b_causal_t{t}", impls, flops, 4 * t * d * (hq + hkv)))
    return cases


def decode_cases(small: bool, on_gpu: bool) -> list[Case]:
    """Paged decode (Q=1) at Llama-3-8B heads over batch x context, every sequence full-length."""
    hq, hkv, d = (4, 2, 64) if small else tuple(LLAMA3_8B.values())
    points = ((2, 256),) if small else ((1, 1024), (1, 32768), (16, 8192), (64, 4096), (256, 1024), (256, 4096))
    cases = []
    for batch, context in points:
        pages_per_seq = context // PAGE_SIZE
        num_pages = batch * pages_per_seq + 1
        k_pages = normal(1, (hkv, num_pages, PAGE_SIZE, d))
        v_pages = normal(2, (hkv, num_pages, PAGE_SIZE, d))
        tables = jnp.arange(1, num_pages, dtype=jnp.int32).reshape(batch, pages_per_seq)
        lens = jnp.full((batch,), context, jnp.int32)
        q = normal(0, (batch, 1, hq, d))
        args = (q, k_pages, v_pages, tables, lens)
        impls = {"xla": jitted(lambda *a: ops.paged_attention(*a, impl="xla"), *args)}
        if on_gpu:
            impls["pallas"] = jitted(lambda *a: ops.paged_attention(*a, impl="pallas"), *args)
        kv_bytes = 2 * batch * context * hkv * d * 2
        cases.append(
            Case(
                "decode",
                f"llama3_8b_decode_b{batch}_ctx{context}",
                impls,
                4 * batch * hq * d * context,
                kv_bytes + 4 * batch * hq * d,
            )
        )
    return cases


def ragged_cases(small: bool, on_gpu: bool) -> list[Case]:
    """A mixed step at Llama-3-8B heads: one prefill chunk and decode rows, every sequence at the
    same context (chunk 1: a decode-only step); on a GPU the native ragged kernel beside itself
    with the A/B-swapped decode tile off (decode rows padded to 64) and the per-token adapter."""
    hq, hkv, d = (4, 2, 64) if small else tuple(LLAMA3_8B.values())
    points = ((4, 13, 256),) if small else ((64, 1, 4096), (64, 449, 4096), (256, 257, 1024), (8, 2041, 8192))
    cases = []
    for seqs, chunk, context in points:  # chunk + seqs - 1 decode rows
        pages_per_seq = context // PAGE_SIZE
        num_pages = seqs * pages_per_seq + 1
        k_pages = normal(1, (hkv, num_pages, PAGE_SIZE, d))
        v_pages = normal(2, (hkv, num_pages, PAGE_SIZE, d))
        tables = jnp.arange(1, num_pages, dtype=jnp.int32).reshape(seqs, pages_per_seq)
        tokens = chunk + seqs - 1
        starts = jnp.asarray(np.concatenate([[0], chunk + np.arange(seqs)]), jnp.int32)
        args = (normal(0, (tokens, hq, d)), k_pages, v_pages, starts, jnp.full((seqs,), context, jnp.int32), tables)
        impls = {"xla": jitted(lambda *a: ops.ragged_paged_attention(*a, impl="xla"), *args)}
        if on_gpu:
            impls["pallas"] = jitted(lambda *a: ops.ragged_paged_attention(*a, impl="pallas"), *args)
            no_decode_tile = rpm.RaggedAttentionConfig(decode_rows=0)
            impls["pallas_64_row_decode"] = jitted(
                lambda *a: rpm.ragged_paged_attention_kernel(*a, config=no_decode_tile), *args)
            per_token = lambda *a: rpa.ragged_paged_attention_per_token(pa.paged_attention_kernel, *a)  # noqa: E731
            impls["pallas_per_token"] = jitted(per_token, *args)
        visible = (seqs - 1) * context + chunk * (context - chunk) + chunk * (chunk + 1) / 2
        kv_bytes = 2 * seqs * context * hkv * d * 2
        cases.append(Case("ragged", f"llama3_8b_mixed_s{seqs}_chunk{chunk}_ctx{context}", impls,
                          4 * hq * d * visible, kv_bytes + 4 * tokens * hq * d))
    return cases


def routed_group_sizes(rows: int, experts: int, skewed: bool) -> jax.Array:
    """Rows per expert: equal (balanced) or Zipf-like (skewed: a few hot experts)."""
    weights = 1.0 / np.arange(1, experts + 1) if skewed else np.ones(experts)
    sizes = np.floor(rows * weights / weights.sum()).astype(np.int32)
    sizes[0] += rows - sizes.sum()
    return jnp.asarray(sizes)


def grouped_cases(small: bool, on_gpu: bool) -> list[Case]:
    """Expert GEMMs (gate+up fused, then down) of 4096 tokens: all 128 gpt-oss-120b experts on
    one GPU; one 32-expert shard of DeepSeek-V3 (EP 8) with its share of the routed rows."""
    models = {
        "gpt_oss_120b": (GPT_OSS_120B_EXPERTS, 1),
        "deepseek_v3_ep8": (DEEPSEEK_V3_EXPERTS, DEEPSEEK_V3_EXPERT_PARALLEL),
    }
    tokens = 64 if small else 4096
    cases = []
    for model, (cfg, shards) in models.items():
        experts = 8 if small else cfg["experts"] // shards
        hidden, inter = (128, 128) if small else (cfg["hidden"], cfg["intermediate"])
        rows = tokens * cfg["top_k"] // shards
        for skewed in (False, True):
            for proj, (k, n) in {"gate_up": (hidden, 2 * inter), "down": (inter, hidden)}.items():
                lhs, rhs = normal(0, (rows, k)), normal(1, (experts, k, n))
                sizes = routed_group_sizes(rows, experts, skewed)
                gmm = lambda impl: jitted(lambda *a: ops.grouped_matmul(*a, impl=impl), lhs, rhs, sizes)
                impls = {"xla": gmm("xla"), "dense_matmul": jitted(lambda a, b: a @ b[0], lhs, rhs)}
                if on_gpu:
                    impls["pallas"] = gmm("pallas")
                    impls["ragged_dot"] = jitted(jax.lax.ragged_dot, lhs, rhs, sizes)
                routing = "skewed" if skewed else "balanced"
                cases.append(
                    Case(
                        "grouped",
                        f"{model}_{proj}_{routing}_m{rows}",
                        impls,
                        2 * rows * k * n,
                        2 * (rows * k + experts * k * n + rows * n),
                    )
                )
    return cases


def run_case(case: Case, peaks: dict[str, float], iters: int) -> list[dict]:
    """Times each impl of a case; an impl that fails is recorded with its error, not fatal."""
    rows = []
    for impl, fn in case.impls.items():
        row = {"suite": case.suite, "case": case.name, "impl": impl}
        try:
            ms = time_ms(fn, iters)
        except Exception as e:  # a failing kernel must not hide the other results
            logging.exception("%s/%s failed", case.name, impl)
            rows.append(row | {"error": f"{type(e).__name__}: {e}"[:2000]})
            continue
        tflops, gbps = case.flops / ms / 1e9, case.bytes / ms / 1e6
        rows.append(
            row
            | {
                "time_ms": ms,
                "tflops": tflops,
                "gbps": gbps,
                "frac_peak_tflops": tflops / peaks["matmul_tflops"],
                "frac_peak_gbps": gbps / peaks["copy_gbps"],
            }
        )
        print(f"{case.name:45s} {impl:13s} {ms:9.3f} ms {tflops:8.2f} TFLOP/s {gbps:8.1f} GB/s")
    return rows


def main(argv):
    del argv
    on_gpu = ops.is_sm90_gpu()
    small = (not on_gpu) if SMALL.value is None else SMALL.value
    builders = {"prefill": prefill_cases, "decode": decode_cases, "ragged": ragged_cases, "grouped": grouped_cases}
    unknown = set(SUITES.value) - set(builders)
    if unknown:
        raise app.UsageError(f"unknown suites {sorted(unknown)}; choose from {sorted(builders)}")
    peaks = measure_peaks(small, ITERS.value)
    results = []
    for suite in SUITES.value:
        for case in builders[suite](small, on_gpu):
            results.extend(run_case(case, peaks, ITERS.value))
    device = jax.devices()[0]
    report = {
        "device": device.device_kind,
        "platform": device.platform,
        "small": small,
        "jax_version": jax.__version__,
        "peaks": peaks,
        "results": results,
    }
    with open(OUTPUT.value, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
