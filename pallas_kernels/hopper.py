"""What the Mosaic GPU kernels share about the Hopper GPU they target: the device and its SM count,
its shared memory, the wgmma operand dtype, wgmma into a float32 accumulator, swizzled SMEM and
the padding wgmma tiles need."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


SM90_KINDS = ("H100", "H200")
NOMINAL_NUM_SMS = 132  # an H100 SXM's SMs: what a target that reports none (a CPU interpreting) counts


def is_sm90_gpu() -> bool:
    """True when the default device is an H100/H200, the GPUs the Mosaic kernels target."""
    device = jax.devices()[0]
    return device.platform == "gpu" and any(k in device.device_kind for k in SM90_KINDS)


def _target_device() -> Any:
    """The device kernels are built for: an abstract mesh's AbstractDevice when one is set
    (cross-lowering for an H100 on CPU, compiling for a deviceless GPU topology), else the default
    device."""
    abstract = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return abstract if abstract is not None else jax.devices()[0]


def target_device_kind() -> str:
    """The kind of the device kernels are built for (_target_device). Picks each kernel's frozen config."""
    return _target_device().device_kind


def target_num_sms() -> int:
    """The SM count of the device kernels are built for (_target_device): an AbstractDevice's
    num_cores or a GPU's core_count (114 on an H100 PCIe, 132 on an SXM or an H200). Sizes the
    persistent grids and the KV splits; NOMINAL_NUM_SMS where the device reports none (a CPU
    interpreting the kernels, so interpret mode walks the H100 SXM's grids and splits)."""
    device = _target_device()
    return getattr(device, "num_cores", None) or getattr(device, "core_count", None) or NOMINAL_NUM_SMS


SMEM_BYTES = 232_448  # an H100's shared memory per block (227 KiB)
# Barriers, alignment and Mosaic's own scratch beyond a kernel's own count (the ragged kernel at
# head dim 192, 3 slots: 229,632 counted, 232,504 lowered).
SMEM_SLACK = 4096


def wgmma_f32(a_smem, b_smem, shape: tuple[int, int]) -> jax.Array:
    """a @ b on wgmma into a fresh float32 accumulator, returned in registers."""

    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        return acc_ref[...]

    return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


def swizzled_smem(shape: tuple[int, ...], dtype: Any, max_row_bytes: int = 128) -> plgpu.SMEM:
    """An SMEM buffer in (8, row) tiles swizzled over rows of max_row_bytes (fewer where the last
    axis is narrower), the layout TMA writes and wgmma reads."""
    itemsize = jnp.dtype(dtype).itemsize
    row_bytes = min(max_row_bytes, shape[-1] * itemsize)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, row_bytes // itemsize)),
                                                plgpu.SwizzleTransform(row_bytes)))


def mma_dtype(dtype: Any, interpret: Any) -> Any:
    """What wgmma multiplies: bf16/f16 as they are; f32 too when interpreting (CPU engine runs in
    f32 and should match the XLA path); an FP8 KV pool as f16 (Hopper converts e4m3 to f16 natively,
    to bf16 only with ptxas ISA >= 9.2, and every e4m3 value is exact in f16); anything else as
    bf16 (the GPU's f32 wgmma is tf32 with layout limits)."""
    if dtype in (jnp.bfloat16, jnp.float16) or (interpret is not None and dtype == jnp.float32):
        return dtype
    return jnp.float16 if dtype == jnp.float8_e4m3fn else jnp.bfloat16


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= x."""
    return -(-x // multiple) * multiple


def pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x zero-padded at the end of each axis to `shape`; x itself, no copy and no op in the lowered
    module, when it already has that shape (jnp.pad would still emit a pad)."""
    if tuple(x.shape) == tuple(shape):
        return x
    return jnp.pad(x, [(0, want - have) for have, want in zip(x.shape, shape)])


def pad_last(x: jax.Array, multiple: int) -> jax.Array:
    """Zero-pads the last axis to a multiple of `multiple` (head_dim, for 128-byte swizzled rows).

    Zero q/k columns leave the logits unchanged; zero v columns give output columns to drop.
    """
    return pad_to(x, (*x.shape[:-1], round_up(x.shape[-1], multiple)))
