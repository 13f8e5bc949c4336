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


ARCHITECTURE_NAMES = ("llama", "gpt_oss", "deepseek_v3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; validated on construction so a bad config fails early."""

    name: str
    architecture: str  # one of ARCHITECTURE_NAMES
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
    attention_bias: bool = False  # q/k/v/o projection biases
    # gpt-oss attention: learned per-head sinks; layer_types[i] is "sliding_attention" or
    # "full_attention" (empty: all full); sliding layers see the last `sliding_window` keys.
    attention_sinks: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    # Mixture of experts (num_experts 0: dense). Layers before first_k_dense are dense MLPs.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    first_k_dense: int = 0
    router: str = "softmax_topk"  # or "sigmoid_grouped" (DeepSeek-V3)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    expert_activation: str = "swiglu"  # or "gpt_oss_swiglu" (clamped, (up + 1) * glu)
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    # Multi-head latent attention (DeepSeek; kv_lora_rank 0: not MLA). q_lora_rank 0: plain q_proj.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    num_mtp_layers: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURE_NAMES:
            raise ValueError(f"unsupported architecture {self.architecture!r} "
                             f"(known: {', '.join(ARCHITECTURE_NAMES)})")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        self._check_attention_variants()
        self._check_moe()
        self._check_mla()

    def _check_attention_variants(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))  # JSON gives a list; keep it hashable
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        unknown = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"unknown layer types {sorted(unknown)} (known: sliding_attention, full_attention)")
        if "sliding_attention" in self.layer_types and (self.sliding_window or 0) < 1:
            raise ValueError(f"sliding_attention layers need sliding_window >= 1, got {self.sliding_window}")

    def _check_moe(self) -> None:
        if not self.num_experts:
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts="
                             f"{self.num_experts}")
        if self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")
        if self.router not in ("softmax_topk", "sigmoid_grouped"):
            raise ValueError(f"unknown router {self.router!r} (known: softmax_topk, sigmoid_grouped)")
        if self.expert_activation not in ("swiglu", "gpt_oss_swiglu"):
            raise ValueError(f"unknown expert_activation {self.expert_activation!r} (known: swiglu, gpt_oss_swiglu)")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"need n_group | num_experts and 1 <= topk_group <= n_group; got num_experts="
                             f"{self.num_experts}, n_group={self.n_group}, topk_group={self.topk_group}")
        if self.router == "sigmoid_grouped" and self.num_experts // self.n_group < 2:
            raise ValueError("sigmoid_grouped routing scores groups by their two best experts: "
                             f"need num_experts / n_group >= 2, got {self.num_experts}/{self.n_group}")
        if self.router == "sigmoid_grouped" and self.num_experts_per_tok > self.topk_group * (
                self.num_experts // self.n_group):
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts of "
                             f"{self.topk_group} selected groups")

    def _check_mla(self) -> None:
        if not self.kv_lora_rank:
            return
        for field in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"MLA needs {field} >= 1, got {getattr(self, field)}")
        if self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
            raise ValueError(f"MLA head_dim={self.head_dim} must equal qk_nope_head_dim + qk_rope_head_dim")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")

    def layer_sliding_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: full attention)."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.first_k_dense

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied; MTP modules not counted)."""
        d = self.hidden_size
        mlps = sum(self._mlp_params(i) for i in range(self.num_layers))
        per_layer = self._attention_params() + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + mlps + embed + d

    def _attention_params(self) -> int:
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        if self.kv_lora_rank:
            q = (d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * hd) if self.q_lora_rank else d * h * hd
            kv_a = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv_b = self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv_a + kv_b + h * self.v_head_dim * d
        bias = (hd * (h + 2 * kv) + d) if self.attention_bias else 0
        return d * hd * (2 * h + 2 * kv) + bias + (h if self.attention_sinks else 0)

    def _mlp_params(self, layer: int) -> int:
        d = self.hidden_size
        if not self.is_moe_layer(layer):
            return 3 * d * self.intermediate_size
        i, e = self.moe_intermediate_size, self.num_experts
        biased = self.expert_activation == "gpt_oss_swiglu"
        experts = e * (3 * d * i + (2 * i + d if biased else 0))
        router = d * e + e  # weight + bias (gpt-oss) or correction bias (DeepSeek)
        return experts + router + 3 * d * i * self.num_shared_experts

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes one token occupies in the cache over all layers (MLA: the compressed latent)."""
        if self.kv_lora_rank:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def full_kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes per token of uncompressed K and V (for MLA: K 192 + V 128 values per head)."""
        if self.kv_lora_rank:
            return self.num_layers * self.num_heads * (self.head_dim + self.v_head_dim) * dtype_bytes
        return self.kv_bytes_per_token(dtype_bytes)


def _llama3_scaling(factor: float, original: int) -> RopeScaling:
    return RopeScaling(kind="llama3", factor=factor, original_max_position_embeddings=original)


def _gpt_oss(name: str, num_layers: int, num_experts: int, **sizes: Any) -> ModelConfig:
    """gpt-oss: GQA with biases and sinks, sliding window on even layers, YaRN, MoE top-4."""
    defaults: dict[str, Any] = dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, moe_intermediate_size=2880,
        num_heads=64, num_kv_heads=8, head_dim=64, max_position_embeddings=131072, sliding_window=128,
        num_experts_per_tok=4, rope_theta=150000.0,
        rope_scaling=RopeScaling(kind="yarn", factor=32.0, original_max_position_embeddings=4096,
                                 truncate=False))
    defaults.update(sizes)
    return ModelConfig(
        name=name, architecture="gpt_oss", num_layers=num_layers, num_experts=num_experts,
        rms_norm_eps=1e-5, attention_bias=True, attention_sinks=True, expert_activation="gpt_oss_swiglu",
        layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)),
        **defaults)


def _deepseek_v3(name: str, **sizes: Any) -> ModelConfig:
    """DeepSeek-V3: MLA with a 512 + 64 latent, YaRN with mscale, sigmoid group-limited routing."""
    defaults: dict[str, Any] = dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_layers=61, num_heads=128, num_kv_heads=128, head_dim=192, max_position_embeddings=163840,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        num_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, num_shared_experts=1,
        first_k_dense=3, routed_scaling_factor=2.5, num_mtp_layers=1,
        rope_scaling=RopeScaling(kind="yarn", factor=40.0, original_max_position_embeddings=4096,
                                 mscale=1.0, mscale_all_dim=1.0))
    defaults.update(sizes)
    return ModelConfig(name=name, architecture="deepseek_v3", rms_norm_eps=1e-6, rope_theta=10000.0,
                       router="sigmoid_grouped", rope_interleave=True, **defaults)


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
        _gpt_oss("gpt-oss-20b", num_layers=24, num_experts=32),
        _gpt_oss("gpt-oss-120b", num_layers=36, num_experts=128),
        _gpt_oss("tiny-gpt-oss", num_layers=2, num_experts=4, vocab_size=256, hidden_size=64,
                 intermediate_size=32, moe_intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=16,
                 max_position_embeddings=128, sliding_window=8, num_experts_per_tok=2,
                 rope_scaling=RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=32,
                                          truncate=False)),
        _deepseek_v3("deepseek-v3"),
        _deepseek_v3("tiny-deepseek-v3", vocab_size=256, hidden_size=64, intermediate_size=128,
                     moe_intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=24,
                     max_position_embeddings=128, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                     qk_rope_head_dim=8, v_head_dim=16, num_experts=8, num_experts_per_tok=2, n_group=4,
                     topk_group=2, first_k_dense=1,
                     rope_scaling=RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=32,
                                              mscale=1.0, mscale_all_dim=1.0)),
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
