"""Building blocks shared by the model assemblies: RMSNorm, embeddings, rotary, dense MLP, and the
packed storage of checkpoint-quantized weights (PackedWeight)."""

from __future__ import annotations

import math
from types import EllipsisType

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig, RopeScaling
from pallas_kernels import ops
from pallas_kernels.quantized import QuantizedWeight


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm, computed in float32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype, axis: str = "embed"):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=(axis,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding; `attend` reuses the table as a tied LM head."""

    def __init__(self, vocab: int, dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (vocab, dim), dtype), logical_axes=("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attend(self, x_btd: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x_btd, self.embedding[...], preferred_element_type=jnp.float32)


class PackedWeight(nnx.Module):
    """A weight of dense shape [..., K, N] held as its checkpoint packs it: `values` and `scales`
    nnx.Params in the K-major layout [..., N, K(/2)] (pallas_kernels/quantized.py), both along the
    dense weight's logical axes with N before K (scales at block granularity). It stands where an
    nnx.Param would: `[...]` gives the QuantizedWeight the ops take, `get_metadata()` the values'."""

    def __init__(self, shape: tuple[int, ...], axes: tuple[str, ...], fmt: str, *, rngs: nnx.Rngs):
        w = QuantizedWeight.random(rngs.params(), shape, fmt)
        *lead, k_axis, n_axis = axes
        self.values = nnx.Param(w.values, logical_axes=(*lead, n_axis, k_axis), fmt=fmt)
        self.scales = nnx.Param(w.scales, logical_axes=(*lead, n_axis, k_axis), fmt=fmt)
        self.fmt = fmt

    def __getitem__(self, index: EllipsisType) -> QuantizedWeight:
        assert index is Ellipsis, "a packed weight is read whole: w[...]"
        return QuantizedWeight(self.values[...], self.scales[...], self.fmt)

    def get_metadata(self) -> dict:
        return self.values.get_metadata()


def weight(shape: tuple[int, ...], axes: tuple[str, ...], fmt: str | None, *, dtype: jnp.dtype,
           rngs: nnx.Rngs) -> nnx.Param | PackedWeight:
    """A [..., K, N] weight: dense in dtype, or packed in `fmt` (ModelConfig.packed_format)."""
    if fmt is None:
        return nnx.Param(_normal(rngs, shape, dtype), logical_axes=axes)
    return PackedWeight(shape, axes, fmt, rngs=rngs)


class Linear(nnx.Module):
    """A bias-optional projection whose kernel has named (logical) axes for sharding.

    fmt: hold the kernel packed (PackedWeight), flattened to [prod(in), prod(out)] along the leading
    in and out axes (a contiguous split of the flat axis is that axis' split), run by ops.quantized_matmul.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], axes: tuple[str, ...],
                 *, bias: bool = False, dtype: jnp.dtype, rngs: nnx.Rngs, fmt: str | None = None):
        n_in = len(in_shape)
        if fmt is None:
            self.kernel = weight((*in_shape, *out_shape), axes, None, dtype=dtype, rngs=rngs)
        else:
            flat = (math.prod(in_shape), math.prod(out_shape))
            self.kernel = weight(flat, (axes[0], axes[n_in]), fmt, dtype=dtype, rngs=rngs)
        self.bias = (nnx.Param(jnp.zeros(out_shape, dtype), logical_axes=axes[n_in:])
                     if bias else None)
        self.n_in, self.out_shape = n_in, out_shape

    def __call__(self, x: jax.Array, impl: str = "auto") -> jax.Array:
        """impl: the packed kernel's matmul impl (pallas_kernels.ops); a dense kernel has no choice."""
        if isinstance(self.kernel, PackedWeight):
            lead = x.shape[:x.ndim - self.n_in]
            y = ops.quantized_matmul(x.reshape(math.prod(lead), -1), self.kernel[...], impl=impl)
            y = y.reshape(*lead, *self.out_shape)
        else:
            y = jax.lax.dot_general(x, self.kernel[...], (((tuple(range(x.ndim - self.n_in, x.ndim))),
                                                           tuple(range(self.n_in))), ((), ())))
        return y if self.bias is None else y + self.bias[...]


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, fmt: str | None = None):
        self.gate_proj = Linear((dim,), (hidden,), ("embed", "mlp"), dtype=dtype, rngs=rngs, fmt=fmt)
        self.up_proj = Linear((dim,), (hidden,), ("embed", "mlp"), dtype=dtype, rngs=rngs, fmt=fmt)
        self.down_proj = Linear((hidden,), (dim,), ("mlp", "embed"), dtype=dtype, rngs=rngs, fmt=fmt)

    def __call__(self, x: jax.Array, impl: str = "auto", real: jax.Array | None = None) -> jax.Array:
        """impl: the packed projections' matmul impl (every feed-forward takes one); real (which
        tokens are not padding): a dense MLP has nothing to skip, so it ignores it."""
        del real
        return self.down_proj(jax.nn.silu(self.gate_proj(x, impl)) * self.up_proj(x, impl), impl)


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim/2] (float64, scaled per config) and the attention factor."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    if scaling.kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    return _yarn_inv_freq(inv_freq, scaling, config.rope_theta, dim)


def _llama3_inv_freq(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by `factor`, short kept, a smooth blend between."""
    old_len = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / s.low_freq_factor, old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(inv_freq: np.ndarray, s: RopeScaling, base: float, dim: int) -> tuple[np.ndarray, float]:
    """YaRN (NTK-by-parts): interpolate low frequencies, keep high ones, ramp between."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = inv_freq / s.factor * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    if s.attention_factor is not None:
        factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        factor = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        factor = _yarn_mscale(s.factor)
    return inv_freq, factor


class RotaryEmbedding:
    """Rotary position embedding (rotate-half layout, as Hugging Face Llama), angles in float32."""

    def __init__(self, config: ModelConfig):
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.inv_freq = inv_freq.astype(np.float32)

    def __call__(self, x_btnh: jax.Array, positions_bt: jax.Array) -> jax.Array:
        angles = positions_bt.astype(jnp.float32)[..., None] * self.inv_freq  # [B, T, D/2]
        cos = (jnp.cos(angles) * self.attention_factor)[:, :, None, :]
        sin = (jnp.sin(angles) * self.attention_factor)[:, :, None, :]
        x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return out.astype(x_btnh.dtype)
