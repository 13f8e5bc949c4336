"""An array's device layout (shape, dtype, sharding and whether it is committed), so that a
replacement array is placed exactly as the original: jit keys its compiled programs on all four
(an uncommitted argument compiles a program of its own), so a refit or a wake-up that changed any
of them would recompile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where and how an array lived on the device."""

    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: jax.sharding.Sharding
    committed: bool

    @classmethod
    def of(cls, array: jax.Array) -> Layout:
        """The layout `array` has now."""
        return cls(tuple(array.shape), np.dtype(array.dtype), array.sharding, array.committed)

    def place(self, value: jax.Array | np.ndarray) -> jax.Array:
        """`value` (of this shape and dtype) on the device as this layout: committed to its sharding,
        or uncommitted on the default device (an array committed elsewhere goes through the host)."""
        if self.committed:
            return jax.device_put(value, self.sharding)
        if isinstance(value, jax.Array) and not value.committed and value.sharding == self.sharding:
            return value
        return jax.device_put(np.asarray(value))

    def zeros(self) -> jax.Array:
        """A zeroed array of this layout."""
        return jnp.zeros(self.shape, self.dtype, device=self.sharding if self.committed else None)
