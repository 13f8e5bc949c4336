"""Write small GGUF files from an HF checkpoint (what llama.cpp's converter does) for loader tests."""

from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from models.loading.gguf import _GLOBAL_NAMES, _LAYER_NAMES


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_names(num_layers: int) -> dict[str, str]:
    """HF name -> GGUF name."""
    names = {hf: g for g, hf in _GLOBAL_NAMES.items()}
    for i in range(num_layers):
        names.update({f"model.layers.{i}.{hf}": f"blk.{i}.{g}" for g, hf in _LAYER_NAMES.items()})
    return names


def write_gguf(path: Path, hf_dir: Path, config: dict, *, arch: str = "llama",
               qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
               overrides: dict[str, np.ndarray] | None = None) -> Path:
    """Convert the single-file HF checkpoint in `hf_dir` to GGUF; 2-D weights stored as `qtype`."""
    tensors = {**load_file(str(hf_dir / "model.safetensors")), **(overrides or {})}
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config.get("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 1e4)))
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(config["vocab_size"])])
    w.add_token_merges([])
    w.add_eos_token_id(2)
    for hf_name, g_name in gguf_names(config["num_hidden_layers"]).items():
        if hf_name not in tensors:
            continue
        t = tensors[hf_name].astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            t = permute_rope_rows(t, heads)
        elif hf_name.endswith("k_proj.weight"):
            t = permute_rope_rows(t, kv)
        if t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(g_name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g_name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
