"""Quantized weights as checkpoints ship them: packed values + block scales in one pytree.

QuantizedWeight stands where a dense weight [..., K, N] (in, out) would, but keeps the shipped
K-major layout [..., N, K] (what an 8-bit wgmma operand needs, and what both formats store):

  "mxfp4"     (gpt-oss experts) values uint8 [..., N, K // 2], two e2m1 codes a byte, the low
              nibble first (element k = 2b is byte b's low nibble); scales uint8 e8m0 [..., N, K // 32],
              2 ** (s - 127) per 32 values along K. W4A16: activations stay bf16.
  "fp8_block" (DeepSeek-V3/R1, Qwen3 FP8) values float8_e4m3fn [..., N, K]; scales float32
              [..., ceil(N / 128), ceil(K / 128)] (`weight_scale_inv`), one per 128 x 128 block.
              W8A8: activations are quantized per token in groups of 128 along K (act_quant).

`dequantize` is the reference every kernel is tested against, and the XLA path: inside the
jitted step it expands one layer's weight at a time, so memory stays packed (docs/quantization.md).
`dense_operands` says what that path multiplies (W4A16 or W8A8), `matmul_reference` is the dense GEMM.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("mxfp4", "fp8_block")
MXFP4_BLOCK = 32
FP8_BLOCK = 128
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
E8M0_NAN = 255
FP4_E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
DTYPES = {"mxfp4": (jnp.uint8, jnp.uint8), "fp8_block": (jnp.float8_e4m3fn, jnp.float32)}  # (values, scales)
MXFP4_MEAN_SQUARE = float(np.mean(FP4_E2M1_VALUES ** 2))  # of a uniformly random e2m1 code


def packed_shapes(shape: tuple[int, ...], fmt: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The values and scales shapes of a weight whose dense shape is [..., K, N] (module doc)."""
    *lead, k, n = shape
    if fmt == "mxfp4":
        return (*lead, n, k // 2), (*lead, n, -(-k // MXFP4_BLOCK))
    return (*lead, n, k), (*lead, -(-n // FP8_BLOCK), -(-k // FP8_BLOCK))


def scale_block(fmt: str) -> tuple[int, int]:
    """Stored values one scale covers along the values' last two axes [N, K(/2)]: one row of 16
    bytes (32 e2m1 values) for mxfp4, 128 x 128 for fp8_block."""
    return (1, MXFP4_BLOCK // 2) if fmt == "mxfp4" else (FP8_BLOCK, FP8_BLOCK)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """Packed values and block scales of one weight (or a stack of experts' weights); see module doc."""

    values: jax.Array
    scales: jax.Array
    fmt: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense weight's shape [..., K, N]."""
        *lead, n, k = self.values.shape
        return (*lead, k * 2 if self.fmt == "mxfp4" else k, n)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed values plus scales."""
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in (self.values, self.scales))

    @classmethod
    def random(cls, key: jax.Array, shape: tuple[int, ...], fmt: str, std: float = 0.02) -> QuantizedWeight:
        """Random packed weight of dense shape [..., K, N] whose values have about `std` RMS (random
        presets: the packed bytes of a full-size model without a checkpoint)."""
        values_shape, scales_shape = packed_shapes(shape, fmt)
        if fmt == "mxfp4":  # uniform codes, one power-of-two scale
            exponent = round(math.log2(std / math.sqrt(MXFP4_MEAN_SQUARE)))
            return cls(jax.random.bits(key, values_shape, jnp.uint8), jnp.full(scales_shape, 127 + exponent, jnp.uint8),
                       fmt)
        values = jax.random.normal(key, values_shape, jnp.float32).astype(jnp.float8_e4m3fn)
        return cls(values, jnp.full(scales_shape, std, jnp.float32), fmt)

    def dequantize(self, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
        """The dense weight [..., K, N] in dtype (exact in bf16 for MXFP4 scales up to 2**125)."""
        if self.fmt == "mxfp4":
            lut = jnp.asarray(FP4_E2M1_VALUES)
            codes = jnp.stack([self.values & 0x0F, self.values >> 4], axis=-1).reshape(*self.values.shape[:-1], -1)
            scale = jnp.ldexp(jnp.float32(1), self.scales.astype(jnp.int32) - 127)
            dense = lut[codes] * jnp.repeat(scale, MXFP4_BLOCK, axis=-1)
        else:
            n, k = self.values.shape[-2:]
            scale = jnp.repeat(jnp.repeat(self.scales, FP8_BLOCK, axis=-2), FP8_BLOCK, axis=-1)[..., :n, :k]
            dense = self.values.astype(jnp.float32) * scale
        return jnp.swapaxes(dense, -1, -2).astype(dtype)


def quantize(dense: jax.Array, fmt: str) -> QuantizedWeight:
    """A dense weight [..., K, N] packed as the checkpoints are made: mxfp4 by the OCP rule (per 32
    values along K a power-of-two scale 2**ceil(log2(amax / 6)), each value to the nearest e2m1);
    fp8_block by amax / 448 per 128 x 128 block (DeepSeek's weight_scale_inv), values clipped to +-448."""
    w = jnp.swapaxes(dense.astype(jnp.float32), -1, -2)  # [..., N, K]
    *lead, n, k = w.shape
    if fmt == "mxfp4":
        groups = w.reshape(*lead, n, k // MXFP4_BLOCK, MXFP4_BLOCK)
        amax = jnp.max(jnp.abs(groups), axis=-1, keepdims=True)
        exponent = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(amax, 2.0 ** -127) / 6.0)), -127, 127)
        scaled = groups / jnp.exp2(exponent)
        lut = jnp.asarray(FP4_E2M1_VALUES[:8])
        codes = jnp.argmin(jnp.abs(jnp.abs(scaled)[..., None] - lut), axis=-1) + 8 * (scaled < 0)
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(jnp.uint8)
        return QuantizedWeight(packed.reshape(*lead, n, k // 2), (exponent[..., 0] + 127).astype(jnp.uint8), fmt)
    pad_n, pad_k = -n % FP8_BLOCK, -k % FP8_BLOCK
    tiles = jnp.pad(w, [(0, 0)] * len(lead) + [(0, pad_n), (0, pad_k)]).reshape(
        *lead, (n + pad_n) // FP8_BLOCK, FP8_BLOCK, (k + pad_k) // FP8_BLOCK, FP8_BLOCK)
    scale = jnp.maximum(jnp.max(jnp.abs(tiles), axis=(-3, -1)), 1e-12) / FP8_MAX
    values = jnp.clip(tiles / scale[..., :, None, :, None], -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return QuantizedWeight(values.reshape(*lead, n + pad_n, k + pad_k)[..., :n, :k], scale, fmt)


def check(w: QuantizedWeight, name: str) -> None:
    """A ValueError naming the tensor when values and scales do not make a weight of w.fmt."""
    if w.fmt not in FORMATS:
        raise ValueError(f"{name}: unknown quantized format {w.fmt!r}; expected one of {FORMATS}")
    k = w.shape[-2]
    if w.fmt == "mxfp4" and k % MXFP4_BLOCK:
        raise ValueError(f"{name}: mxfp4 K = {k} is not a multiple of the {MXFP4_BLOCK}-value block")
    want_dtypes, want_scales = DTYPES[w.fmt], packed_shapes(w.shape, w.fmt)[1]
    got_dtypes = (jnp.dtype(w.values.dtype), jnp.dtype(w.scales.dtype))
    if got_dtypes != tuple(jnp.dtype(d) for d in want_dtypes):
        raise ValueError(f"{name}: {w.fmt} values/scales must be {[jnp.dtype(d).name for d in want_dtypes]}, "
                         f"got {[d.name for d in got_dtypes]}")
    if tuple(w.scales.shape) != want_scales:
        raise ValueError(f"{name}: {w.fmt} scales have shape {tuple(w.scales.shape)}, but values "
                         f"{tuple(w.values.shape)} need {want_scales}")


def check_scales(w: QuantizedWeight, name: str) -> None:
    """On concrete (host or device) scales: no NaN e8m0 byte (255), no non-finite or negative fp8 scale."""
    scales = np.asarray(w.scales)
    bad = scales == E8M0_NAN if w.fmt == "mxfp4" else ~np.isfinite(scales) | (scales < 0)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: {int(bad.sum())} invalid {w.fmt} scale(s), the first at {index} "
                         f"({scales[index]!r}: {'the e8m0 NaN' if w.fmt == 'mxfp4' else 'not a finite scale'})")


def quantize_activations_fp8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token groups of 128 along K, dynamic (DeepSeek's act_quant): x [M, K] -> (e4m3 [M, K],
    f32 scales [M, ceil(K / 128)]) with x ~= values * scale; clipped to +-448 before the cast (XLA's
    CPU cast turns values past ~464 into NaN instead of saturating)."""
    m, k = x.shape
    pad = -k % FP8_BLOCK
    groups = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad))).reshape(m, -1, FP8_BLOCK)
    scale = jnp.maximum(jnp.max(jnp.abs(groups), axis=-1), 1e-4) / FP8_MAX
    values = jnp.clip(groups / scale[..., None], -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return values.reshape(m, -1)[:, :k], scale


def dequantize_activations_fp8(values: jax.Array, scale: jax.Array) -> jax.Array:
    """The f32 activations [M, K] a W8A8 GEMM multiplies: values times their group's scale."""
    return values.astype(jnp.float32) * jnp.repeat(scale, FP8_BLOCK, axis=-1)[:, :values.shape[1]]


def dense_operands(x: jax.Array, w: jax.Array | QuantizedWeight) -> tuple[jax.Array, jax.Array]:
    """The operands the XLA path multiplies for x [M, K] by w [..., K, N]: a dense w as it is;
    mxfp4 (W4A16) x by the weight dequantized to x.dtype (exact); fp8_block (W8A8) both operands
    quantized as the GPU GEMM sees them, dequantized to f32 (= the block-scaled GEMM up to f32
    rounding: DeepGEMM promotes each 128-K partial sum by sA * sB)."""
    if not isinstance(w, QuantizedWeight):
        return x, w
    # The weight waits for the activations: else XLA computes every layer's dequantized weight up
    # front (it depends on parameters only) and keeps them all live (DeepSeek-V3 on 8 CPU devices:
    # +174 GB of temporaries per device).
    x, w = jax.lax.optimization_barrier((x, w))
    if w.fmt == "mxfp4":
        return x, w.dequantize(x.dtype)
    return dequantize_activations_fp8(*quantize_activations_fp8(x)), w.dequantize(jnp.float32)


def matmul_reference(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] in x.dtype, f32 accumulation, numerics of dense_operands."""
    a, b = dense_operands(x, w)
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(x.dtype)
