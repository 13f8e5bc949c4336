"""First-use self-check of the Pallas (Mosaic GPU) kernels against their plain-jnp references.

Interpret mode and cross-lowering on CPU cannot show what only the hardware does (a miscompiled
wgmma, a TMA that races, a hang), so the first time a process uses a kernel on an H100/H200,
ops' gate asks for result(kernel): fixed-seed bf16 cases (zero-length and one-token sequences,
page boundaries, several KV splits or query tiles, a sliding window crossing blocks, sinks, the
largest shape bucket) compared with the kernel's reference. Each kernel's cases run in a child
process under a timeout: a crashing or hung kernel can poison the CUDA context, and a hang counts
as a failure. Results are stored under $JAXSERVE_CACHE/selfcheck (default ~/.cache/jaxserve),
keyed by the kernel's sources, the jax version, the device kind and the kernel's config, so later
processes pay nothing.

`python -m pallas_kernels.selfcheck [--output=FILE]` runs every kernel's cases (interpreted under
an abstract H100 on a machine without one) and prints JSON; `--kernel=NAME` runs one kernel's
cases in this process: the child. docs/selfcheck.md has the details.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels import blocked_attention as ba
from pallas_kernels import flash_attention as fa
from pallas_kernels import fp8_matmul as f8
from pallas_kernels import grouped_matmul as gmm
from pallas_kernels import hopper
from pallas_kernels import mla_attention as mla
from pallas_kernels import mxfp4_grouped_matmul as mx
from pallas_kernels import paged_attention as pa
from pallas_kernels import quantized as qz
from pallas_kernels import ragged_paged_attention as rpa
from pallas_kernels import ragged_paged_attention_mgpu as rpm
from pallas_kernels import warp_specialized_attention as ws

TIMEOUT_S = 300.0  # per kernel, child start-up and compilation included
CHILD = (sys.executable, "-m", "pallas_kernels.selfcheck")  # + --kernel=NAME
ROOT = Path(__file__).resolve().parents[1]  # the child runs here, so -m finds the package
CASE_LINE = "selfcheck case: "  # the child prints one such line of JSON per finished case
H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
TOLERANCE = {"bfloat16": 3e-2, "float32": 1e-4}  # by the dtype the kernel multiplies in, x max(1, |ref|)
NULL_PAGE_VALUE = 50.0  # page 0 holds finite garbage: reading it unmasked shows at once

# interpret params (None: compiled) -> (kernel, reference, args, array kwargs); run_case jits both.
Case = Callable[[Any], tuple[Callable, Callable, tuple, dict]]


class SelfCheckError(RuntimeError):
    """An explicitly requested Pallas kernel failed its self-check on this GPU."""


@dataclasses.dataclass(frozen=True)
class CaseResult:
    """One case: passed or not, its error against the reference, and why it failed."""

    case: str
    ok: bool
    seconds: float
    max_abs_err: float | None = None
    tolerance: float | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class KernelResult:
    """A kernel's cases in order, up to and including the first failure."""

    kernel: str
    cases: tuple[CaseResult, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    @property
    def failure(self) -> str | None:
        """The first failing case and its error, or None."""
        bad = next((c for c in self.cases if not c.ok), None)
        return None if bad is None else f"case {bad.case}: {bad.error}"

    def to_json(self) -> dict:
        """{"ok", "seconds", "cases": {name: {"ok", "seconds", "max_abs_err", "tolerance", "error"}}},
        unset fields left out."""
        cases = {c.case: {k: float(f"{v:.3g}") if isinstance(v, float) else v
                          for k, v in dataclasses.asdict(c).items() if k != "case" and v is not None}
                 for c in self.cases}
        return {"ok": self.ok, "seconds": round(self.seconds, 2), "cases": cases}

    @classmethod
    def from_json(cls, kernel: str, data: dict) -> KernelResult:
        return cls(kernel, tuple(CaseResult(name, **c) for name, c in data["cases"].items()), data["seconds"])


# ---------------------------------------------------------------------------------------------
# Inputs and cases. Every case builds its inputs from a fixed seed in bf16, what the engine runs
# on the GPU. The largest shape bucket is full size when compiled and scaled down when
# interpreted (seconds per case on CPU, most of it compiling the interpreted kernel).
# ---------------------------------------------------------------------------------------------


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
    """Standard normal values times scale, in bf16."""
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.bfloat16)


def _sinks(rng: np.random.Generator, heads: int, on: bool) -> jax.Array | None:
    """One f32 sink logit per query head (gpt-oss), or None."""
    return jnp.asarray(rng.normal(size=(heads,)) * 2, jnp.float32) if on else None


def _paged_kv(rng: np.random.Generator, contexts: list[int], kv_heads: int, head_dim: int, page_size: int):
    """K and V pages holding each context on shuffled pages, block tables padded with the null page
    0, and the context lengths."""
    width = max(1, -(-max(contexts) // page_size))
    num_pages = 1 + len(contexts) * width
    k, v = (rng.normal(size=(kv_heads, num_pages, page_size, head_dim)) for _ in range(2))
    k[:, 0] = v[:, 0] = NULL_PAGE_VALUE
    free = iter(rng.permutation(np.arange(1, num_pages)))
    tables = np.zeros((len(contexts), width), np.int32)
    for row, n in zip(tables, contexts):
        row[: -(-n // page_size)] = [next(free) for _ in range(-(-n // page_size))]
    k, v = (jnp.asarray(x, jnp.bfloat16) for x in (k, v))
    return k, v, jnp.asarray(tables), jnp.asarray(contexts, jnp.int32)


def _ragged_inputs(rng: np.random.Generator, seqs: list[tuple[int, int]], pad_rows: int, q_heads: int,
                   kv_heads: int, head_dim: int, page_size: int) -> tuple:
    """(q, k_pages, v_pages, query_start_loc, context_lens, block_tables) for seqs [(context, new tokens)]."""
    k, v, tables, lens = _paged_kv(rng, [n for n, _ in seqs], kv_heads, head_dim, page_size)
    starts = np.cumsum([0] + [q for _, q in seqs]).astype(np.int32)
    q = _normal(rng, (int(starts[-1]) + pad_rows, q_heads, head_dim))
    return q, k, v, jnp.asarray(starts), lens, tables


def _pool(pages: jax.Array, fp8: bool) -> jax.Array:
    """A case's bf16 pages, or as an FP8 pool: |values| < NULL_PAGE_VALUE, far inside e4m3's 448,
    so the cast needs no clip."""
    return pages.astype(jnp.float8_e4m3fn) if fp8 else pages


def _ragged(seqs: list[tuple[int, int]], pad_rows: int = 2, heads: tuple[int, int] = (8, 2), head_dim: int = 64,
            page_size: int = 16, window: int | None = None, sinks: bool = False, seed: int = 0,
            fp8: bool = False) -> Case:
    """The native ragged kernel vs ops' XLA path (tiled; memory-lean at the largest bucket); fp8:
    on an FP8 (float8_e4m3fn) pool, which the XLA path reads upcast."""

    def build(interpret):
        rng = np.random.default_rng(seed)
        q, k, v, *rest = _ragged_inputs(rng, seqs, pad_rows, *heads, head_dim, page_size)
        args = (q, _pool(k, fp8), _pool(v, fp8), *rest)
        return (functools.partial(rpm.ragged_paged_attention_kernel, sliding_window=window, interpret=interpret),
                functools.partial(rpa.ragged_paged_attention_tiled, pa.paged_attention_blocked, sliding_window=window),
                args, {"sinks": _sinks(rng, heads[0], sinks)})

    return build


def _flash(batch: int, q_len: int, kv_len: int, heads: tuple[int, int] = (8, 2), head_dim: int = 64,
           window: int | None = None, sinks: bool = False, seed: int = 0) -> Case:
    """Causal flash attention vs its reference."""

    def build(interpret):
        rng = np.random.default_rng(seed)
        q = _normal(rng, (batch, q_len, heads[0], head_dim))
        k, v = (_normal(rng, (batch, kv_len, heads[1], head_dim)) for _ in range(2))
        return (functools.partial(fa.flash_attention_kernel, sliding_window=window, interpret=interpret),
                functools.partial(fa.flash_attention_reference, sliding_window=window),
                (q, k, v), {"sinks": _sinks(rng, heads[0], sinks)})

    return build


def _mla(seqs: list[tuple[int, int]], pad_rows: int = 2, heads: int = 16, rank: int = 128, rope: int = 64,
         seed: int = 0, fp8: bool = False) -> Case:
    """The ragged MLA kernel (ops' MLA Pallas path) vs ops' XLA path (ragged attention with K = V),
    16-token pages; fp8: on an FP8 latent pool."""

    def build(interpret):
        rng = np.random.default_rng(seed)
        q, latent, _, starts, lens, tables = _ragged_inputs(rng, seqs, pad_rows, heads, 1, rank + rope, 16)
        latent = _pool(latent, fp8)
        return (functools.partial(mla.mla_ragged_kernel, kv_lora_rank=rank, interpret=interpret),
                functools.partial(_mla_xla, kv_lora_rank=rank),
                (q, latent, starts, lens, tables), {})

    return build


def _mla_xla(q: jax.Array, latent: jax.Array, *metadata: jax.Array, kv_lora_rank: int) -> jax.Array:
    """What ops.mla_attention's XLA path computes: ragged attention with the latent as K and V, its
    first kv_lora_rank columns the value."""
    return rpa.ragged_paged_attention_tiled(pa.paged_attention_blocked, q, latent, latent, *metadata)[..., :kv_lora_rank]


def _gmm(sizes: list[int], rows: int, k: int = 128, n: int = 128, num_rhs: int | None = None, offset: int = 0,
         seed: int = 0) -> Case:
    """The grouped GEMM vs ragged_dot; lhs scaled by 1/sqrt(K) so outputs are O(1)."""

    def build(interpret):
        rng = np.random.default_rng(seed)
        lhs, rhs = _normal(rng, (rows, k), k**-0.5), _normal(rng, (num_rhs or len(sizes), k, n))
        return (functools.partial(gmm.grouped_matmul_kernel, group_offset=offset, interpret=interpret),
                functools.partial(gmm.grouped_matmul_reference, group_offset=offset),
                (lhs, rhs, jnp.asarray(sizes, jnp.int32)), {})

    return build


def _packed(rng: np.random.Generator, fmt: str, lead: tuple[int, ...], k: int, n: int) -> qz.QuantizedWeight:
    """Random packed weights [*lead, K, N]: every fp4 code and e8m0 bytes around 1, or e4m3 values
    with 128 x 128 block scales over a decade."""
    if fmt == "mxfp4":
        values = rng.integers(0, 256, (*lead, n, k // 2), dtype=np.uint8)
        scales = rng.integers(122, 130, (*lead, n, k // qz.MXFP4_BLOCK), dtype=np.uint8)
    else:
        values = np.clip(rng.normal(size=(*lead, n, k)) * 64, -qz.FP8_MAX, qz.FP8_MAX).astype(jnp.float8_e4m3fn)
        scales = rng.uniform(2**-10, 2**-7, (*lead, -(-n // qz.FP8_BLOCK), -(-k // qz.FP8_BLOCK))).astype(np.float32)
    return qz.QuantizedWeight(jnp.asarray(values), jnp.asarray(scales), fmt)


def _quantized_gmm(fmt: str, sizes: list[int], rows: int, k: int = 256, n: int = 128, num_rhs: int | None = None,
                   offset: int = 0, seed: int = 0) -> Case:
    """A packed-weight grouped GEMM (mxfp4 / fp8_block) vs its reference (the dequantized weights)."""
    kernel, reference = ((mx.mxfp4_grouped_matmul_kernel, mx.mxfp4_grouped_matmul_reference) if fmt == "mxfp4"
                         else (f8.fp8_block_grouped_matmul_kernel, f8.fp8_block_grouped_matmul_reference))

    def build(interpret):
        rng = np.random.default_rng(seed)
        lhs, rhs = _normal(rng, (rows, k), k**-0.5), _packed(rng, fmt, (num_rhs or len(sizes),), k, n)
        return (functools.partial(kernel, group_offset=offset, interpret=interpret),
                functools.partial(reference, group_offset=offset), (lhs, rhs, jnp.asarray(sizes, jnp.int32)), {})

    return build


def _fp8_dense(rows: int, k: int, n: int, seed: int = 0) -> Case:
    """The dense W8A8 block-scaled GEMM vs its reference."""

    def build(interpret):
        rng = np.random.default_rng(seed)
        x, w = _normal(rng, (rows, k), k**-0.5), _packed(rng, "fp8_block", (), k, n)
        return functools.partial(f8.fp8_block_matmul_kernel, interpret=interpret), f8.fp8_block_matmul_reference, (x, w), {}

    return build


def _paged(contexts: list[int], q_len: int = 1, heads: tuple[int, int] = (8, 2), head_dim: int = 64,
           window: int | None = None, sinks: bool = False, seed: int = 0) -> Case:
    """The padded paged kernel vs ops' XLA path (the blocked page loop), 16-token pages."""

    def build(interpret):
        rng = np.random.default_rng(seed)
        k, v, tables, lens = _paged_kv(rng, contexts, heads[1], head_dim, 16)
        q = _normal(rng, (len(contexts), q_len, heads[0], head_dim))
        return (functools.partial(pa.paged_attention_kernel, sliding_window=window, interpret=interpret),
                functools.partial(pa.paged_attention_blocked, sliding_window=window),
                (q, k, v, tables, lens), {"sinks": _sinks(rng, heads[0], sinks)})

    return build


def _decode_rows(count: int, step: int) -> list[tuple[int, int]]:
    """count one-token sequences of contexts 7, 7 + step, ...: decodes at many lengths."""
    return [(7 + step * i, 1) for i in range(count)]


def ragged_cases(compiled: bool, fp8: bool = False) -> dict[str, Case]:
    """Largest bucket compiled: the GPU engine's 2,048-token step with 64 sequences, 4k contexts,
    Llama-3-8B's heads; interpreted: a 128-token step of 9 sequences at head dim 128. fp8: the same
    on an FP8 pool."""
    ragged = functools.partial(_ragged, fp8=fp8)
    largest = (ragged([(4096, 1024), (2048, 512)] + _decode_rows(62, 64), 450, (32, 8), 128) if compiled
               else ragged([(160, 48), (0, 0), (64, 20)] + _decode_rows(6, 40), 54, (4, 1), 128, seed=4))
    return {
        "empty_one_token_page_boundaries": ragged([(0, 0), (1, 1), (16, 1), (0, 0), (17, 2), (32, 16), (48, 3)]),
        "query_tiles_kv_splits": ragged([(150, 40), (70, 1)], seed=2),
        "sliding_window_wrap_sinks": ragged([(130, 20), (90, 1), (200, 3)], window=40, sinks=True, seed=3),
        "largest_bucket": largest,
    }


def flash_cases(compiled: bool) -> dict[str, Case]:
    """Largest bucket compiled: a 2,048-token prefill at Llama-3-8B's heads; interpreted: 256 tokens."""
    largest = _flash(1, 2048, 2048, (32, 8), 128) if compiled else _flash(1, 256, 256, (4, 2), 128, seed=3)
    return {
        "one_token": _flash(2, 1, 1),
        "two_query_tiles_sinks": _flash(1, 40, 150, sinks=True, seed=1),
        "sliding_window_wrap": _flash(1, 60, 300, (2, 2), window=100, seed=2),
        "largest_bucket": largest,
    }


def mla_cases(compiled: bool, fp8: bool = False) -> dict[str, Case]:
    """Largest bucket compiled: DeepSeek-V3's 128 heads and 512 + 64 latent, 2,048 tokens of 64
    sequences; interpreted: 128 heads (two row tiles) at a 128 + 64 latent. fp8: the same on an FP8
    latent pool."""
    mla_case = functools.partial(_mla, fp8=fp8)
    largest = (mla_case([(4096, 512)] + _decode_rows(63, 64), 1473, 128, 512) if compiled
               else mla_case([(100, 3), (40, 1)], 1, 128, seed=3))
    return {
        "empty_and_one_token_page_boundaries": mla_case([(0, 0), (1, 1), (16, 1), (17, 2)]),
        "query_tiles_kv_splits": mla_case([(150, 9), (300, 1)], seed=1),
        "largest_bucket": largest,
    }


def gmm_cases(compiled: bool) -> dict[str, Case]:
    """Largest bucket compiled: 2,048 rows over 8 experts at 2,048 x 2,048; interpreted: 512 rows."""
    largest = (_gmm([300, 0, 212, 500, 36, 400, 300, 300], 2048, 2048, 2048) if compiled
               else _gmm([130, 0, 200, 90, 80], 512, 128, 256, seed=3))
    return {
        "empty_and_one_row_groups_padding_rows": _gmm([30, 0, 1, 1, 60, 7], 103, n=192),
        "expert_shard_mid_tile": _gmm([13, 40, 0, 30, 9], 100, num_rhs=2, offset=1, seed=2),
        "largest_bucket": largest,
    }


def paged_cases(compiled: bool) -> dict[str, Case]:
    """Largest bucket compiled: 64 decodes at 4k contexts, Llama-3-8B's heads; interpreted: 8 at 300."""
    largest = (_paged([4096 - 61 * i for i in range(64)], 1, (32, 8), 128) if compiled
               else _paged([300 - 37 * i for i in range(8)], 1, (8, 2), 128, seed=3))
    return {
        "empty_and_one_token_page_boundaries": _paged([0, 1, 16, 17]),
        "kv_splits": _paged([300, 150], seed=1),
        "verify_rows_window_wrap_sinks": _paged([130, 90, 200], 4, window=40, sinks=True, seed=2),
        "largest_bucket": largest,
    }


def quantized_gmm_cases(fmt: str) -> Callable[[bool], dict[str, Case]]:
    """Largest bucket compiled: gpt-oss-120b's down projection over 8 experts (mxfp4) or one
    DeepSeek-V3 expert shard's down projection (fp8_block), 2,048 rows; interpreted: small."""

    def cases(compiled: bool) -> dict[str, Case]:
        k, n = (2880, 2880) if fmt == "mxfp4" else (2048, 7168)
        largest = (_quantized_gmm(fmt, [300, 0, 212, 500, 36, 400, 300, 300], 2048, k, n) if compiled
                   else _quantized_gmm(fmt, [40, 0, 70, 18], 128, seed=3))
        return {
            "empty_and_one_row_groups_padding_rows": _quantized_gmm(fmt, [30, 0, 1, 1, 20], 60),
            "expert_shard_mid_tile": _quantized_gmm(fmt, [13, 40, 0, 30], 90, num_rhs=2, offset=1, seed=2),
            "largest_bucket": largest,
        }

    return cases


def fp8_dense_cases(compiled: bool) -> dict[str, Case]:
    """Decode (split K) and a partial N block; largest bucket compiled: DeepSeek-V3's q_a at 2,048 rows."""
    return {
        "one_row_partial_n_block": _fp8_dense(1, 512, 192),
        "decode_rows": _fp8_dense(17, 384, 128, seed=1),
        "largest_bucket": _fp8_dense(2048, 7168, 1536, seed=2) if compiled else _fp8_dense(130, 256, 256, seed=2),
    }


@dataclasses.dataclass(frozen=True)
class Kernel:
    """What a kernel's check needs: the modules whose sources key its cache entry, the frozen
    config(s) it runs with on a device kind, and its cases (compiled or interpreted)."""

    modules: tuple[types.ModuleType, ...]
    config: Callable[[str], Any]
    cases: Callable[[bool], dict[str, Case]]


KERNELS = {
    "ragged_paged_attention": Kernel((rpm, rpa, pa, ba, hopper), lambda kind: rpm.RaggedAttentionConfig(), ragged_cases),
    "ragged_paged_attention_fp8": Kernel((rpm, rpa, pa, ba, hopper), lambda kind: rpm.RaggedAttentionConfig(),
                                         functools.partial(ragged_cases, fp8=True)),
    "flash_attention": Kernel((fa, ws, ba, hopper), fa.flash_attention_config, flash_cases),
    "mla_attention": Kernel((mla, rpa, pa, ba, hopper), lambda kind: mla.MLADecodeConfig(), mla_cases),
    "mla_attention_fp8": Kernel((mla, rpa, pa, ba, hopper), lambda kind: mla.MLADecodeConfig(),
                                functools.partial(mla_cases, fp8=True)),
    "grouped_matmul": Kernel((gmm, hopper), lambda kind: (gmm.grouped_matmul_config(kind),
                                                          gmm.grouped_matmul_config(kind, 1)), gmm_cases),
    "paged_attention": Kernel((pa, ba, hopper), pa.paged_attention_config, paged_cases),
    "mxfp4_grouped_matmul": Kernel((mx, qz, gmm, hopper), lambda kind: mx.mxfp4_grouped_matmul_config(kind),
                                   quantized_gmm_cases("mxfp4")),
    "fp8_block_matmul": Kernel((f8, qz, gmm, hopper), lambda kind: f8.fp8_matmul_config(kind, 64, 7168, 1536),
                               fp8_dense_cases),
    "fp8_block_grouped_matmul": Kernel((f8, qz, gmm, hopper), lambda kind: f8.fp8_matmul_config(kind, 64, 7168, 2048, 32),
                                       quantized_gmm_cases("fp8_block")),
}


# ---------------------------------------------------------------------------------------------
# The child: runs one kernel's cases and prints a line per case.
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _mode(compiled: bool) -> Iterator[Any]:
    """Yields the kernels' interpret argument: None on the GPU; else race-checked interpret params
    under an abstract H100 (so the kernels pick their H100 configs), interpreter state reset."""
    if compiled:
        yield None
        return
    gpu_interpret.reset_gpu_interpret_mode_state()
    try:
        with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=H100)):
            yield plgpu.InterpretGPUParams(detect_races=True)
        if gpu_interpret.get_races().races_found:
            raise RuntimeError("interpret mode found a data race")
    finally:
        gpu_interpret.reset_gpu_interpret_mode_state()


def run_case(name: str, case: Case, compiled: bool) -> CaseResult:
    """Runs one case and compares the kernel with the reference; any exception fails the case."""
    start = time.perf_counter()
    try:
        with _mode(compiled) as interpret:
            kernel, reference, args, arrays = case(interpret)
            got, want = jax.jit(kernel)(*args, **arrays), jax.jit(reference)(*args, **arrays)
            mma = jnp.dtype(hopper.mma_dtype(got.dtype, interpret)).name
            got, want = (np.asarray(x, np.float32) for x in (got, want))
    except Exception as e:  # noqa: BLE001 (a kernel that fails to lower, compile or run fails its case)
        return CaseResult(name, False, time.perf_counter() - start, error=f"{type(e).__name__}: {e}"[:2000])
    seconds = time.perf_counter() - start
    tolerance = TOLERANCE[mma] * max(1.0, float(np.abs(want).max(initial=0.0)))
    if got.shape != want.shape or not np.isfinite(got).all():
        bad = f"shape {got.shape}" if got.shape != want.shape else f"{int((~np.isfinite(got)).sum())} non-finite values"
        return CaseResult(name, False, seconds, tolerance=tolerance, error=f"kernel output has {bad}")
    err = float(np.abs(got - want).max(initial=0.0))
    ok = err <= tolerance
    error = None if ok else f"max abs err {err:.3g} > tolerance {tolerance:.3g}"
    return CaseResult(name, ok, seconds, err, tolerance, error)


def run_cases(kernel: str) -> None:
    """The child's work: the kernel's cases in order, one line each, stopping at the first failure
    (a failed kernel may leave the CUDA context unusable)."""
    compiled = hopper.is_sm90_gpu()
    for name, case in KERNELS[kernel].cases(compiled).items():
        result = run_case(name, case, compiled)
        print(CASE_LINE + json.dumps(dataclasses.asdict(result)), flush=True)
        if not result.ok:
            return


# ---------------------------------------------------------------------------------------------
# The parent: the watchdog and the disk cache.
# ---------------------------------------------------------------------------------------------


def run_child(kernel: str, timeout_s: float = TIMEOUT_S) -> KernelResult:
    """Runs the kernel's cases in a child process; a timeout, a crash or a missing case is a failure
    of the case that was running."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # this process may hold most of the GPU
    start = time.perf_counter()
    try:
        proc = subprocess.run([*CHILD, f"--kernel={kernel}"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        stdout, problem = proc.stdout, None
        if proc.returncode:
            problem = f"the child process exited with code {proc.returncode}: {proc.stderr[-1500:]}"
    except subprocess.TimeoutExpired as e:
        stdout = (e.stdout or b"").decode(errors="replace")
        problem = f"timed out after {timeout_s:g} s (a hang counts as a failure)"
    seconds = time.perf_counter() - start
    cases = [CaseResult(**json.loads(line[len(CASE_LINE):])) for line in stdout.splitlines()
             if line.startswith(CASE_LINE)]
    if all(c.ok for c in cases):
        done = {c.case for c in cases}  # case names are the same compiled or interpreted
        running = next((n for n in KERNELS[kernel].cases(True) if n not in done), None)
        if problem or running:
            cases.append(CaseResult(running or "(after the last case)", False, seconds,
                                    error=problem or "the child process stopped before this case"))
    return KernelResult(kernel, tuple(cases), seconds)


def cache_path(kernel: str) -> Path:
    """$JAXSERVE_CACHE/selfcheck/KERNEL-KEY.json; KEY hashes the kernel's (and these cases') sources,
    the jax version, the device kind and the kernel's config on it."""
    kind = jax.devices()[0].device_kind
    spec = KERNELS[kernel]
    sources = hashlib.sha256(b"".join(Path(f).read_bytes() for f in (*(m.__file__ for m in spec.modules), __file__)))
    key = "\0".join([kernel, sources.hexdigest(), jax.__version__, kind, repr(spec.config(kind))])
    root = Path(os.environ.get("JAXSERVE_CACHE", Path.home() / ".cache" / "jaxserve"))
    return root / "selfcheck" / f"{kernel}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def check(kernel: str, timeout_s: float = TIMEOUT_S, use_cache: bool = True) -> KernelResult:
    """The kernel's result from the disk cache, else from a child process (then stored, pass or fail)."""
    path = cache_path(kernel)
    if use_cache and (stored := _read(kernel, path)) is not None:
        return stored
    logging.info("self-checking the Pallas kernel %s in a child process (result cached in %s)", kernel, path)
    result = run_child(kernel, timeout_s)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as f:  # write aside, then rename
        json.dump(result.to_json(), f, indent=1)
    Path(f.name).replace(path)
    return result


def _read(kernel: str, path: Path) -> KernelResult | None:
    """The stored result, or None when the file is missing or unreadable (it is then rewritten)."""
    try:
        return KernelResult.from_json(kernel, json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@functools.cache
def result(kernel: str) -> KernelResult:
    """check(kernel), once per process: what ops' gate asks on each use."""
    return check(kernel)


def main(argv: list[str] | None = None) -> None:
    """The command line: every kernel's cases in child processes (JSON on stdout and in --output, results
    stored in the cache, exit 1 on a failure), or with --kernel one kernel's cases in this process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=list(KERNELS), help="run this kernel's cases in this process (the child)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per kernel before it counts as hung")
    parser.add_argument("--output", type=Path, help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    if args.kernel:
        run_cases(args.kernel)
        return
    start = time.perf_counter()
    results = {name: check(name, args.timeout, use_cache=False) for name in KERNELS}
    summary = {"device_kind": jax.devices()[0].device_kind, "mode": "compiled" if hopper.is_sm90_gpu() else "interpret",
               "ok": all(r.ok for r in results.values()), "seconds": round(time.perf_counter() - start, 1),
               "kernels": {name: r.to_json() for name, r in results.items()}}
    print(json.dumps(summary, indent=1))
    if args.output:
        args.output.write_text(json.dumps(summary, indent=1))
    if not summary["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
