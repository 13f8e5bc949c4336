"""Accuracy of serving a quantized checkpoint natively (packed weights: W4A16 for MXFP4, W8A8 for
block FP8) against dequantizing it at load (the same weights dense, activations unquantized):
logit differences and greedy (argmax) agreement at every position of fixed prompts."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from models import load_model

NUMERICS = {"mxfp4": "W4A16", "fp8_block": "W8A8"}


def prompts(vocab_size: int, count: int = 8, length: int = 32, seed: int = 0) -> np.ndarray:
    """Fixed random token ids [count, length] (the fixtures have no tokenizer)."""
    return np.random.default_rng(seed).integers(0, vocab_size, (count, length))


def state_bytes(model: nnx.Module) -> int:
    """Bytes of a model's parameters as they are held (packed weights at their packed size)."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def compare(path: Path, dtype: str, token_ids: np.ndarray | None = None) -> dict:
    """Native vs dequantized-at-load logits of the checkpoint at `path`, both in `dtype`."""
    native = load_model(path, dtype=dtype)
    dense = load_model(path, dtype=dtype, weights=dtype)
    token_ids = prompts(native.config.vocab_size) if token_ids is None else token_ids
    got, want = np.asarray(native.forward(token_ids)), np.asarray(dense.forward(token_ids))
    delta = np.abs(got - want)
    return {"checkpoint": path.name, "format": native.config.quantization,
            "numerics": NUMERICS[native.config.quantization], "dtype": dtype, "prompts": list(token_ids.shape),
            "max_abs_dlogit": float(delta.max()), "mean_abs_dlogit": float(delta.mean()),
            "logit_std": float(want.std()), "greedy_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
            "native_param_bytes": state_bytes(native.model), "dequantized_param_bytes": state_bytes(dense.model)}
