"""SpeculativeConfig: `LLM(speculative_config={...})` in vLLM's names, validated on construction."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

METHODS = ("ngram", "draft_model", "mtp", "synthetic")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """How drafts are proposed. `model` (a preset, .gguf, HF or orbax dir, or a LoadedModel) means
    method "draft_model".

    "synthetic" (benchmarks only, NOT lossless): every verify step accepts `acceptance_length - 1`
    drafts on average whatever the model says, as InferenceX's fixed-acceptance runs.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: object = None  # str | models.LoadedModel
    acceptance_length: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config: unknown method {self.method!r}; methods: {list(METHODS)}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 32:
            raise ValueError(f"speculative_config: num_speculative_tokens must be an int in [1, 32], got {k!r}")
        if self.method == "ngram" and not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError("speculative_config: a draft model needs \"model\" (and only it takes one)")
        if self.method == "synthetic":
            a = self.acceptance_length
            if not isinstance(a, (int, float)) or not 1 <= a <= k + 1:
                raise ValueError(f"speculative_config: synthetic needs acceptance_length in [1, {k + 1}], got {a!r}")

    @classmethod
    def from_dict(cls, spec: Mapping | None) -> "SpeculativeConfig | None":
        """vLLM's dict (None: no speculation); a "model" without a method is a draft model."""
        if spec is None:
            return None
        if not isinstance(spec, Mapping):
            raise ValueError(f"speculative_config must be a dict or None, got {type(spec).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(spec) - fields
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {sorted(unknown)}; keys: {sorted(fields)}")
        spec = dict(spec)
        if "num_speculative_tokens" not in spec:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        spec.setdefault("method", "draft_model" if spec.get("model") is not None else None)
        if spec["method"] is None:
            raise ValueError("speculative_config: give a \"method\" (ngram, mtp, synthetic) or a draft \"model\"")
        return cls(**spec)
