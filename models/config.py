"""Model configuration: the fields every decoder has, plus optional sub-configs (MoE, MLA, MTP).

Presets live with their architecture (models/registry.py finds them)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pallas_kernels.quantized import FORMATS

# The layers a checkpoint of each packed format quantizes: "experts" (routed MoE experts) and
# "linear" (every projection of a block but MLA's kv_b_proj; never the embedding, LM head, router
# or MTP's eh_proj). gpt-oss ships only its experts in MXFP4 (everything else bf16); DeepSeek-V3/R1
# and Qwen3 FP8 checkpoints ship every block projection in 128 x 128 block FP8.
QUANTIZED_LAYERS = {"mxfp4": ("experts",), "fp8_block": ("experts", "linear")}


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
class MoEConfig:
    """Mixture of experts: which layers route, to how many experts, by which rule.

    router: "softmax_topk" (gpt-oss, Qwen3-MoE: softmax over the experts' logits, top-k; with
    norm_topk_prob the k weights are renormalized) or "sigmoid_grouped" (DeepSeek-V3: sigmoid
    scores + a correction bias, top `topk_group` of `n_group` groups, then top-k, times
    routed_scaling_factor). activation: "swiglu" or "gpt_oss_swiglu" (clamped, (up + 1) * glu,
    biased experts).
    """

    num_experts: int
    num_experts_per_tok: int
    intermediate_size: int
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead of experts
    num_shared_experts: int = 0
    router: str = "softmax_topk"
    router_bias: bool = False
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    activation: str = "swiglu"
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))  # JSON gives a list
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts="
                             f"{self.num_experts}")
        if self.intermediate_size < 1:
            raise ValueError(f"moe intermediate_size must be >= 1, got {self.intermediate_size}")
        if self.router not in ("softmax_topk", "sigmoid_grouped"):
            raise ValueError(f"unknown router {self.router!r} (known: softmax_topk, sigmoid_grouped)")
        if self.activation not in ("swiglu", "gpt_oss_swiglu"):
            raise ValueError(f"unknown expert activation {self.activation!r} (known: swiglu, gpt_oss_swiglu)")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"need n_group | num_experts and 1 <= topk_group <= n_group; got num_experts="
                             f"{self.num_experts}, n_group={self.n_group}, topk_group={self.topk_group}")
        if self.router == "sigmoid_grouped":
            self._check_grouped()

    def _check_grouped(self) -> None:
        per_group = self.num_experts // self.n_group
        if per_group < 2:
            raise ValueError("sigmoid_grouped routing scores groups by their two best experts: "
                             f"need num_experts / n_group >= 2, got {self.num_experts}/{self.n_group}")
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts of "
                             f"{self.topk_group} selected groups")


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek): keys and values compressed into a latent of
    kv_lora_rank values plus one shared rotary key of qk_rope_head_dim. q_lora_rank 0: plain q_proj."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int = 0
    rope_interleave: bool = False

    def __post_init__(self) -> None:
        for field in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"MLA needs {field} >= 1, got {getattr(self, field)}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction modules (DeepSeek-V3), stored after the decoder layers."""

    num_layers: int

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"MTP needs num_layers >= 1 (use mtp=None for none), got {self.num_layers}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; validated on construction so a bad config fails early.

    The fields every decoder has are flat; optional parts are sub-configs (None: absent).
    `architecture` names a record in models/registry.py.
    """

    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # of queries and keys (MLA: qk_nope_head_dim + qk_rope_head_dim)
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v/o projection biases
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (Qwen3)
    # gpt-oss attention: learned per-head sinks; layer_types[i] is "sliding_attention" or
    # "full_attention" (empty: all full); sliding layers see the last `sliding_window` keys.
    attention_sinks: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None
    mtp: MTPConfig | None = None
    # The checkpoint's packed format (pallas_kernels/quantized.py FORMATS): those layers are held
    # packed (QUANTIZED_LAYERS); None: every weight dense in the model dtype.
    quantization: str | None = None

    def __post_init__(self) -> None:
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
        if self.quantization is not None and self.quantization not in FORMATS:
            raise ValueError(f"unknown quantization {self.quantization!r} (known: {', '.join(FORMATS)})")
        if self.mla is not None and self.head_dim != self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim:
            raise ValueError(f"MLA head_dim={self.head_dim} must equal qk_nope_head_dim + qk_rope_head_dim")
        if self.moe is not None and any(not 0 <= i < self.num_layers for i in self.moe.dense_layers):
            raise ValueError(f"moe.dense_layers {self.moe.dense_layers} name layers outside 0..{self.num_layers - 1}")

    def _check_attention_variants(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))  # JSON gives a list; keep it hashable
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        unknown = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"unknown layer types {sorted(unknown)} (known: sliding_attention, full_attention)")
        if "sliding_attention" in self.layer_types and (self.sliding_window or 0) < 1:
            raise ValueError(f"sliding_attention layers need sliding_window >= 1, got {self.sliding_window}")

    def layer_sliding_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: full attention)."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def packed_format(self, layer_kind: str) -> str | None:
        """The format layers of this kind ("experts" or "linear") are held packed in; None: dense."""
        return self.quantization if layer_kind in QUANTIZED_LAYERS.get(self.quantization, ()) else None

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer not in self.moe.dense_layers

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Inverse of dataclasses.asdict (orbax checkpoints store the config as JSON)."""
        subs = {"rope_scaling": RopeScaling, "moe": MoEConfig, "mla": MLAConfig, "mtp": MTPConfig}
        parts = {k: (None if raw.get(k) is None else sub(**raw[k])) for k, sub in subs.items()}
        return cls(**{**raw, **parts})


def llama3_scaling(factor: float, original: int) -> RopeScaling:
    return RopeScaling(kind="llama3", factor=factor, original_max_position_embeddings=original)


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
