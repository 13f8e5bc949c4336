"""Lowers, or compiles for a real GPU target, the engine's jitted steps (decode loop and mixed
step) of full-size presets with the Pallas kernels, from abstract shapes: no weights, no GPU.

Every kernel call met while tracing a step is first lowered (compiled) on its own at its real
shapes, so a failure names the kernel and shape; then the whole step. The layer count shrinks to
the fewest layers that hold every kind of layer (sliding window or not, dense or MoE): the shapes
stay the real ones.

Lowering (any jaxlib, the CPU test suite): Mosaic GPU's lowering for an abstract H100.
  python scripts/check_lowering.py --model=deepseek-v3 --batch=64 --context=4096
Compiling (`--compile`, needs jax[cuda13] and JAX_PLATFORMS=cpu: `make gpu-check`): XLA, Mosaic
GPU and ptxas for the target's deviceless topology; per kernel registers, spills, SMEM and compile
seconds, per step `memory_analysis()` per device against the target's memory, as JSON.
  JAX_PLATFORMS=cpu python scripts/check_lowering.py --compile --target=h200 --devices=2 \
      --model=llama3.3-70b --output=compile.json
Exits 1 on any failure: a kernel or step that does not lower or compile, and with --compile any
spill, SMEM over the target's opt-in limit, or a plan (all layers' weights + KV + the step's
temporaries, per device) over the target's memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from absl import app, flags
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractDevice, AbstractMesh

from engine import kv_cache
from engine.config import EngineConfig
from engine.runner import MixedBatch, jitted_steps, padding_decode, padding_mixed
from models.config import ModelConfig
from models.registry import abstract_model, get_preset
from pallas_kernels import compiled_stats
from pallas_kernels import flash_attention as fa
from pallas_kernels import fp8_matmul as f8
from pallas_kernels import grouped_matmul as gmm
from pallas_kernels import mla_attention as mla
from pallas_kernels import mxfp4_grouped_matmul as mx
from pallas_kernels import paged_attention as pa
from pallas_kernels import ragged_paged_attention_mgpu as rpm
from pallas_kernels.quantized import QuantizedWeight
from sharding import DEFAULT_RULES, cache_sharding, gpu_target, hlo, make_mesh
from sharding.rules import place_abstract

MODELS = flags.DEFINE_list("model", ["llama3-8b"], "presets to check (comma-separated); with --compile a "
                           "preset may name its own mesh as NAME:TENSORxEXPERT (e.g. deepseek-v3:1x16)")
BATCH = flags.DEFINE_integer("batch", 64, "decode rows (and max_num_seqs of the mixed step)")
CONTEXT = flags.DEFINE_integer("context", 4096, "tokens of context (block-table width)")
TOKENS = flags.DEFINE_integer("tokens", 512, "flat tokens of the mixed step")
DTYPE = flags.DEFINE_string("dtype", "bfloat16", "weights, activations and KV cache dtype")
PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "KV page size")
KV_CACHE_DTYPE = flags.DEFINE_enum("kv_cache_dtype", "auto", list(kv_cache.KV_CACHE_DTYPES),
                                   "KV pool storage (EngineConfig.kv_cache_dtype): fp8_e4m3 halves it")
LAYERS = flags.DEFINE_integer("layers", None, "layers to build (default: the fewest holding every layer kind)")
COMPILE = flags.DEFINE_bool("compile", False, "compile for --target (needs jax[cuda13], JAX_PLATFORMS=cpu) "
                            "instead of lowering for an abstract H100")
TARGET = flags.DEFINE_enum("target", "h200", gpu_target.TARGETS, "GPU to compile for (--compile)")
DEVICES = flags.DEFINE_integer("devices", 1, "GPUs of one host to compile for (--compile), for presets "
                               "that name no mesh")
EXPERT = flags.DEFINE_integer("expert", 1, "their mesh's expert axis (the tensor axis is devices / expert)")
OUTPUT = flags.DEFINE_string("output", None, "JSON report path (--compile; default: stdout)")

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
# Every Mosaic GPU kernel entry point the ops dispatch to: (module, function name).
KERNELS = {
    "paged_attention": (pa, "paged_attention_kernel"),
    "flash_attention": (fa, "flash_attention_kernel"),
    "grouped_matmul": (gmm, "grouped_matmul_kernel"),
    "mla_attention": (mla, "mla_ragged_kernel"),
    "ragged_paged_attention": (rpm, "ragged_paged_attention_kernel"),
    "mxfp4_grouped_matmul": (mx, "mxfp4_grouped_matmul_kernel"),
    "fp8_block_matmul": (f8, "fp8_block_matmul_kernel"),
    "fp8_block_grouped_matmul": (f8, "fp8_block_grouped_matmul_kernel"),
}


class KernelCallError(Exception):
    """A kernel call failed while tracing; the message names the kernel and its shapes."""


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One kernel call met while tracing: its array arguments (abstract) and its static ones."""

    kernel: str
    arrays: tuple[jax.ShapeDtypeStruct | None, ...]
    statics: tuple[tuple[str, Any], ...]

    def describe(self) -> str:
        shapes = ", ".join(_describe(a) for a in self.arrays)
        statics = "".join(f", {k}={v}" for k, v in self.statics)
        return f"{self.kernel}({shapes}{statics})"


def abstract_h100() -> contextlib.AbstractContextManager:
    """Kernels that ask for the device (their block sizes) see an H100."""
    return jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=H100))


def _abstract(x: Any) -> Any:
    """An array argument (or a pytree of them, e.g. a QuantizedWeight) as ShapeDtypeStructs."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if hasattr(leaf, "dtype") else leaf, x)


def _describe(a: Any) -> str:
    if isinstance(a, QuantizedWeight):
        return f"{a.fmt}({_describe(a.values)}, {_describe(a.scales)})"
    return "None" if a is None else f"{a.dtype}{list(a.shape)}"


@contextlib.contextmanager
def recorded_kernel_calls() -> Iterator[list[KernelCall]]:
    """Records every KERNELS call (positional arrays, array keywords, static keywords) while active."""
    calls: list[KernelCall] = []
    originals = {name: getattr(module, fn) for name, (module, fn) in KERNELS.items()}

    def recorder(name: str, original: Callable) -> Callable:
        def record(*args, **kwargs):
            keyword_arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array) or hasattr(v, "aval")}
            statics = tuple(sorted((k, v) for k, v in kwargs.items() if k not in keyword_arrays))
            arrays = tuple(_abstract(a) for a in (*args, *keyword_arrays.values()))
            call = KernelCall(name, arrays, statics + tuple((k, "<array>") for k in keyword_arrays))
            if call not in calls:
                calls.append(call)
            try:
                return original(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 (name the call that refused its arguments)
                raise KernelCallError(f"{call.describe()}: {type(e).__name__}: {_first_line(e)}") from e

        return record

    try:
        for name, (module, fn) in KERNELS.items():
            setattr(module, fn, recorder(name, originals[name]))
        yield calls
    finally:
        for name, (module, fn) in KERNELS.items():
            setattr(module, fn, originals[name])


def lower_kernel_call(call: KernelCall) -> None:
    """Lowers one recorded call alone for CUDA under the abstract H100 (raises on failure)."""
    module, fn = KERNELS[call.kernel]
    statics = {k: v for k, v in call.statics if v != "<array>"}
    array_keys = [k for k, v in call.statics if v == "<array>"]
    num_positional = len(call.arrays) - len(array_keys)

    def kernel(*arrays):
        keywords = dict(zip(array_keys, arrays[num_positional:]))
        return getattr(module, fn)(*arrays[:num_positional], **keywords, **statics)

    with abstract_h100():
        jax.jit(kernel).trace(*call.arrays).lower(lowering_platforms=("cuda",))


def fewest_layers(config: ModelConfig) -> int:
    """The shortest prefix of layers holding every kind (sliding window, MoE or dense) of the model."""
    kind = lambda i: (config.layer_sliding_window(i), config.is_moe_layer(i))  # noqa: E731
    kinds = {kind(i) for i in range(config.num_layers)}
    seen: set = set()
    for i in range(config.num_layers):
        seen.add(kind(i))
        if seen == kinds:
            return i + 1
    return config.num_layers


def shrunk(config: ModelConfig, layers: int) -> ModelConfig:
    """config with its first `layers` layers (real widths and head dims)."""
    return dataclasses.replace(config, num_layers=layers, layer_types=config.layer_types[:layers])


def step_inputs(config: ModelConfig, engine: EngineConfig, dtype: jnp.dtype, batch: int, tokens: int,
                pages: int, mesh: jax.sharding.Mesh | None = None) -> dict[str, tuple]:
    """Abstract (state, cache, inputs...) of the decode loop and the mixed step, as the runner builds
    them; on `mesh`, parameters and cache placed by the default rules, the step inputs replicated."""
    model = abstract_model(config, dtype)
    if mesh is not None:
        model = place_abstract(model, mesh, DEFAULT_RULES)
    graphdef, state = nnx.split(model)
    shape = kv_cache.page_shape(config, engine.num_pages, engine.page_size)
    place = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
    cache_spec = None if mesh is None else cache_sharding(shape, mesh, DEFAULT_RULES)
    pool = jax.ShapeDtypeStruct(shape, kv_cache.pool_dtype(dtype, True, engine.kv_cache_dtype), sharding=cache_spec)
    cache = [(pool,) * kv_cache.layout(config).tensors for _ in range(config.num_layers)]
    replicated = None if mesh is None else jax.NamedSharding(mesh, jax.P())
    inputs = lambda tree: jax.tree.map(lambda x: place(_abstract(x), replicated) if hasattr(x, "shape") else x, tree)  # noqa: E731
    decode = inputs(padding_decode(engine, batch, pages))
    mixed: MixedBatch = inputs(padding_mixed(engine, tokens, pages))
    return dict(graphdef=graphdef, state=state, cache=cache, decode=(state, cache, *decode), mixed=(state, cache, mixed))


def engine_config(batch: int, context: int, tokens: int, page_size: int, kv_cache_dtype: str = "auto"
                  ) -> EngineConfig:
    """The engine a GPU would run: `batch` sequences of `context` tokens, a `tokens` token budget."""
    pages = -(-context // page_size)
    return EngineConfig(max_model_len=context, page_size=page_size, num_pages=batch * pages + 1,
                        max_num_seqs=batch, prefill_chunk=min(tokens, 512), max_num_batched_tokens=tokens,
                        attention_impl="pallas", kv_cache_dtype=kv_cache_dtype)


def traced_steps(engine: EngineConfig, inputs: dict, context: Callable
                 ) -> list[tuple[str, list[KernelCall], Any, str | None]]:
    """(step, kernel calls, traced step or None, tracing failure or None) of the decode and mixed steps."""
    mixed_fn, decode_fn = jitted_steps(inputs["graphdef"], "pallas", "pallas", engine.page_size, engine.decode_steps)
    steps = []
    for step, fn in (("decode", decode_fn), ("mixed", mixed_fn)):
        with recorded_kernel_calls() as calls, context():
            try:
                steps.append((step, calls, fn.trace(*inputs[step]), None))
            except KernelCallError as e:
                steps.append((step, calls, None, str(e)))
    return steps


def check_model(name: str, *, batch: int, context: int, tokens: int, dtype: jnp.dtype, page_size: int,
                layers: int | None, kv_cache_dtype: str = "auto") -> list[str]:
    """Failures (kernel, shape, error) of lowering `name`'s steps; empty when everything lowers."""
    config = get_preset(name)
    config = shrunk(config, layers or fewest_layers(config))
    engine = engine_config(batch, context, tokens, page_size, kv_cache_dtype)
    inputs = step_inputs(config, engine, dtype, batch, tokens, -(-context // page_size))
    failures = []
    for step, calls, traced, error in traced_steps(engine, inputs, abstract_h100):
        if error:
            failures.append(f"{name} {step} step: {error}")
            print(f"{name} {step} step: FAILED while tracing", flush=True)
            continue
        kernel_failures = []
        for call in calls:
            try:
                lower_kernel_call(call)
            except Exception as e:  # noqa: BLE001 (every lowering error is a finding)
                kernel_failures.append(f"{name} {step} step: {call.describe()}: {type(e).__name__}: {_first_line(e)}")
        if not kernel_failures:
            try:
                with abstract_h100():
                    traced.lower(lowering_platforms=("cuda",))
            except Exception as e:  # noqa: BLE001
                kernel_failures.append(f"{name} {step} step (whole step): {type(e).__name__}: {_first_line(e)}")
        failures += kernel_failures
        print(f"{name} {step} step ({config.num_layers} layers): {len(calls)} kernel calls, "
              f"{'FAILED' if kernel_failures else 'lowered'}", flush=True)
        for call in calls:
            print(f"  {call.describe()}")
    return failures


def compile_kernel_call(call: KernelCall, mesh: jax.sharding.Mesh, dumps: Path, seen: set[str]) -> dict:
    """Compiles one recorded call alone on `mesh` (one deviceless GPU): its kernels' ptxas stats."""
    module, fn = KERNELS[call.kernel]
    statics = {k: v for k, v in call.statics if v != "<array>"}
    array_keys = [k for k, v in call.statics if v == "<array>"]
    num_positional = len(call.arrays) - len(array_keys)

    def kernel(*arrays):
        return getattr(module, fn)(*arrays[:num_positional], **dict(zip(array_keys, arrays[num_positional:])), **statics)

    replicated = jax.NamedSharding(mesh, jax.P())
    arrays = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), a)
              for a in call.arrays]
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        jax.jit(kernel).trace(*arrays).lower().compile()
    seconds = time.perf_counter() - start
    return {"call": call.describe(), "compile_seconds": round(seconds, 2),
            "kernels": [dataclasses.asdict(k) for k in compiled_stats.read(dumps, seen)]}


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest shard)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compile_model(name: str, target: gpu_target.GpuTarget, *, tensor: int, expert: int, batch: int, context: int,
                  tokens: int, dtype: jnp.dtype, page_size: int, layers: int | None, dumps: Path,
                  kv_cache_dtype: str = "auto") -> tuple[dict, list[str]]:
    """(report, failures) of compiling `name`'s kernels and steps for tensor x expert GPUs of
    `target`; the plan counts all layers' weights and KV pages per device."""
    full = get_preset(name)
    config = shrunk(full, layers or fewest_layers(full))
    engine, pages = engine_config(batch, context, tokens, page_size, kv_cache_dtype), -(-context // page_size)
    devices = tensor * expert
    gpus = gpu_target.devices(target, devices)
    mesh = make_mesh(1, tensor, expert, devices=gpus)
    one_gpu = make_mesh(1, 1, 1, devices=gpus[:1])
    inputs = step_inputs(config, engine, dtype, batch, tokens, pages, mesh)
    report: dict = {"model": name, "target": target.name, "device_kind": target.device_kind, "devices": devices,
                    "mesh": dict(mesh.shape), "layers_compiled": config.num_layers, "layers": full.num_layers,
                    "batch": batch, "context": context, "tokens": tokens, "dtype": jnp.dtype(dtype).name,
                    "page_size": page_size, "kv_cache_dtype": kv_cache_dtype, "steps": {}}
    failures, seen = [], set()
    compiled_stats.read(dumps, seen)  # the dumps of presets compiled before this one
    for step, calls, traced, error in traced_steps(engine, inputs, lambda: jax.set_mesh(mesh)):
        if error:
            failures.append(f"{name} {step} step: {error}")
            continue
        kernels = []
        for call in calls:
            try:
                kernels.append(compile_kernel_call(call, one_gpu, dumps, seen))
                failures += [f"{name} {step} step: {f}" for f in compiled_stats.gate_failures(kernels[-1], target.name, target.smem_optin_bytes)]
            except Exception as e:  # noqa: BLE001 (every compile error is a finding)
                failures.append(f"{name} {step} step: {call.describe()}: {type(e).__name__}: {_first_line(e)}")
        entry: dict = {"kernels": kernels}
        try:
            start = time.perf_counter()
            with jax.set_mesh(mesh):
                compiled = traced.lower().compile()
            entry.update(compile_seconds=round(time.perf_counter() - start, 2), memory=hlo.memory(compiled),
                         collectives=hlo.collectives(compiled.as_text()))
            compiled_stats.read(dumps, seen)  # the step's own copies of the kernels above
        except Exception as e:  # noqa: BLE001
            failures.append(f"{name} {step} step (whole step): {type(e).__name__}: {_first_line(e)}")
        report["steps"][step] = entry
        print(f"{name} {step} step ({config.num_layers} layers, {devices} x {target.name}): {len(calls)} kernel calls, "
              f"{'compiled' if 'memory' in entry else 'FAILED'}", flush=True)
    report["plan"] = memory_plan(full, engine, dtype, mesh, report["steps"], target)
    if not report["plan"]["fits"]:
        failures.append(f"{name}: {report['plan']['peak_bytes'] / 2**30:.1f} GiB per device does not fit "
                        f"{target.name}'s {target.memory_bytes / 2**30:.1f} GiB")
    return report, failures


def memory_plan(full: ModelConfig, engine: EngineConfig, dtype: jnp.dtype, mesh: jax.sharding.Mesh,
                steps: dict, target: gpu_target.GpuTarget) -> dict:
    """Per device: every layer's weights and KV pages (exact, from their sharded shapes) plus the
    compiled steps' largest temporary (the layers run one after another, so it does not grow)."""
    model = place_abstract(abstract_model(full, dtype), mesh, DEFAULT_RULES)
    shape = kv_cache.page_shape(full, engine.num_pages, engine.page_size)
    pool = jax.ShapeDtypeStruct(shape, kv_cache.pool_dtype(dtype, True, engine.kv_cache_dtype),
                                sharding=cache_sharding(shape, mesh, DEFAULT_RULES))
    kv = per_device_bytes([pool] * kv_cache.layout(full).tensors) * full.num_layers
    temp = max((s["memory"]["temp_bytes"] for s in steps.values() if "memory" in s), default=0)
    weights = per_device_bytes(nnx.state(model))
    peak = weights + kv + temp
    return {"weight_bytes": weights, "kv_cache_bytes": kv, "kv_cache_pages": engine.num_pages, "temp_bytes": temp,
            "peak_bytes": peak, "device_memory_bytes": target.memory_bytes, "fits": peak <= target.memory_bytes}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:400] if text else ""


def main(argv: list[str]) -> None:
    del argv
    failures = []
    if not COMPILE.value:
        for name in MODELS.value:
            failures += check_model(name, batch=BATCH.value, context=CONTEXT.value, tokens=TOKENS.value,
                                    dtype=jnp.dtype(DTYPE.value), page_size=PAGE_SIZE.value, layers=LAYERS.value,
                                    kv_cache_dtype=KV_CACHE_DTYPE.value)
    else:
        target, reports = gpu_target.load(TARGET.value), []
        with tempfile.TemporaryDirectory(prefix="mosaic_dumps_") as dumps:
            compiled_stats.enable_dumps(Path(dumps))
            for entry in MODELS.value:
                try:
                    name, tensor, expert = gpu_target.preset_mesh(entry, DEVICES.value, EXPERT.value)
                except ValueError as e:
                    raise app.UsageError(str(e)) from e
                report, model_failures = compile_model(
                    name, target, tensor=tensor, expert=expert, batch=BATCH.value,
                    context=CONTEXT.value, tokens=TOKENS.value, dtype=jnp.dtype(DTYPE.value),
                    page_size=PAGE_SIZE.value, layers=LAYERS.value, dumps=Path(dumps),
                    kv_cache_dtype=KV_CACHE_DTYPE.value)
                reports.append({**report, "failures": model_failures})
                failures += model_failures
        text = json.dumps({"jax": jax.__version__, "models": reports, "passed": not failures}, indent=1)
        Path(OUTPUT.value).write_text(text) if OUTPUT.value else print(text)
        print(compiled_stats.table(reports), flush=True)
    for failure in failures:
        print(f"{'COMPILE' if COMPILE.value else 'LOWERING'} FAILED: {failure}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    app.run(main)
