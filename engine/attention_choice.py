"""Which paged-attention implementation each kind of step runs, chosen by measurement.

The fastest path is machine-dependent (the C++ CPU kernel beat XLA on one VM and lost on another),
so `attention_impl="auto"` on a single CPU device times the candidates on the engine's own shapes,
decode rows (one query per sequence) and mixed rows (prefill chunks) separately, and keeps the
fastest of each; an explicit impl is used as given. With the persistent compilation cache on, a
measured choice is stored beside it (keyed by the shapes, candidates, jax version and CPU) and
reused by later processes: re-measuring could choose differently under load, and a different
choice compiles different programs, which then miss the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from engine import compilation_cache
from pallas_kernels import cpu_paged_attention as cpa
from pallas_kernels import ops


@dataclasses.dataclass(frozen=True)
class AttentionShapes:
    """What the timing needs of an engine: heads, pages, and its step sizes."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    page_size: int
    decode_rows: int
    decode_context: int
    mixed_tokens: int
    chunk: int


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    """The impl of decode-only steps and of mixed steps, and the timings (ms) that chose them."""

    decode: str
    mixed: str
    timings_ms: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


def choose(impl: str, shapes: AttentionShapes, on_mesh: bool, fp8_kv: bool = False) -> AttentionChoice:
    """An explicit impl for both kinds; "auto": "auto" itself on H100/H200 (ops then runs each Pallas
    kernel that passed its self-check, pallas_kernels/selfcheck.py, and the XLA path for one that
    failed), the jnp path on a CPU mesh (GSPMD cannot partition the C++ kernel's custom call), else
    the faster measured candidate. fp8_kv (an FP8 pool, which the C++ "cpu" kernel does not read): "auto"
    is "xla" off the GPU and stays "auto" on it (ops runs the ragged and MLA kernels' FP8 paths)."""
    resolved = ops.resolve_impl(impl)
    if fp8_kv and impl == "auto" and resolved != "pallas":
        return AttentionChoice("xla", "xla")
    if impl == "auto" and resolved == "pallas":
        return AttentionChoice("auto", "auto")
    if impl != "auto" or resolved != "cpu":
        return AttentionChoice(resolved, resolved)
    if on_mesh or not cpa.supported(shapes.head_dim):
        return AttentionChoice("xla", "xla")
    return measured_choice(shapes, ("cpu", "xla"))


CHOICES_FILE = "attention_choice.json"


@functools.cache
def measured_choice(shapes: AttentionShapes, candidates: tuple[str, ...], repeats: int = 5) -> AttentionChoice:
    """The stored choice for these shapes on this machine, else a fresh measurement (then stored)."""
    path = None if (d := compilation_cache.cache_dir()) is None else d / CHOICES_FILE
    key = repr((dataclasses.astuple(shapes), candidates, jax.__version__, platform.processor(), platform.machine()))
    stored = _read_choices(path)
    if key in stored:
        choice = AttentionChoice(**stored[key])
        logging.info("attention impl as measured earlier (%s): decode %s, mixed %s", path, choice.decode, choice.mixed)
        return choice
    choice = _measure(shapes, candidates, repeats)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**stored, key: dataclasses.asdict(choice)}, indent=1))
    return choice


def _read_choices(path) -> dict:
    """The stored choices, or none when the file is missing or unreadable (it is then rewritten)."""
    try:
        return json.loads(path.read_text()) if path is not None and path.exists() else {}
    except (OSError, ValueError):
        return {}


def _measure(shapes: AttentionShapes, candidates: tuple[str, ...], repeats: int) -> AttentionChoice:
    """Time each candidate on a decode batch and on a prefill-chunk batch; the fastest of each."""
    timings = {kind: {impl: _time(impl, *inputs, repeats=repeats) for impl in candidates}
               for kind, inputs in (("decode", _decode_inputs(shapes)), ("mixed", _mixed_inputs(shapes)))}
    choice = AttentionChoice(min(timings["decode"], key=timings["decode"].get),
                             min(timings["mixed"], key=timings["mixed"].get), timings)
    logging.info("attention impl by measurement: decode %s, mixed %s (ms per layer: %s)", choice.decode,
                 choice.mixed, timings)
    return choice


def _pages(shapes: AttentionShapes, tokens_per_seq: int, seqs: int, rng: np.random.Generator):
    """Random K/V pages and block tables holding `tokens_per_seq` tokens for each of `seqs`, scattered."""
    per_seq = -(-tokens_per_seq // shapes.page_size)
    num_pages = 1 + seqs * per_seq
    shape = (shapes.num_kv_heads, num_pages, shapes.page_size, shapes.head_dim)
    k, v = (jnp.asarray(rng.normal(size=shape), shapes.dtype) for _ in range(2))
    tables = rng.permutation(np.arange(1, num_pages)).reshape(seqs, per_seq).astype(np.int32)
    return k, v, jnp.asarray(tables)


def _decode_inputs(shapes: AttentionShapes) -> tuple:
    """decode_rows sequences of one new token at decode_context tokens."""
    rng = np.random.default_rng(0)
    rows = shapes.decode_rows
    k, v, tables = _pages(shapes, shapes.decode_context, rows, rng)
    q = jnp.asarray(rng.normal(size=(rows, shapes.num_heads, shapes.head_dim)), shapes.dtype)
    lens = jnp.full((rows,), shapes.decode_context, jnp.int32)
    return q, k, v, jnp.arange(rows + 1, dtype=jnp.int32), lens, tables, 1


def _mixed_inputs(shapes: AttentionShapes) -> tuple:
    """mixed_tokens tokens as first prefill chunks of `chunk` tokens (each attends to itself)."""
    rng = np.random.default_rng(1)
    seqs = max(1, shapes.mixed_tokens // shapes.chunk)
    k, v, tables = _pages(shapes, shapes.chunk, seqs, rng)
    q = jnp.asarray(rng.normal(size=(seqs * shapes.chunk, shapes.num_heads, shapes.head_dim)), shapes.dtype)
    starts = jnp.arange(seqs + 1, dtype=jnp.int32) * shapes.chunk
    return q, k, v, starts, jnp.full((seqs,), shapes.chunk, jnp.int32), tables, shapes.chunk


def _time(impl: str, q, k, v, starts, lens, tables, max_query_len: int, *, repeats: int) -> float:
    """Median milliseconds of one jitted call, after one compiling call."""
    fn = jax.jit(lambda *a: ops.ragged_paged_attention(*a, impl=impl, max_query_len=max_query_len))
    args = (q, k, v, starts, lens, tables)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))
