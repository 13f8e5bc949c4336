"""Paged attention on CPU through an XLA FFI custom call (cpu_paged_attention.cc), ragged natively.

XLA CPU runs the jnp paged attention as a page gather plus batched small matmuls at 2-8 GB/s; the
C++ kernel reads the pages in place. It is compiled with the system C++ compiler on first use and
cached (JAXSERVE_CACHE, default ~/.cache/jaxserve), keyed by source, jaxlib and CPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pallas_kernels.blocked_attention import check_attention_args

_SOURCE = Path(__file__).with_suffix(".cc")
_TARGET = "jaxserve_ragged_paged_attention_cpu"
LANES = 16  # kLanes in the C++ source
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def _cpu_signature() -> str:
    """The CPU's model and flags: -march=native code is only valid on a matching CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _compiler() -> str:
    """The C++ compiler: $CXX, else g++ or c++ on PATH; raises RuntimeError when there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("paged attention on CPU (impl='cpu') needs a C++17 compiler: set CXX or install g++")


def build() -> Path:
    """Compiles the kernel library once per (source, jaxlib, CPU); returns its path."""
    cxx = _compiler()
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), jax.__version__, cxx, *_FLAGS, _cpu_signature()])
                         .encode()).hexdigest()[:16]
    out_dir = Path(os.environ.get("JAXSERVE_CACHE", Path.home() / ".cache" / "jaxserve"))
    library = out_dir / f"cpu_paged_attention-{key}.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # build aside, then rename: safe across processes
        partial = Path(tmp) / library.name
        cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(partial)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE.name} failed ({' '.join(cmd)}):\n{result.stderr[-4000:]}")
        partial.replace(library)
    logging.info("built %s", library)
    return library


@functools.cache
def _register() -> None:
    """Builds and loads the library and registers its handler with XLA (once per process)."""
    handler = ctypes.cdll.LoadLibrary(str(build())).RaggedPagedAttentionCpu
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(handler), platform="cpu")


@functools.cache
def available() -> bool:
    """True when the kernel could be built and registered here (it needs a C++ compiler)."""
    try:
        _register()
    except (RuntimeError, OSError) as e:
        logging.warning("CPU paged attention kernel unavailable, using the jnp path: %s", e)
        return False
    return True


def supported(head_dim: int) -> bool:
    """Whether the kernel runs here for this head size (it works in 16-float vectors)."""
    return head_dim % LANES == 0 and available()


def ragged_paged_attention_cpu(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, query_start_loc: jax.Array,
                               context_lens: jax.Array, block_tables: jax.Array, *, sliding_window: int | None = None,
                               sinks: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """ragged_paged_attention_reference's contract (q [T, Hq, D]), computed by the C++ kernel.

    One work item per (sequence, KV head, tile of up to 32 rows): a prefill chunk reads each page
    once per tile, not once per token. float32 or bfloat16 pages; returns [T, Hq, D] in q.dtype.
    """
    _, hq, d = q.shape
    check_attention_args(hq, k_pages.shape[0], sliding_window, sinks)
    if d % LANES:
        raise ValueError(f"ragged_paged_attention_cpu needs head_dim divisible by {LANES}, got {d}")
    _register()
    sinks = jnp.full((hq,), -jnp.inf, jnp.float32) if sinks is None else sinks.astype(jnp.float32)
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, k_pages.dtype), vmap_method="sequential")
    out = call(q.astype(k_pages.dtype), k_pages, v_pages, query_start_loc.astype(jnp.int32),
               context_lens.astype(jnp.int32), block_tables.astype(jnp.int32), sinks,
               scale=np.float32(d**-0.5 if scale is None else scale), sliding_window=np.int64(sliding_window or 0))
    return out.astype(q.dtype)


def paged_attention_cpu(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                        context_lens: jax.Array, *, sliding_window: int | None = None,
                        sinks: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """paged_attention_reference's contract (q [B, Q, Hq, D]): the ragged call with Q rows per sequence."""
    b, q_len, hq, d = q.shape
    query_start_loc = jnp.arange(b + 1, dtype=jnp.int32) * q_len
    out = ragged_paged_attention_cpu(q.reshape(b * q_len, hq, d), k_pages, v_pages, query_start_loc, context_lens,
                                     block_tables, sliding_window=sliding_window, sinks=sinks, scale=scale)
    return out.reshape(q.shape)
