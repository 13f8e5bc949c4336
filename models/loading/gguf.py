"""GGUF (llama.cpp) checkpoints: metadata -> ModelConfig, dequantized tensors under HF names, tokenizer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from models.config import ModelConfig, RopeScaling

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_SUPPORTED_ARCHITECTURES = ("llama",)


def hf_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> Hugging Face name (None for tensors we do not use)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rope pairs -> HF rotate-half halves)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """An opened GGUF file: its metadata fields, config, tokenizer and tensors (dequantized lazily)."""

    def __init__(self, path: Path):
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # the reader raises assorted errors on truncated/corrupt files
            raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from e
        self.path = path
        self.fields = {name: _field_value(f) for name, f in self.reader.fields.items()}
        arch = self.fields.get("general.architecture")
        if arch not in _SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported GGUF architecture {arch!r} in {path} "
                             f"(supported: {', '.join(_SUPPORTED_ARCHITECTURES)})")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.gguf_names = {hf_name(n): n for n in self.tensors if hf_name(n)}
        self.config = self._config()

    def _config(self) -> ModelConfig:
        f, a = self.fields, "llama"
        heads, dim = int(f[f"{a}.attention.head_count"]), int(f[f"{a}.embedding_length"])
        vocab = int(f.get(f"{a}.vocab_size", len(f["tokenizer.ggml.tokens"])))
        ctx = int(f[f"{a}.context_length"])
        return ModelConfig(
            name=str(f.get("general.name", self.path.stem)), architecture="llama", vocab_size=vocab,
            hidden_size=dim, intermediate_size=int(f[f"{a}.feed_forward_length"]),
            num_layers=int(f[f"{a}.block_count"]), num_heads=heads,
            num_kv_heads=int(f.get(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(f.get(f"{a}.attention.key_length", dim // heads)), max_position_embeddings=ctx,
            rms_norm_eps=float(f[f"{a}.attention.layer_norm_rms_epsilon"]),
            rope_theta=float(f.get(f"{a}.rope.freq_base", 10000.0)), rope_scaling=self._rope_scaling(ctx),
            tie_word_embeddings="output.weight" not in self.tensors)

    def _rope_scaling(self, ctx: int) -> RopeScaling | None:
        kind = self.fields.get("llama.rope.scaling.type", "none")
        if kind in ("none", None):
            return None
        if kind != "yarn":
            raise ValueError(f"unsupported GGUF rope scaling type {kind!r} in {self.path}")
        original = int(self.fields.get("llama.rope.scaling.original_context_length", ctx))
        return RopeScaling(kind="yarn", factor=float(self.fields["llama.rope.scaling.factor"]),
                           original_max_position_embeddings=original)

    def get_tensor(self, name: str) -> np.ndarray:
        """The tensor with HF name `name`, dequantized to float32, in HF layout."""
        gguf_name = self.gguf_names[name]
        t = self.tensors[gguf_name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"unsupported GGUF quantization {t.tensor_type.name} for tensor {gguf_name!r}") from None
        w = np.asarray(w, dtype=np.float32).reshape(tuple(reversed([int(n) for n in t.shape])))
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, self.config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, self.config.num_kv_heads)
        return w


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception as e:
        raise ValueError(f"GGUF metadata field {field.name!r} is unreadable (corrupt file?): {e}") from e
