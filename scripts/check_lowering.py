"""Lowers the engine's jitted steps (decode loop and mixed step) of a full-size preset with the
Pallas kernels for an abstract H100, from abstract shapes: no weights, no GPU.

Every kernel call met while tracing a step is first lowered on its own at its real shapes, so a
failure names the kernel and shape; then the whole step is lowered. Exits 1 on any failure.
Only ptxas is left unchecked (it needs a GPU). The layer count shrinks to the fewest layers that
hold every kind of layer (sliding window or not, dense or MoE): the shapes stay the real ones.

  python scripts/check_lowering.py --model=deepseek-v3 --batch=64 --context=4096 --dtype=bfloat16
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
from typing import Any, Callable, Iterator

from absl import app, flags
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractDevice, AbstractMesh

from engine import kv_cache
from engine.config import EngineConfig
from engine.runner import MixedBatch, ModelRunner, jitted_steps
from models.config import ModelConfig
from models.registry import abstract_model, get_preset
from pallas_kernels import flash_attention as fa
from pallas_kernels import grouped_matmul as gmm
from pallas_kernels import mla_attention as mla
from pallas_kernels import paged_attention as pa
from pallas_kernels import ragged_paged_attention_mgpu as rpm

MODELS = flags.DEFINE_list("model", ["llama3-8b"], "presets to check (comma-separated)")
BATCH = flags.DEFINE_integer("batch", 64, "decode rows (and max_num_seqs of the mixed step)")
CONTEXT = flags.DEFINE_integer("context", 4096, "tokens of context (block-table width)")
TOKENS = flags.DEFINE_integer("tokens", 512, "flat tokens of the mixed step")
DTYPE = flags.DEFINE_string("dtype", "bfloat16", "weights, activations and KV cache dtype")
PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "KV page size")
LAYERS = flags.DEFINE_integer("layers", None, "layers to build (default: the fewest holding every layer kind)")

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
# Every Mosaic GPU kernel entry point the ops dispatch to: (module, function name).
KERNELS = {
    "paged_attention": (pa, "paged_attention_kernel"),
    "flash_attention": (fa, "flash_attention_kernel"),
    "grouped_matmul": (gmm, "grouped_matmul_kernel"),
    "mla_decode": (mla, "mla_decode_kernel"),
    "ragged_paged_attention": (rpm, "ragged_paged_attention_kernel"),
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
        shapes = ", ".join("None" if a is None else f"{a.dtype}{list(a.shape)}" for a in self.arrays)
        statics = "".join(f", {k}={v}" for k, v in self.statics)
        return f"{self.kernel}({shapes}{statics})"


def abstract_h100() -> contextlib.AbstractContextManager:
    """Kernels that ask for the device (their block sizes) see an H100."""
    return jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=H100))


def _abstract(x: Any) -> Any:
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") and hasattr(x, "dtype") else x


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
                pages: int) -> dict[str, tuple]:
    """Abstract (state, cache, inputs...) of the decode loop and the mixed step, as the runner builds them."""
    graphdef, state = nnx.split(abstract_model(config, dtype))
    cache = [tuple(jax.ShapeDtypeStruct(kv_cache.page_shape(config, engine.num_pages, engine.page_size), dtype)
                   for _ in range(kv_cache.layout(config).tensors)) for _ in range(config.num_layers)]
    runner = types.SimpleNamespace(config=engine)  # the runner's padding-input builders need only its config
    decode = jax.tree.map(_abstract, ModelRunner.padding_decode(runner, batch, pages))
    mixed: MixedBatch = jax.tree.map(_abstract, ModelRunner.padding_mixed(runner, tokens, pages))
    return dict(graphdef=graphdef, decode=(state, cache, *decode), mixed=(state, cache, mixed))


def check_model(name: str, *, batch: int, context: int, tokens: int, dtype: jnp.dtype, page_size: int,
                layers: int | None) -> list[str]:
    """Failures (kernel, shape, error) of lowering `name`'s steps; empty when everything lowers."""
    config = get_preset(name)
    config = shrunk(config, layers or fewest_layers(config))
    pages = -(-context // page_size)
    engine = EngineConfig(max_model_len=context, page_size=page_size, num_pages=batch * pages + 1,
                          max_num_seqs=batch, prefill_chunk=min(tokens, 512), max_num_batched_tokens=tokens,
                          attention_impl="pallas")
    inputs = step_inputs(config, engine, dtype, batch, tokens, pages)
    mixed_fn, decode_fn = jitted_steps(inputs["graphdef"], "pallas", "pallas", page_size, engine.decode_steps)
    failures = []
    for step, fn in (("decode", decode_fn), ("mixed", mixed_fn)):
        try:
            with recorded_kernel_calls() as calls, abstract_h100():
                traced = fn.trace(*inputs[step])
        except KernelCallError as e:
            failures.append(f"{name} {step} step: {e}")
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


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:400] if text else ""


def main(argv: list[str]) -> None:
    del argv
    failures = []
    for name in MODELS.value:
        failures += check_model(name, batch=BATCH.value, context=CONTEXT.value, tokens=TOKENS.value,
                                dtype=jnp.dtype(DTYPE.value), page_size=PAGE_SIZE.value, layers=LAYERS.value)
    for failure in failures:
        print(f"LOWERING FAILED: {failure}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    app.run(main)
