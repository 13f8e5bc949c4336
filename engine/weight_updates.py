"""Refit (RL weight sync): replace a serving engine's weights with new ones of the same shapes,
dtypes and shardings, without recompiling anything.

The new weights come as a params pytree (an nnx.State, an nnx.Module or a nested dict of arrays in
the model's own layout), an orbax directory or an HF safetensors checkpoint directory (read by
models.load_model, through the same conversion and quantization path as the engine's own load).
`prepare` loads, checks every parameter against the served one (the first mismatching path is a
ValueError; nothing changes) and places each array with the served array's sharding; `apply`
then sets each parameter's nnx.Variable to its new array (in place: every holder of the model's
Variables, the MTP head included, sees the new weights) and drops every prefix-cache key, whose
KV the old weights computed. The jitted steps take the parameters as arguments, so arrays of the
same shapes, dtypes and shardings run the programs already compiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from engine.device_layout import Layout
from models import LoadedModel, load_model
from models.loading import quantized

Key = tuple[str, ...]  # a parameter's path, its parts as strings ("layers", "0", "mlp", ...)


@dataclasses.dataclass(frozen=True)
class PreparedWeights:
    """New weights, checked against the served ones and already placed with their shardings."""

    arrays: dict[Key, jax.Array]


WeightsSource = PreparedWeights | nnx.State | nnx.Module | Mapping | str | Path


def variables(model: nnx.Module | nnx.State) -> dict[Key, nnx.Variable]:
    """The model's Variables by path, in the model's order (the served weights' one source)."""
    state = model if isinstance(model, nnx.State) else nnx.state(model)
    return {_key(path): var for path, var in nnx.to_flat_state(state)}


def prepare(model: LoadedModel, source: WeightsSource, weights: str | None = None) -> PreparedWeights:
    """Load `source`, check it against the served weights and place it: ValueError naming the first
    mismatching parameter (nothing placed is kept). Each array is placed as the one it replaces
    (engine/device_layout.py). weights: how a checkpoint directory is read
    (models.load_model's `weights`); None: "native" for a model served packed, else its dtype."""
    if isinstance(source, PreparedWeights):
        return source
    served = variables(model.model)
    new = _source_arrays(source, model, weights)
    check(served, new)
    return PreparedWeights({key: Layout.of(var.get_value()).place(new[key]) for key, var in served.items()})


def apply(model: LoadedModel, prepared: PreparedWeights) -> None:
    """Set every served parameter to its prepared array (the old ones are freed with their last reference)."""
    for key, var in variables(model.model).items():
        var.set_value(prepared.arrays[key])


def check(served: Mapping[Key, nnx.Variable], new: Mapping[Key, object]) -> None:
    """ValueError naming the first parameter (in the model's order) that is missing or differs in
    shape or dtype, then the first one the model does not have."""
    for key, var in served.items():
        if key not in new:
            raise ValueError(f"update_weights: parameter {_name(key)} is missing from the new weights")
        old, arr = var.get_value(), new[key]
        if tuple(np.shape(arr)) != tuple(old.shape):
            raise ValueError(f"update_weights: parameter {_name(key)} has shape {tuple(np.shape(arr))}, "
                             f"the served model's is {tuple(old.shape)}")
        dtype = getattr(arr, "dtype", None)
        if dtype is None or np.dtype(dtype) != np.dtype(old.dtype):
            raise ValueError(f"update_weights: parameter {_name(key)} has dtype {dtype}, "
                             f"the served model's is {np.dtype(old.dtype).name}")
    extra = next((key for key in new if key not in served), None)
    if extra is not None:
        raise ValueError(f"update_weights: the new weights have a parameter {_name(extra)} the served model lacks")


def _source_arrays(source: WeightsSource, model: LoadedModel, weights: str | None) -> dict[Key, object]:
    """The new weights by path: a pytree's leaves as given, a checkpoint directory loaded as the engine loads."""
    if isinstance(source, (str, Path)):
        return _checkpoint_arrays(Path(source), model, weights)
    if isinstance(source, nnx.Module):
        source = nnx.state(source)
    if isinstance(source, nnx.State):
        return {_key(path): v.get_value() if isinstance(v, nnx.Variable) else v
                for path, v in nnx.to_flat_state(source)}
    if isinstance(source, Mapping):
        leaves = jax.tree_util.tree_flatten_with_path(source, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
        return {_key(_path_parts(path)): v.get_value() if isinstance(v, nnx.Variable) else v for path, v in leaves}
    raise ValueError(f"update_weights: the source must be a params pytree (nnx.State or a dict of arrays), an "
                     f"orbax directory or an HF checkpoint directory, got {type(source).__name__}")


def _checkpoint_arrays(path: Path, model: LoadedModel, weights: str | None) -> dict[Key, object]:
    """An orbax or HF directory (or .gguf file) loaded by models.load_model onto the served model's
    mesh, in its dtype; its config must be the served one's (the weights are all that changes)."""
    if not path.exists():
        raise ValueError(f"update_weights: {path} does not exist")
    if weights is None:
        weights = quantized.NATIVE if model.config.quantization is not None else np.dtype(model.dtype).name
    loaded = load_model(path, dtype=model.dtype, mesh=model.mesh, rules=model.rules, weights=weights)
    _check_config(loaded, model)
    return {key: var.get_value() for key, var in variables(loaded.model).items()}


def _check_config(loaded: LoadedModel, served: LoadedModel) -> None:
    """ValueError naming the first config field (other than the name) in which the checkpoint differs."""
    for field in dataclasses.fields(served.config):
        new, old = getattr(loaded.config, field.name), getattr(served.config, field.name)
        if field.name != "name" and new != old:
            raise ValueError(f"update_weights: the checkpoint's config has {field.name}={new!r}, the served "
                             f"model's {old!r}: only weights can be updated")


def _path_parts(path: tuple) -> tuple:
    """A jax key path's parts (dict keys, sequence indices, attribute names)."""
    return tuple(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))) for p in path)


def _key(path: tuple) -> Key:
    """A parameter path with its parts as strings (int layer indices and "0" compare equal)."""
    return tuple(str(p) for p in path)


def _name(key: Key) -> str:
    """The dotted name errors show ("layers.0.mlp.down_proj.kernel")."""
    return ".".join(key)
