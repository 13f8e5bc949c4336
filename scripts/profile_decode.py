"""Where a decode step's time goes: the engine's jitted decode call, the paged attention alone at
the same shapes (times the layers), and optionally the XLA ops that took the time; writes JSON.

    .venv/bin/python scripts/profile_decode.py --model=smollm2-135m-instruct --batch=1,32 \
        --context=300 --trace --output=benchmarks/results/cpu-smollm2-decode-profile.json

Every sequence of the batch holds `--context` tokens in pages scattered over the pool (as after
some serving), so the numbers include the page gathers. Step times are medians over `--iters`
calls of `decode_steps` greedy steps each; the roofline bound is engine/roofline.py's decode step.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags


from benchmarks import roofline
from engine.llm import LLM
from engine.request import SamplingParams
from engine.runner import ModelRunner
from engine.sampler import SamplingTensors
from pallas_kernels import ops

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Preset name, .gguf file or checkpoint dir.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Engine weight and KV dtype.")
_BATCH = flags.DEFINE_list("batch", ["1", "32"], "Batch sizes (decode rows).")
_CONTEXT = flags.DEFINE_integer("context", 300, "Tokens already in the cache of every sequence.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 4, "Decode steps per jitted call.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "KV page size in tokens.")
_ATTENTION_IMPL = flags.DEFINE_enum("attention_impl", "auto", list(ops.IMPLS), "Attention implementation (ops.py).")
_ITERS = flags.DEFINE_integer("iters", 15, "Timed calls per measurement (median reported).")
_TRACE = flags.DEFINE_bool("trace", False, "Also profile one call per batch and list the costliest XLA ops.")
_TOP = flags.DEFINE_integer("top", 12, "XLA ops listed per batch with --trace.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file to write.", required=True)


def median_ms(fn: Callable[[], object], iters: int) -> float:
    """Median wall milliseconds of fn() (which must block), after one untimed call."""
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def scattered_tables(runner: ModelRunner, batch: int, tokens: int, seed: int = 0) -> np.ndarray:
    """Block tables [batch, bucketed width] holding `tokens` tokens each, on randomly chosen pages."""
    cfg = runner.config
    pages = -(-tokens // cfg.page_size)
    width = cfg.table_width(tokens)
    chosen = np.random.default_rng(seed).permutation(np.arange(1, cfg.num_pages))[:batch * pages]
    tables = np.zeros((batch, width), np.int32)
    tables[:, :pages] = chosen.reshape(batch, pages)
    return tables


def decode_inputs(runner: ModelRunner, batch: int, context: int) -> tuple:
    """The decode call's arguments after the state and cache, up to its penalty tables: `batch`
    greedy rows at `context` tokens (no top-k logprobs)."""
    tables = scattered_tables(runner, batch, context + runner.config.decode_steps)
    tokens = np.random.default_rng(1).integers(0, 1000, (batch, runner.config.decode_steps)).astype(np.int32)
    positions = np.full((batch,), context, np.int32)
    sampling = SamplingTensors.build([SamplingParams(temperature=0.0)] * batch, list(range(batch)), batch)
    return tokens, positions, tables, np.ones((batch,), bool), sampling, 0


def run_decode(runner: ModelRunner, inputs: tuple) -> np.ndarray:
    """One jitted decode call (decode_steps steps), blocking on the sampled tokens."""
    out, _, _, runner.cache, runner.penalties = runner.decode_fn(runner.state, runner.cache, *inputs, runner.penalties)
    return np.asarray(out)


def attention_call(llm: LLM, batch: int, context: int, num_heads: int) -> Callable[[], jax.Array]:
    """The engine's decode attention for one layer at the decode shapes (layer 0's pages)."""
    runner = llm.runner
    k_pages, v_pages = runner.cache[0][:2]
    head_dim = k_pages.shape[-1]
    q = jnp.ones((batch, num_heads, head_dim), k_pages.dtype)
    tables = jnp.asarray(scattered_tables(runner, batch, context + 1))
    lens = jnp.full((batch,), context + 1, jnp.int32)
    starts = jnp.arange(batch + 1, dtype=jnp.int32)
    fn = jax.jit(lambda q, k, v, s, n, t: ops.ragged_paged_attention(q, k, v, s, n, t, impl=llm.attention.decode,
                                                                      max_query_len=1))
    return lambda: jax.block_until_ready(fn(q, k_pages, v_pages, starts, lens, tables))


def op_profile(call: Callable[[], object], compiled_hlo: str, top: int) -> list[dict]:
    """The XLA ops of one call with the most (thread-summed) time, named with their output shapes."""
    shapes = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = (\S+) [\w\-]+\(", compiled_hlo)}
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            call()
        events = json.load(gzip.open(next(Path(tmp).rglob("*.trace.json.gz"))))["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in shapes:
            key = (re.sub(r"\.\d+$", "", e["name"]), shapes[e["name"]])
            total[key] += e["dur"] / 1e3
            count[key] += 1
    return [{"op": op, "shape": shape, "count": count[(op, shape)], "ms": round(ms, 3)}
            for (op, shape), ms in total.most_common(top)]


def profile_batch(llm: LLM, batch: int, peaks: roofline.DevicePeaks) -> dict:
    """One batch size: step time, attention alone, roofline bound and (--trace) the op list."""
    runner, config = llm.runner, llm.model.config
    steps, item = runner.config.decode_steps, jnp.dtype(llm.model.dtype).itemsize
    inputs = decode_inputs(runner, batch, _CONTEXT.value)
    step_ms = median_ms(lambda: run_decode(runner, inputs), _ITERS.value) / steps
    attention_ms = (None if config.mla is not None else config.num_layers * median_ms(
        attention_call(llm, batch, _CONTEXT.value, config.num_heads), _ITERS.value))
    bound_ms = 1e3 * peaks.seconds(roofline.decode_step_cost(config, [_CONTEXT.value] * batch, item, item))
    record = {"batch": batch, "step_ms": step_ms, "tok_s": 1e3 * batch / step_ms,
              "attention_ms": attention_ms, "attention_share": attention_ms and attention_ms / step_ms,
              "roofline_step_ms": bound_ms, "roofline_fraction": bound_ms / step_ms}
    if _TRACE.value:
        hlo = runner.decode_fn.lower(runner.state, runner.cache, *inputs, runner.penalties).compile().as_text()
        record["ops_per_call"] = op_profile(lambda: run_decode(runner, inputs), hlo, _TOP.value)
    return record


def main(argv: list[str]) -> None:
    del argv
    batches = sorted(int(b) for b in _BATCH.value)
    llm = LLM(_MODEL.value, dtype=_DTYPE.value, max_num_seqs=max(batches), decode_steps=_DECODE_STEPS.value,
              max_model_len=_CONTEXT.value + 2 * _DECODE_STEPS.value, page_size=_PAGE_SIZE.value,
              attention_impl=_ATTENTION_IMPL.value)
    peaks = roofline.device_peaks(_DTYPE.value)
    report = {"model": _MODEL.value, "dtype": _DTYPE.value, "context": _CONTEXT.value,
              "decode_steps": _DECODE_STEPS.value, "page_size": _PAGE_SIZE.value,
              "attention_impl": llm.attention.decode, "device": jax.devices()[0].device_kind,
              "peaks": {"bandwidth_gb_s": peaks.bandwidth / 1e9, "tflop_s": peaks.flops / 1e12,
                        "source": peaks.source},
              "points": [profile_batch(llm, b, peaks) for b in batches]}
    output = Path(_OUTPUT.value)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    for p in report["points"]:
        attention = "n/a" if p["attention_ms"] is None else f"{p['attention_ms']:.1f} ms"
        print(f"batch {p['batch']}: {p['step_ms']:.1f} ms/step ({p['tok_s']:.0f} tok/s), attention {attention}, "
              f"roofline {p['roofline_step_ms']:.1f} ms ({100 * p['roofline_fraction']:.0f}%)")


if __name__ == "__main__":
    app.run(main)
