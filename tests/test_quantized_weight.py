"""pallas_kernels/quantized.py: the packed formats dequantize as the checkpoint loaders do, and bad
values/scales are errors naming the tensor."""

import jax.numpy as jnp
import numpy as np
import pytest

from models.loading.quantized import dequantize_fp8_blocks, dequantize_mxfp4
from pallas_kernels import quantized as qz


def mxfp4(rng, lead=(3,), n=40, k=64):
    blocks = rng.integers(0, 256, (*lead, n, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 136, (*lead, n, k // 32), dtype=np.uint8)
    return blocks, scales, qz.QuantizedWeight(jnp.asarray(blocks.reshape(*lead, n, k // 2)), jnp.asarray(scales), "mxfp4")


def test_mxfp4_dequantizes_as_the_checkpoint_loader():
    blocks, scales, w = mxfp4(np.random.default_rng(0))
    qz.check(w, "experts.down_proj")
    assert w.shape == (3, 64, 40) and w.nbytes == blocks.size + scales.size
    want = np.swapaxes(dequantize_mxfp4(blocks, scales), -1, -2)
    np.testing.assert_array_equal(np.asarray(w.dequantize(jnp.float32)), want)
    np.testing.assert_array_equal(np.asarray(w.dequantize(jnp.bfloat16), np.float32), want)  # exact in bf16


def test_fp8_blocks_dequantize_as_the_checkpoint_loader():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(200, 300)).astype(jnp.float8_e4m3fn)  # partial last row and column blocks
    scales = rng.uniform(0.01, 1, (2, 3)).astype(np.float32)
    w = qz.QuantizedWeight(jnp.asarray(values), jnp.asarray(scales), "fp8_block")
    qz.check(w, "q_a_proj")
    np.testing.assert_array_equal(np.asarray(w.dequantize(jnp.float32)), dequantize_fp8_blocks(values, scales).T)


def test_bad_scales_name_the_tensor():
    _, _, w = mxfp4(np.random.default_rng(2))
    with pytest.raises(ValueError, match=r"gate_up: mxfp4 scales have shape \(3, 40, 3\), but values"):
        qz.check(qz.QuantizedWeight(w.values, jnp.zeros((3, 40, 3), jnp.uint8), "mxfp4"), "gate_up")
    with pytest.raises(ValueError, match=r"gate_up: mxfp4 values/scales must be \['uint8', 'uint8'\]"):
        qz.check(qz.QuantizedWeight(w.values, w.scales.astype(jnp.float32), "mxfp4"), "gate_up")
    with pytest.raises(ValueError, match="unknown quantized format 'nf4'"):
        qz.check(qz.QuantizedWeight(w.values, w.scales, "nf4"), "gate_up")
    nan = w.scales.at[1, 7, 0].set(qz.E8M0_NAN)
    with pytest.raises(ValueError, match=r"gate_up: 1 invalid mxfp4 scale\(s\), the first at \(1, 7, 0\)"):
        qz.check_scales(qz.QuantizedWeight(w.values, nan, "mxfp4"), "gate_up")
    fp8 = qz.QuantizedWeight(jnp.zeros((256, 256), jnp.float8_e4m3fn), jnp.asarray([[1.0, np.inf], [1, 1]]), "fp8_block")
    with pytest.raises(ValueError, match=r"o_proj: 1 invalid fp8_block scale\(s\), the first at \(0, 1\)"):
        qz.check_scales(fp8, "o_proj")


def test_activation_groups_of_128_saturate_instead_of_nan():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(5, 300)) * np.array([1, 100, 1e4, 1e-3, 0])[:, None], jnp.float32)
    values, scale = qz.quantize_activations_fp8(x)
    assert values.dtype == jnp.float8_e4m3fn and scale.shape == (5, 3)
    back = np.asarray(qz.dequantize_activations_fp8(values, scale))
    assert np.isfinite(back).all()
    # e4m3 keeps 3 mantissa bits: within 1/16 of each group's largest magnitude.
    err = np.abs(back - np.asarray(x)).reshape(5, -1)
    assert (err <= np.abs(np.asarray(x)).max(axis=1, keepdims=True) / 16 + 1e-6).all()
