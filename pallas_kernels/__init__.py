"""Pallas GPU kernels (Mosaic GPU, H100) with plain-jnp references; models call `ops`."""

from pallas_kernels import ops

__all__ = ["ops"]
