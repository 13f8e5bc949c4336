"""Model configuration: one frozen dataclass for every architecture, plus named presets."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (Hugging Face's `rope_scaling` / `rope_parameters`).

    kind: "llama3" (Llama 3.1 wavelength-dependent scaling) or "yarn" (NTK-by-parts + mscale).
    """

    kind: str
    factor: float
    original_max_position_embeddings: int
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 1.0  # yarn (DeepSeek)
    mscale_all_dim: float = 0.0  # yarn (DeepSeek)
    attention_factor: float | None = None  # yarn: overrides the mscale-derived factor
    truncate: bool = True  # yarn: round the correction range to whole dims (gpt-oss: False)

    def __post_init__(self) -> None:
        if self.kind not in ("llama3", "yarn"):
            raise ValueError(f"unsupported rope scaling type {self.kind!r} (known: llama3, yarn)")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; validated on construction so a bad config fails early."""

    name: str
    architecture: str  # "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    def __post_init__(self) -> None:
        if self.architecture != "llama":
            raise ValueError(f"unsupported architecture {self.architecture!r} (known: llama)")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * hd * (2 * h + 2 * kv) + (hd * (h + 2 * kv) if self.attention_bias else 0)
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies in the cache, over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def _llama3_scaling(factor: float, original: int) -> RopeScaling:
    return RopeScaling(kind="llama3", factor=factor, original_max_position_embeddings=original)


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        ModelConfig(name="smollm2-135m-instruct", architecture="llama", vocab_size=49152,
                    hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
        ModelConfig(name="llama3-8b", architecture="llama", vocab_size=128256, hidden_size=4096,
                    intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                    head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
                    rope_scaling=_llama3_scaling(8.0, 8192)),
        ModelConfig(name="llama3.3-70b", architecture="llama", vocab_size=128256,
                    hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                    num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
                    rope_theta=500000.0, rope_scaling=_llama3_scaling(8.0, 8192)),
        ModelConfig(name="tiny-llama", architecture="llama", vocab_size=256, hidden_size=64,
                    intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
                    rope_scaling=_llama3_scaling(8.0, 32)),
    )
}


def get_preset(name: str) -> ModelConfig:
    """Look up a preset by name; the error lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def rope_scaling_from_hf(hf: dict[str, Any] | None, max_position_embeddings: int) -> RopeScaling | None:
    """Parse HF `rope_scaling` (v4) / `rope_parameters` (v5) into a RopeScaling (None = default)."""
    if not hf:
        return None
    kind = hf.get("rope_type", hf.get("type", "default"))
    if kind == "default":
        return None
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"kind"}
    kwargs = {k: v for k, v in hf.items() if k in fields and v is not None}
    kwargs.setdefault("original_max_position_embeddings", max_position_embeddings)
    return RopeScaling(kind=kind, **kwargs)
