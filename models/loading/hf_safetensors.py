"""Hugging Face checkpoint directories: safetensors read tensor by tensor (config.json: hf_config.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open


# safetensors dtype -> numpy dtype (ml_dtypes for those numpy lacks: bf16, fp8, e8m0).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
           "F8_E8M0": ml_dtypes.float8_e8m0fnu, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def eos_ids_from_hf(directory: Path, hf: dict[str, Any]) -> list[int]:
    """EOS ids, preferring generation_config.json (it lists every stop id of chat models)."""
    gen_path = directory / "generation_config.json"
    eos = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.exists() else None
    eos = hf.get("eos_token_id") if eos is None else eos
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


class SafetensorsCheckpoint:
    """Tensors of a single-file or sharded (`model.safetensors.index.json`) checkpoint, read lazily."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").exists():
            weight_map = {n: "model.safetensors" for n in self._names(directory / "model.safetensors")}
        else:
            raise ValueError(f"{directory} has config.json but no model.safetensors or model.safetensors.index.json")
        self.directory = directory
        self.weight_map: dict[str, str] = weight_map

    @staticmethod
    def _names(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="numpy") as f:
                return list(f.keys())
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e

    def get_tensor(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy (bf16 and fp8 go through ml_dtypes); KeyError if absent."""
        return np.asarray(self.get_raw(name), dtype=np.float32)

    def get_raw(self, name: str) -> np.ndarray:
        """One tensor in its stored dtype (uint8 for packed fp4 / e8m0 scales), memory-mapped: only
        the parts used are read; KeyError if absent."""
        path = self.directory / self.weight_map[name]
        try:
            return _read_tensor(path, name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from {path} (truncated or corrupt?): {e}") from e


def _read_tensor(path: Path, name: str) -> np.ndarray:
    """Memory-map one tensor straight from the file layout (8-byte header size, JSON header, data).

    Nothing is read until the array is used, and then only the bytes used: a sharded load reads
    just each shard's slice. (safetensors' numpy reader cannot produce bf16 or fp8 arrays.)
    """
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_size))[name]
    if info["dtype"] not in _DTYPES:
        raise ValueError(f"unsupported safetensors dtype {info['dtype']}")
    dtype, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"])
    start, end = info["data_offsets"]
    if end - start != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"header gives {end - start} bytes for shape {shape} of {info['dtype']}")
    if end == start:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + header_size + start, shape=shape)
