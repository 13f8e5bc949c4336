"""An HF `config.json` as read by the architectures' `hf_fields`: a missing or unsupported field
is a ValueError naming the field and the file, never a KeyError from deep inside a loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.config import rope_scaling_from_hf

_MISSING = object()


class HFConfig:
    """The fields of one config.json (transformers v4 or v5 spelling), with errors naming `path`."""

    def __init__(self, raw: dict[str, Any], path: str | Path):
        self.raw, self.path = raw, str(path)

    @classmethod
    def read(cls, directory: Path) -> "HFConfig":
        path = directory / "config.json"
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path} holds {type(raw).__name__}, not a JSON object")
        return cls(raw, path)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The field's value (None counts as absent); without a default a missing field raises."""
        value = self.raw.get(key)
        if value is not None:
            return value
        if default is _MISSING:
            raise self.error(key, "is missing")
        return default

    def int(self, key: str, default: Any = _MISSING) -> int:
        return self._typed(key, default, int)

    def float(self, key: str, default: Any = _MISSING) -> float:
        return float(self._typed(key, default, (int, float)))

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        return self._typed(key, default, bool)

    def _typed(self, key: str, default: Any, kind: type | tuple[type, ...]) -> Any:
        value = self.get(key, default)
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise self.error(key, f"is {value!r}, expected {getattr(kind, '__name__', 'a number')}")
        return value

    def require(self, key: str, allowed: tuple[Any, ...], default: Any = _MISSING) -> Any:
        """The field's value, which must be one of `allowed` (what this engine implements)."""
        value = self.get(key, default)
        if value not in allowed:
            raise self.error(key, f"is {value!r}; supported: {', '.join(map(repr, allowed))}")
        return value

    def error(self, key: str, problem: str) -> ValueError:
        return ValueError(f"{self.path}: field {key!r} {problem}")

    @property
    def rope(self) -> dict[str, Any]:
        """v5 `rope_parameters` (rope_theta inside) or v4 `rope_scaling` (+ top-level rope_theta)."""
        rope = self.get("rope_parameters", None) or self.get("rope_scaling", None) or {}
        if not isinstance(rope, dict):
            raise self.error("rope_parameters", f"is {rope!r}, expected an object")
        return rope


def common_fields(hf: HFConfig, name: str) -> dict[str, Any]:
    """The ModelConfig fields every decoder's config.json spells the same way."""
    heads, ctx = hf.int("num_attention_heads"), hf.int("max_position_embeddings")
    rope = hf.rope
    return dict(
        name=name, vocab_size=hf.int("vocab_size"), hidden_size=hf.int("hidden_size"),
        intermediate_size=hf.int("intermediate_size"), num_layers=hf.int("num_hidden_layers"),
        num_heads=heads, num_kv_heads=hf.int("num_key_value_heads", heads),
        head_dim=hf.int("head_dim", hf.int("hidden_size") // heads), max_position_embeddings=ctx,
        rms_norm_eps=hf.float("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta") or hf.float("rope_theta", 10000.0)),
        rope_scaling=rope_scaling_from_hf(rope, ctx),
        tie_word_embeddings=hf.bool("tie_word_embeddings", False),
        attention_bias=hf.bool("attention_bias", False))
