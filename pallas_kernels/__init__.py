"""Pallas GPU kernels (Mosaic GPU, H100) with plain-jnp references; models call `pallas_kernels.ops`."""
