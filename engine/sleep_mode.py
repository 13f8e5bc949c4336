"""Sleep mode (vLLM's sleep levels): free an idle engine's device memory and restore it later
without recompiling (the same shapes, dtypes and shardings come back).

Level 1 copies the weights to host numpy and deletes their device buffers; level 2 deletes them
without a copy (wake_up allocates zeros: load real weights with update_weights, as vLLM's level 2
expects a reload). Both delete the KV pool (its contents are discarded: the prefix cache forgets
every key) and a speculative proposer's cache. A draft model's weights sleep with the target's;
the MTP head is part of the target's.
"""

from __future__ import annotations

import dataclasses

import jax
from absl import logging
from flax import nnx

from engine.device_layout import Layout
from engine.weight_updates import variables

LEVELS = (1, 2)


@dataclasses.dataclass(frozen=True)
class SleepReport:
    """What sleep() freed: the bytes of the device buffers it deleted, and where jax reports device
    memory (not on a CPU) how much less its first device holds."""

    level: int
    weights_bytes: int
    kv_cache_bytes: int
    device_bytes_freed: int | None

    @property
    def freed_bytes(self) -> int:
        """Weights and KV cache together."""
        return self.weights_bytes + self.kv_cache_bytes


@dataclasses.dataclass(frozen=True)
class Asleep:
    """A sleeping engine's record: its weight Variables (holding host copies, or nothing at level 2)
    with their device shapes and shardings, and the KV pool's."""

    level: int
    weights: list[tuple[nnx.Variable, Layout]]
    cache: list[tuple[Layout, ...]]


def check_level(level: object) -> None:
    """ValueError unless `level` is one of LEVELS."""
    if level not in LEVELS or isinstance(level, bool):
        raise ValueError(f"sleep level must be one of {LEVELS}, got {level!r}")


def weight_variables(models: list[nnx.Module | nnx.State]) -> list[nnx.Variable]:
    """Every Variable of the models (or their states), each once (an MTP head's are the target's)."""
    seen: dict[int, nnx.Variable] = {}
    for model in models:
        for var in variables(model).values():
            seen.setdefault(id(var), var)
    return list(seen.values())


def sleep(weights: list[nnx.Variable], cache: list[tuple[jax.Array, ...]], level: int,
          discard: list[tuple[jax.Array, ...]] = ()) -> tuple[Asleep, SleepReport]:
    """Take the weights off the device (to host at level 1) and delete the KV pool's buffers (and
    those of `discard`: caches whose owners rebuild them, a proposer's)."""
    before = _bytes_in_use()
    jax.block_until_ready((cache, list(discard)))  # a call dispatched ahead may still write them
    record = Asleep(level, [(var, Layout.of(var.get_value())) for var in weights],
                    [tuple(Layout.of(a) for a in layer) for layer in cache])
    weights_bytes = sum(_offload(var, keep=level == 1) for var in weights)
    cache_bytes = sum(_delete(a) for layer in [*cache, *discard] for a in layer)
    after = _bytes_in_use()
    report = SleepReport(level, weights_bytes, cache_bytes, None if before is None else before - after)
    logging.info("sleep level %d: freed %.1f MiB of weights and %.1f MiB of KV cache (device memory: %s)", level,
                 weights_bytes / 2**20, cache_bytes / 2**20,
                 "not reported" if before is None else f"{report.device_bytes_freed / 2**20:.1f} MiB less in use")
    return record, report


def wake_up(record: Asleep) -> list[tuple[jax.Array, ...]]:
    """Put the weights back on the device with their shardings (zeros at level 2); returns a fresh
    zeroed KV pool of the shapes and shardings it had."""
    for var, layout in record.weights:
        var.set_value(layout.zeros() if record.level == 2 else layout.place(var.get_value()))
    return [tuple(layout.zeros() for layout in layer) for layer in record.cache]


def _offload(var: nnx.Variable, keep: bool) -> int:
    """Replace the Variable's device array by a host copy (keep) or its shape alone; its bytes freed."""
    array = var.get_value()
    var.set_value(jax.device_get(array) if keep else jax.ShapeDtypeStruct(array.shape, array.dtype))
    return _delete(array)


def _delete(array: jax.Array) -> int:
    """Delete a device buffer now (not at its last reference's release); its bytes."""
    nbytes = array.nbytes
    array.delete()
    return nbytes


def _bytes_in_use() -> int | None:
    """The first device's bytes in use, where jax reports them (None on a CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("bytes_in_use")


class EngineAsleepError(RuntimeError):
    """A request (or a weight update) reached an engine that is asleep."""
