"""Quantized HF checkpoints (`quantization_config`), served packed or dequantized at load.

Two formats, each under the tensor names of the bf16 checkpoint plus its scales:

  mxfp4 (gpt-oss experts): `X_blocks` uint8 [..., N, K/32, 16], two e2m1 fp4 values per byte (low
      nibble first), and `X_scales` uint8 [..., N, K/32], an e8m0 power of two 2**(s - 127) per 32
      values. The dense X is [..., K, N].
  fp8 (DeepSeek-V3/R1, Qwen3 FP8): `X.weight` float8 e4m3 [N, K] and `X.weight_scale_inv` float32
      [ceil(N/128), ceil(K/128)], one scale per 128 x 128 block (`weight_block_size`).

`weights=` of load_model picks how: "native" (the default) keeps them packed, a pallas_kernels
QuantizedWeight per weight (`packed_getter`); a dtype name dequantizes them at load, rounded to that
dtype (`tensor_getter`; the path before native serving, kept for comparison). The layout helpers
(`to_in_out`, `concat_out`, `take_out`, `stack`) let the architectures' loaders place a dense HF
tensor and a packed one alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from models.loading.hf_safetensors import SafetensorsCheckpoint
from models.loading.weights import TensorGetter
from pallas_kernels import quantized as qz
from pallas_kernels.quantized import FP4_E2M1_VALUES, QuantizedWeight

QUANT_METHODS = {"mxfp4": "mxfp4", "fp8": "fp8_block"}  # quant_method -> the packed format
NATIVE = "native"
_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f16": "float16", "float16": "float16",
                "f32": "float32", "fp32": "float32", "float32": "float32"}
HFWeight = np.ndarray | QuantizedWeight  # a tensor as an architecture's loader receives it


def dequantized_dtype(weights: str) -> np.dtype | None:
    """None for weights="native"; for a dtype name, the dtype quantized tensors are rounded to when
    dequantized at load. A ValueError names any other value."""
    if weights == NATIVE:
        return None
    if weights not in _DTYPE_NAMES:
        raise ValueError(f"weights={weights!r}: expected {NATIVE!r} (serve a quantized checkpoint packed, as it "
                         f"ships) or a dtype to dequantize it to at load ({', '.join(_DTYPE_NAMES)})")
    return jnp.dtype(_DTYPE_NAMES[weights])


def checkpoint_format(quantization_config: dict[str, Any] | None) -> str | None:
    """The packed format (ModelConfig.quantization) of a config.json's quantization_config; a
    ValueError names an unknown quant_method or fp8 fmt."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quant_method {method!r} in quantization_config "
                         f"(supported: {', '.join(QUANT_METHODS)})")
    fmt = quantization_config.get("fmt", "e4m3")
    if method == "fp8" and fmt != "e4m3":
        raise ValueError(f"unsupported fp8 format {fmt!r} in quantization_config (supported: e4m3)")
    return QUANT_METHODS[method]


def _fp8_block(quantization_config: dict[str, Any]) -> tuple[int, int]:
    return tuple(quantization_config.get("weight_block_size") or (qz.FP8_BLOCK, qz.FP8_BLOCK))


# ---- dequantized at load (weights=<dtype>) -----------------------------------------------------


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


def tensor_getter(ckpt: SafetensorsCheckpoint, quantization_config: dict[str, Any] | None,
                  round_to: np.dtype | None = None) -> TensorGetter:
    """Dense tensors under their bf16 names: quantized ones dequantized in float32, rounded to
    `round_to` when given (weights=<dtype>); unquantized checkpoints give lazy memory-mapped arrays
    in their stored dtype."""
    fmt = checkpoint_format(quantization_config)
    if fmt is None:
        return ckpt.get_raw
    round_to = np.dtype(np.float32) if round_to is None else round_to
    if fmt == "mxfp4":
        return lambda name: _mxfp4_tensor(ckpt, name, round_to)
    block = _fp8_block(quantization_config)
    return lambda name: _fp8_tensor(ckpt, name, block, round_to)


def _mxfp4_tensor(ckpt: SafetensorsCheckpoint, name: str, round_to: np.dtype) -> np.ndarray:
    if name in ckpt.weight_map or f"{name}_blocks" not in ckpt.weight_map:
        return ckpt.get_tensor(name)  # KeyError when neither form is there
    values = dequantize_mxfp4(ckpt.get_raw(f"{name}_blocks"), ckpt.get_raw(f"{name}_scales"))
    return np.swapaxes(values, -1, -2).astype(round_to, copy=False)


def _fp8_tensor(ckpt: SafetensorsCheckpoint, name: str, block: tuple[int, int], round_to: np.dtype) -> np.ndarray:
    scale_name = f"{name}_scale_inv"
    if not name.endswith(".weight") or scale_name not in ckpt.weight_map:
        return ckpt.get_tensor(name)
    return dequantize_fp8_blocks(ckpt.get_tensor(name), ckpt.get_tensor(scale_name), block).astype(round_to, copy=False)


# ---- packed (weights="native") -----------------------------------------------------------------


def packed_getter(ckpt: SafetensorsCheckpoint, quantization_config: dict[str, Any]) -> Callable[[str], QuantizedWeight]:
    """Packed weights under their bf16 names (`...experts.gate_up_proj`, `...q_a_proj.weight`) as
    QuantizedWeights of memory-mapped arrays, checked (shapes, dtypes, NaN scales) naming the tensors.
    A ValueError names a weight_block_size the packed format does not serve."""
    if checkpoint_format(quantization_config) == "mxfp4":
        return lambda name: _mxfp4_packed(ckpt, name)
    block = _fp8_block(quantization_config)
    if block != (qz.FP8_BLOCK, qz.FP8_BLOCK):
        raise ValueError(f"quantization_config weight_block_size {list(block)}: weights='native' serves "
                         f"{qz.FP8_BLOCK} x {qz.FP8_BLOCK} blocks (as DeepSeek-V3/R1 and Qwen3 FP8 ship); load with "
                         f"weights='bfloat16' (or another dtype) to dequantize at load")
    return lambda name: _checked(QuantizedWeight(ckpt.get_raw(name), ckpt.get_raw(f"{name}_scale_inv"), "fp8_block"),
                                 f"{name}/_scale_inv")


def _mxfp4_packed(ckpt: SafetensorsCheckpoint, name: str) -> QuantizedWeight:
    blocks, scales = ckpt.get_raw(f"{name}_blocks"), ckpt.get_raw(f"{name}_scales")
    label = f"{name}_blocks/_scales"
    if blocks.ndim < 3 or blocks.shape[-1] != qz.MXFP4_BLOCK // 2:
        raise ValueError(f"{label}: mxfp4 blocks have shape {blocks.shape}, expected [..., N, K/32, 16] "
                         f"({qz.MXFP4_BLOCK} values in 16 bytes per block)")
    return _checked(QuantizedWeight(blocks.reshape(*blocks.shape[:-2], -1), scales, "mxfp4"), label)


def _checked(w: QuantizedWeight, label: str) -> QuantizedWeight:
    qz.check(w, label)
    qz.check_scales(w, label)
    return w


# ---- layout helpers: dense HF tensors and packed weights alike ---------------------------------


def to_in_out(t: HFWeight) -> HFWeight:
    """An HF [..., out, in] tensor in our [..., in, out] order: a transpose for a dense one; a packed
    weight keeps the shipped K-major storage, which already is the [..., in, out] weight."""
    return t if isinstance(t, QuantizedWeight) else np.swapaxes(t, -1, -2)


def concat_out(parts: list[HFWeight], name: str) -> HFWeight:
    """[..., in, out] weights side by side along out (experts' [gate | up]); packed ones along their
    stored rows, which must end on a scale block (exact: each row keeps its scales)."""
    if not isinstance(parts[0], QuantizedWeight):
        return np.concatenate(parts, axis=-1)
    rows = qz.scale_block(parts[0].fmt)[0]
    if any(p.shape[-1] % rows for p in parts[:-1]):
        raise ValueError(f"{name}: {parts[0].fmt} weights of {parts[0].shape[-1]} output rows cannot be fused side "
                         f"by side: the rows would share a {rows}-row scale block (load with weights='bfloat16' to "
                         f"dequantize at load)")
    return _packed(parts, lambda xs: np.concatenate(xs, axis=-2))


def take_out(t: HFWeight, order: np.ndarray, name: str) -> HFWeight:
    """t[..., order] along out; for a packed weight its rows, exact when each row has its own scales
    (mxfp4; a ValueError for fp8's 128-row blocks)."""
    if not isinstance(t, QuantizedWeight):
        return t[..., order]
    if qz.scale_block(t.fmt)[0] != 1:
        raise ValueError(f"{name}: cannot reorder the rows of a {t.fmt} weight (they share scale blocks)")
    return QuantizedWeight(t.values[..., order, :], t.scales[..., order, :], t.fmt)


def stack(parts: list[HFWeight]) -> HFWeight:
    """Per-expert weights stacked along a new leading axis."""
    return _packed(parts, np.stack) if isinstance(parts[0], QuantizedWeight) else np.stack(parts)


def _packed(parts: list[QuantizedWeight], join: Callable[[list[np.ndarray]], np.ndarray]) -> QuantizedWeight:
    return QuantizedWeight(join([p.values for p in parts]), join([p.scales for p in parts]), parts[0].fmt)
