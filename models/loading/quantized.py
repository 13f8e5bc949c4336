"""Quantized checkpoint formats, dequantized to float32 at load (native low-precision compute is
a later step). Each format is served under the tensor names and layouts of the bf16 checkpoint:

  mxfp4 (gpt-oss experts): `X_blocks` uint8 [..., N, K/32, 16], two e2m1 fp4 values per byte (low
      nibble first), and `X_scales` uint8 [..., N, K/32], an e8m0 power of two 2**(s - 127) per 32
      values. The dequantized [..., N, K] is transposed to the bf16 tensor X [..., K, N].
  fp8 (DeepSeek-V3): `X.weight` float8 e4m3 [N, K] and `X.weight_scale_inv` float32
      [ceil(N/128), ceil(K/128)], one scale per 128 x 128 block (`weight_block_size`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.loading.hf_safetensors import SafetensorsCheckpoint
from models.loading.weights import TensorGetter

FP4_E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
QUANT_METHODS = ("mxfp4", "fp8")


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [..., G, B] and e8m0 scales uint8 [..., G] -> float32 [..., G * 2B]."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"mxfp4 blocks {blocks.shape} do not match scales {scales.shape}")
    blocks = blocks.astype(np.uint8)
    values = np.empty((*blocks.shape[:-1], 2 * blocks.shape[-1]), np.float32)
    values[..., 0::2] = FP4_E2M1_VALUES[blocks & 0x0F]
    values[..., 1::2] = FP4_E2M1_VALUES[blocks >> 4]
    exponents = scales.astype(np.int32) - 127
    values = np.ldexp(values, exponents[..., None])
    return values.reshape(*blocks.shape[:-2], -1)


def dequantize_fp8_blocks(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """fp8 weight [..., N, K] times its per-block scale [..., ceil(N/bn), ceil(K/bk)] -> float32."""
    n, k = weight.shape[-2:]
    bn, bk = block
    want = (-(-n // bn), -(-k // bk))
    if tuple(scale_inv.shape[-2:]) != want:
        raise ValueError(f"weight_scale_inv has shape {scale_inv.shape} but a {weight.shape} weight in "
                         f"{bn}x{bk} blocks needs {want}")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), bn, axis=-2), bk, axis=-1)[..., :n, :k]
    return weight.astype(np.float32) * scale


def tensor_getter(ckpt: SafetensorsCheckpoint, quantization_config: dict[str, Any] | None) -> TensorGetter:
    """A getter serving tensors under their bf16 names, dequantizing (to float32) per the checkpoint's
    quant_method. Unquantized checkpoints get lazy memory-mapped arrays in their stored dtype."""
    if not quantization_config:
        return ckpt.get_raw
    method = quantization_config.get("quant_method")
    if method == "mxfp4":
        return lambda name: _mxfp4_tensor(ckpt, name)
    if method == "fp8":
        fmt = quantization_config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"unsupported fp8 format {fmt!r} (supported: e4m3)")
        block = tuple(quantization_config.get("weight_block_size") or (128, 128))
        return lambda name: _fp8_tensor(ckpt, name, block)
    raise ValueError(f"unknown quant_method {method!r} in quantization_config (supported: {', '.join(QUANT_METHODS)})")


def _mxfp4_tensor(ckpt: SafetensorsCheckpoint, name: str) -> np.ndarray:
    if name in ckpt.weight_map or f"{name}_blocks" not in ckpt.weight_map:
        return ckpt.get_tensor(name)  # KeyError when neither form is there
    values = dequantize_mxfp4(ckpt.get_raw(f"{name}_blocks"), ckpt.get_raw(f"{name}_scales"))
    return np.swapaxes(values, -1, -2)


def _fp8_tensor(ckpt: SafetensorsCheckpoint, name: str, block: tuple[int, int]) -> np.ndarray:
    scale_name = f"{name}_scale_inv"
    if not name.endswith(".weight") or scale_name not in ckpt.weight_map:
        return ckpt.get_tensor(name)
    return dequantize_fp8_blocks(ckpt.get_tensor(name), ckpt.get_tensor(scale_name), block)
