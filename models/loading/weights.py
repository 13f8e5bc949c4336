"""Fill a model's parameters from tensors named as in Hugging Face checkpoints, checking shapes.

Every source format (safetensors, GGUF) is first mapped to HF names and HF layouts ([out, in]
for projections); this file alone knows how HF tensors map onto our NNX parameter tree.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.loading.progress import progress
from pallas_kernels.quantized import QuantizedWeight

# HF tensor name -> array (raises KeyError if absent); a packed getter gives QuantizedWeights.
TensorGetter = Callable[[str], "np.ndarray | QuantizedWeight"]
# A model's own mapping for parameters the Llama naming does not cover: (our parameter path, its
# shape, the getter) -> the array (or packed weight) in our layout, or None to fall back to the
# default mapping (raises KeyError if a tensor is absent).
ParamLoader = Callable[[tuple[str, ...], tuple[int, ...], TensorGetter], "np.ndarray | QuantizedWeight | None"]


def _hf_name(path: tuple) -> str:
    """Our parameter path -> the HF tensor name (Llama naming)."""
    parts = [str(p) for p in path]
    if parts[0] == "embed_tokens":
        return "model.embed_tokens.weight"
    if parts[0] == "lm_head":
        return f"lm_head.{'weight' if parts[-1] == 'kernel' else 'bias'}"
    leaf = "weight" if parts[-1] in ("kernel", "weight") else "bias"
    return "model." + ".".join(parts[:-1] + [leaf])


def _to_ours(hf: np.ndarray, ours_shape: tuple[int, ...], is_kernel: bool, n_in: int) -> np.ndarray:
    """HF layout -> ours: projections [out, in] become [*in_shape, *out_shape]."""
    if not is_kernel:
        return hf.reshape(ours_shape)
    in_size = math.prod(ours_shape[:n_in])
    return hf.reshape(-1, in_size).T.reshape(ours_shape)


def _expected_hf_shape(ours_shape: tuple[int, ...], is_kernel: bool, n_in: int, name: str) -> tuple[int, ...]:
    if name == "model.embed_tokens.weight":
        return ours_shape
    if not is_kernel:
        return (math.prod(ours_shape),) if len(ours_shape) > 1 else ours_shape
    return (math.prod(ours_shape[n_in:]), math.prod(ours_shape[:n_in]))


def _kernel_inputs(path: tuple) -> int:
    """Number of input axes of a projection kernel (o_proj reads [heads, head_dim])."""
    return 2 if "o_proj" in [str(p) for p in path] else 1


def default_param(path: tuple, ours_shape: tuple[int, ...], get_tensor: TensorGetter) -> np.ndarray | QuantizedWeight:
    """One parameter through the Llama naming, shape-checked against the HF layout."""
    name = _hf_name(path)
    is_kernel = str(path[-1]) == "kernel"
    n_in = _kernel_inputs(path)
    hf = get_tensor(name)
    if isinstance(hf, QuantizedWeight):  # packed [out, in] as shipped: our flattened [in, out] kernel
        if hf.shape != ours_shape:
            raise ValueError(f"tensor {name!r} has shape {hf.shape[::-1]} but the config expects {ours_shape[::-1]}")
        return hf
    expected = _expected_hf_shape(ours_shape, is_kernel, n_in, name)
    if tuple(hf.shape) != expected:
        raise ValueError(f"tensor {name!r} has shape {tuple(hf.shape)} but the config expects {expected}")
    return _to_ours(hf, ours_shape, is_kernel, n_in)  # a view: a lazy (memory-mapped) tensor stays lazy


def _load_param(path: tuple, ours_shape: tuple[int, ...], get_tensor: TensorGetter,
                param_loader: ParamLoader | None) -> np.ndarray | QuantizedWeight:
    try:
        special = None if param_loader is None else param_loader(tuple(str(p) for p in path), ours_shape, get_tensor)
        if special is None:
            return default_param(path, ours_shape, get_tensor)
    except KeyError as e:
        raise ValueError(f"checkpoint is missing tensor {e.args[0]!r}") from None
    if tuple(special.shape) != ours_shape:
        raise ValueError(f"parameter {'.'.join(map(str, path))} loads with shape {tuple(special.shape)} "
                         f"but the config expects {ours_shape}")
    return special


def fill_params(abstract_model: nnx.Module, get_tensor: TensorGetter, dtype: jnp.dtype,
                sharding_for: Callable[[tuple], jax.sharding.Sharding | None] = lambda path: None,
                param_loader: ParamLoader | None = None, get_packed: TensorGetter | None = None) -> nnx.Module:
    """Materialise `abstract_model` (from nnx.eval_shape) tensor by tensor from `get_tensor`.

    param_loader: the architecture's mapping for parameters outside the Llama naming. get_packed:
    the packed getter (models/loading/quantized.py) for the values + scales of packed weights
    (layers.PackedWeight, marked by their `fmt` metadata), which keep their stored dtypes.
    """
    graphdef, state = nnx.split(abstract_model)
    flat = [(tuple(path), var) for path, var in nnx.to_flat_state(state)]
    abstract = dict(flat)
    ready: dict[tuple, jax.Array] = {}  # the placed other half of a packed weight
    out = []
    for path, var in progress(flat, "loading weights"):
        if path not in ready:
            fmt = var.get_metadata().get("fmt")
            if fmt is None:
                ready[path] = _place(_load_param(path, tuple(var.get_value().shape), get_tensor, param_loader), dtype,
                                     sharding_for(path))
            else:
                ready.update(_load_packed(path[:-1], fmt, abstract, get_packed, param_loader, sharding_for))
        out.append((path, var.replace(ready.pop(path))))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def _load_packed(owner: tuple, fmt: str, abstract: dict[tuple, nnx.Variable], get_packed: TensorGetter,
                 param_loader: ParamLoader | None, sharding_for: Callable) -> dict[tuple, jax.Array]:
    """Both halves (values, scales) of the packed weight at `owner`, placed in their stored dtypes."""
    want = QuantizedWeight(abstract[(*owner, "values")].get_value(), abstract[(*owner, "scales")].get_value(), fmt)
    w = _load_param(owner, want.shape, get_packed, param_loader)
    if not isinstance(w, QuantizedWeight) or w.fmt != fmt:
        raise ValueError(f"parameter {'.'.join(map(str, owner))} is held packed in {fmt}, but the checkpoint "
                         f"gives {getattr(w, 'fmt', 'a dense tensor')}")
    return {(*owner, part): _place(getattr(w, part), getattr(want, part).dtype, sharding_for((*owner, part)))
            for part in ("values", "scales")}


def read_shard(value: np.ndarray, index: tuple[slice, ...], dtype: jnp.dtype) -> np.ndarray:
    """One shard of a parameter in our layout; on a memory-mapped tensor only its bytes are read."""
    return np.asarray(value[index], dtype=dtype)


def _place(value: np.ndarray, dtype: jnp.dtype, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Device array of `value`; with a sharding, each device's shard is read separately (a process
    reads only the shards its devices hold)."""
    if sharding is None:
        return jnp.asarray(read_shard(value, (), dtype))
    return jax.make_array_from_callback(value.shape, sharding, lambda index: read_shard(value, index, dtype))
