"""Times ragged paged attention on CPU against today's padded paths; writes JSON.

At SmolLM2-135M shapes (Hq=9, Hkv=3, D=64, page_size=16; pages scattered in a pool), for each
batch: ops.ragged_paged_attention per impl ("cpu": the C++ kernel's native ragged mode, one work
item per (sequence, KV head); "xla": tiles of rpa.BLOCK_Q rows on the jnp page loop, or per token
when max_query_len == 1); the C++ kernel through the per-token reduction (every token a Q=1 row,
the "cpu" path before the ragged mode); for prefill also XLA per token, the tiled reduction at
other tile sizes and on the C++ kernel; and as the baselines today's padded calls
(ops.paged_attention with q [R, C, Hq, D], one call per distinct query length, impl "xla" and
"cpu"). Variants are interleaved (one call of each per round); the median per variant is
reported with its ratio to the padded XLA path. The ragged calls get the engine's shapes: S =
max_num_seqs (zero-length sequences after the real ones) and T a power-of-two bucket (padding
rows after).

  python scripts/bench_ragged_attention.py --output=benchmarks/results/cpu-ragged-attention.json
"""

import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_paged_attention as cpa
from pallas_kernels import ops
from pallas_kernels import paged_attention as pa
from pallas_kernels import ragged_paged_attention as rpa

OUTPUT = flags.DEFINE_string("output", "benchmarks/results/cpu-ragged-attention.json", "JSON file to write")
ROUNDS = flags.DEFINE_integer("rounds", 7, "timed rounds (one call of every variant each); median reported")
DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "cache and query dtypes")
BATCHES = flags.DEFINE_list("batches", ["mixed", "decode", "prefill_512"], "which batches to time")

SMOLLM2 = dict(num_heads=9, num_kv_heads=3, head_dim=64)
PAGE_SIZE = 16
MAX_NUM_SEQS = 32


@dataclasses.dataclass(frozen=True)
class Batch:
    """One engine step: seqs [(context_len, q_len)] and the static max_query_len hint it passes."""

    name: str
    seqs: tuple[tuple[int, int], ...]
    max_query_len: int | None

    @property
    def num_tokens(self) -> int:
        """The power-of-two token bucket the engine pads the step to."""
        return 1 << (sum(q for _, q in self.seqs) - 1).bit_length()


BATCH_DEFS = {
    "mixed": Batch("mixed: 8 x 256-token chunks at context 256 + 8 decode rows at context ~300",
                   tuple([(256, 256)] * 8 + [(296 + i, 1) for i in range(8)]), None),
    "decode": Batch("decode: 32 rows of 1 token at context 300", tuple([(300, 1)] * 32), 1),
    "prefill_512": Batch("prefill: one 512-token chunk at context 512", ((512, 512),), None),
}


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A batch's ragged arguments (S = MAX_NUM_SEQS, T = the bucket) and its padded groups."""

    ragged: tuple[jax.Array, ...]  # q [T,Hq,D], k_pages, v_pages, query_start_loc, context_lens, block_tables
    padded: tuple[tuple[jax.Array, ...], ...]  # per distinct q_len C: q [R,C,Hq,D], block_tables, context_lens


def make_inputs(batch: Batch, dtype: jnp.dtype, seed: int = 0) -> Inputs:
    """Random q and pages, each sequence's pages scattered through a shuffled pool."""
    rng = np.random.default_rng(seed)
    hq, hkv, d = SMOLLM2["num_heads"], SMOLLM2["num_kv_heads"], SMOLLM2["head_dim"]
    seqs = list(batch.seqs) + [(0, 0)] * (MAX_NUM_SEQS - len(batch.seqs))
    max_pages = max(-(-n // PAGE_SIZE) for n, _ in seqs)
    num_pages = 1 + sum(-(-n // PAGE_SIZE) for n, _ in seqs) * 2
    free = list(rng.permutation(np.arange(1, num_pages)))
    tables = np.zeros((len(seqs), max_pages), np.int32)
    for i, (n, _) in enumerate(seqs):
        tables[i, : -(-n // PAGE_SIZE)] = [free.pop() for _ in range(-(-n // PAGE_SIZE))]
    k_pages, v_pages = (jnp.asarray(rng.normal(size=(hkv, num_pages, PAGE_SIZE, d)), dtype) for _ in range(2))
    starts = np.concatenate([[0], np.cumsum([q for _, q in seqs])]).astype(np.int32)
    q = rng.normal(size=(batch.num_tokens, hq, d))
    lens = np.array([n for n, _ in seqs], np.int32)
    padded = []
    for q_len in sorted({q for _, q in batch.seqs}):
        rows = [s for s, (_, c) in enumerate(batch.seqs) if c == q_len]
        q_rows = np.stack([q[starts[s] : starts[s + 1]] for s in rows])  # [R, C, Hq, D]
        padded.append((jnp.asarray(q_rows, dtype), jnp.asarray(tables[rows]), jnp.asarray(lens[rows])))
    ragged = (jnp.asarray(q, dtype), k_pages, v_pages, jnp.asarray(starts), jnp.asarray(lens), jnp.asarray(tables))
    return Inputs(ragged, tuple(padded))


def variants(batch: Batch, inputs: Inputs) -> dict[str, Callable[[], jax.Array]]:
    """Thunks over jitted calls: the ragged impls, tiling variants and the padded baselines."""
    q, k_pages, v_pages, *_ = inputs.ragged

    def ragged(fn: Callable[..., jax.Array]) -> Callable[[], jax.Array]:
        compiled = jax.jit(fn)
        return lambda: compiled(*inputs.ragged)

    def padded(impl: str) -> Callable[[], jax.Array]:
        compiled = jax.jit(lambda k, v, groups: [ops.paged_attention(g[0], k, v, g[1], g[2], impl=impl)
                                                 for g in groups])
        return lambda: compiled(k_pages, v_pages, inputs.padded)

    out = {
        "ragged_cpu": ragged(functools.partial(ops.ragged_paged_attention, impl="cpu",
                                               max_query_len=batch.max_query_len)),
        "ragged_xla": ragged(functools.partial(ops.ragged_paged_attention, impl="xla",
                                               max_query_len=batch.max_query_len)),
        "ragged_cpu_per_token": ragged(functools.partial(rpa.ragged_paged_attention_per_token,
                                                         cpa.paged_attention_cpu)),
        "padded_xla": padded("xla"),
        "padded_cpu": padded("cpu"),
    }
    if batch.max_query_len != 1:  # per token and tile sizes around BLOCK_Q on XLA, tiles on the C++ kernel
        out["ragged_xla_per_token"] = ragged(functools.partial(
            rpa.ragged_paged_attention_per_token, pa.paged_attention_blocked))
        for block_q in (16, 64):
            out[f"ragged_xla_tiles_{block_q}"] = ragged(functools.partial(
                rpa.ragged_paged_attention_tiled, pa.paged_attention_blocked, block_q=block_q))
        out[f"ragged_cpu_tiles_{rpa.BLOCK_Q}"] = ragged(functools.partial(
            rpa.ragged_paged_attention_tiled, cpa.paged_attention_cpu, block_q=rpa.BLOCK_Q))
    return out


def time_interleaved(thunks: dict[str, Callable[[], jax.Array]], rounds: int) -> dict[str, float]:
    """Median wall ms per thunk after one warm-up (compile) call each, one call of each per round."""
    for thunk in thunks.values():
        jax.block_until_ready(thunk())
    times = {name: [] for name in thunks}
    for _ in range(rounds):
        for name, thunk in thunks.items():
            start = time.perf_counter()
            jax.block_until_ready(thunk())
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv):
    del argv
    unknown = set(BATCHES.value) - set(BATCH_DEFS)
    if unknown:
        raise app.UsageError(f"unknown batches {sorted(unknown)}; choose from {sorted(BATCH_DEFS)}")
    results = []
    for dtype in DTYPES.value:
        for key in BATCHES.value:
            batch = BATCH_DEFS[key]
            inputs = make_inputs(batch, jnp.dtype(dtype))
            ms = time_interleaved(variants(batch, inputs), ROUNDS.value)
            ratios = {name: t / ms["padded_xla"] for name, t in ms.items()}
            logging.info("%s %s: %s", dtype, key, {n: f"{t:.2f} ms ({ratios[n]:.2f}x)" for n, t in ms.items()})
            results.append({"batch": key, "description": batch.name, "dtype": dtype,
                            "num_tokens": batch.num_tokens, "num_seqs": MAX_NUM_SEQS,
                            "real_tokens": sum(q for _, q in batch.seqs), "max_query_len": batch.max_query_len,
                            "ms": ms, "ratio_to_padded_xla": ratios})
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "shapes": {**SMOLLM2, "page_size": PAGE_SIZE, "block_q": rpa.BLOCK_Q},
        "rounds": ROUNDS.value,
        "results": results,
    }
    Path(OUTPUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(OUTPUT.value).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
