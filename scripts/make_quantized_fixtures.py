"""Writes tiny checkpoints in the quantized on-disk formats the released models ship (numpy + jax,
no transformers): the fixtures of tests/test_quantized_loading.py and benchmarks' accuracy run.

    .venv/bin/python scripts/make_quantized_fixtures.py [--out_dir=tests/fixtures]

  quantized-gpt-oss-mxfp4-hf/    GptOssForCausalLM, 2 layers, hidden 96 and expert width 64 (3 and 2
      32-value blocks along K), 4 experts top-2; experts as gpt-oss ships them: *_blocks uint8
      [E, N, K/32, 16] + *_scales uint8 e8m0 [E, N, K/32], gate/up rows interleaved (g0 u0 g1 u1 ...),
      quantization_config {"quant_method": "mxfp4", modules_to_not_convert}; everything else bf16.
  quantized-deepseek-v3-fp8-hf/  DeepseekV3ForCausalLM, 2 layers (dense, then MoE: 4 experts in 2
      groups, top-2, one shared expert) and one MTP module (layer 2); hidden 192, q_lora 144, dense
      width 320 (partial 128-blocks), latent 64 + 16; every block projection float8 e4m3 [N, K] +
      float32 weight_scale_inv [ceil(N/128), ceil(K/128)], quantization_config {"quant_method": "fp8",
      "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}; embeddings,
      norms, router and MTP's eh_proj bf16.
Weights are random (seeded); std 1/sqrt(fan-in) keeps activations O(1), the LM head is scaled up so
the logits spread as a trained model's do and greedy choices are not near-ties.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import app, flags
from safetensors.numpy import save_file

from pallas_kernels import quantized as qz

_OUT_DIR = flags.DEFINE_string("out_dir", str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"),
                               "Directory the fixtures are written to.")
GPT_OSS_DIR, DEEPSEEK_DIR = "quantized-gpt-oss-mxfp4-hf", "quantized-deepseek-v3-fp8-hf"
VOCAB = 256
LM_HEAD_GAIN = 8.0
GPT_OSS = dict(hidden_size=96, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, num_local_experts=4, num_experts_per_tok=2)
DEEPSEEK = dict(hidden_size=192, intermediate_size=320, moe_intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, q_lora_rank=144, kv_lora_rank=64, qk_nope_head_dim=32,
                qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                n_shared_experts=1, first_k_dense_replace=1, num_nextn_predict_layers=1)


class Tensors:
    """The checkpoint's tensors by HF name, drawn from one seeded generator."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.out: dict[str, np.ndarray] = {}

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return (std * self.rng.standard_normal(shape)).astype(np.float32)

    def bf16(self, name: str, value: np.ndarray) -> None:
        self.out[name] = value.astype(ml_dtypes.bfloat16)

    def linear(self, out_features: int, in_features: int, gain: float = 1.0) -> np.ndarray:
        """An [out, in] weight, std gain / sqrt(in)."""
        return self.normal((out_features, in_features), gain / np.sqrt(in_features))

    def norm(self, name: str, size: int) -> None:
        self.bf16(name, 1.0 + self.normal((size,), 0.1))

    def fp8(self, name: str, weight_out_in: np.ndarray) -> None:
        """`name` float8 e4m3 [N, K] + `name`_scale_inv float32 per 128 x 128 block (DeepSeek's layout)."""
        w = qz.quantize(jnp.asarray(weight_out_in.T), "fp8_block")
        self.out[name], self.out[f"{name}_scale_inv"] = np.asarray(w.values), np.asarray(w.scales)

    def mxfp4(self, name: str, weight_out_in: np.ndarray) -> None:
        """`name`_blocks uint8 [E, N, K/32, 16] + `name`_scales uint8 [E, N, K/32] (gpt-oss' layout)."""
        w = qz.quantize(jnp.swapaxes(jnp.asarray(weight_out_in), -1, -2), "mxfp4")
        *lead, n, half_k = w.values.shape
        self.out[f"{name}_blocks"] = np.asarray(w.values).reshape(*lead, n, half_k // 16, 16)
        self.out[f"{name}_scales"] = np.asarray(w.scales)

    def embeddings(self, hidden: int) -> None:
        self.bf16("model.embed_tokens.weight", self.normal((VOCAB, hidden), 1.0))
        self.norm("model.norm.weight", hidden)
        self.bf16("lm_head.weight", self.linear(VOCAB, hidden, LM_HEAD_GAIN))


def gpt_oss_tensors(c: dict[str, int], seed: int = 30) -> dict[str, np.ndarray]:
    """gpt-oss' HF names; experts packed as OpenAI ships them, gate/up rows interleaved."""
    t = Tensors(seed)
    d, hd, e, i = c["hidden_size"], c["head_dim"], c["num_local_experts"], c["intermediate_size"]
    t.embeddings(d)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        t.norm(p + "input_layernorm.weight", d)
        t.norm(p + "post_attention_layernorm.weight", d)
        for proj, heads in (("q", c["num_attention_heads"]), ("k", c["num_key_value_heads"]),
                            ("v", c["num_key_value_heads"])):
            t.bf16(p + f"self_attn.{proj}_proj.weight", t.linear(heads * hd, d))
            t.bf16(p + f"self_attn.{proj}_proj.bias", t.normal((heads * hd,), 0.1))
        t.bf16(p + "self_attn.o_proj.weight", t.linear(d, c["num_attention_heads"] * hd))
        t.bf16(p + "self_attn.o_proj.bias", t.normal((d,), 0.1))
        t.bf16(p + "self_attn.sinks", t.normal((c["num_attention_heads"],), 1.0))
        t.bf16(p + "mlp.router.weight", t.linear(e, d))
        t.bf16(p + "mlp.router.bias", t.normal((e,), 0.1))
        t.mxfp4(p + "mlp.experts.gate_up_proj", np.stack([t.linear(2 * i, d) for _ in range(e)]))
        t.bf16(p + "mlp.experts.gate_up_proj_bias", t.normal((e, 2 * i), 0.1))
        t.mxfp4(p + "mlp.experts.down_proj", np.stack([t.linear(d, i) for _ in range(e)]))
        t.bf16(p + "mlp.experts.down_proj_bias", t.normal((e, d), 0.1))
    return t.out


def gpt_oss_config(c: dict[str, int]) -> dict[str, Any]:
    layers = c["num_hidden_layers"]
    return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", **c, "vocab_size": VOCAB,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "attention_bias": True, "sliding_window": 8,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "original_max_position_embeddings": 32, "truncate": False},
            "swiglu_limit": 7.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "bfloat16",
            "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}


def deepseek_layer(t: Tensors, c: dict[str, int], layer: int, moe: bool) -> None:
    """One DeepSeek-V3 block under model.layers.{layer} (MLA + dense MLP or MoE), projections in FP8."""
    p, d = f"model.layers.{layer}.", c["hidden_size"]
    h, q_lora, kv_lora = c["num_attention_heads"], c["q_lora_rank"], c["kv_lora_rank"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    t.norm(p + "input_layernorm.weight", d)
    t.norm(p + "post_attention_layernorm.weight", d)
    t.fp8(p + "self_attn.q_a_proj.weight", t.linear(q_lora, d))
    t.norm(p + "self_attn.q_a_layernorm.weight", q_lora)
    t.fp8(p + "self_attn.q_b_proj.weight", t.linear(h * (nope + rope), q_lora))
    t.fp8(p + "self_attn.kv_a_proj_with_mqa.weight", t.linear(kv_lora + rope, d))
    t.norm(p + "self_attn.kv_a_layernorm.weight", kv_lora)
    t.fp8(p + "self_attn.kv_b_proj.weight", t.linear(h * (nope + v), kv_lora))
    t.fp8(p + "self_attn.o_proj.weight", t.linear(d, h * v))
    mlps = [("mlp", c["intermediate_size"])]
    if moe:
        t.bf16(p + "mlp.gate.weight", t.linear(c["n_routed_experts"], d))
        t.bf16(p + "mlp.gate.e_score_correction_bias", t.normal((c["n_routed_experts"],), 0.1))
        width = c["moe_intermediate_size"]
        mlps = [(f"mlp.experts.{j}", width) for j in range(c["n_routed_experts"])]
        mlps.append(("mlp.shared_experts", width * c["n_shared_experts"]))
    for mlp, width in mlps:
        t.fp8(p + f"{mlp}.gate_proj.weight", t.linear(width, d))
        t.fp8(p + f"{mlp}.up_proj.weight", t.linear(width, d))
        t.fp8(p + f"{mlp}.down_proj.weight", t.linear(d, width))


def deepseek_tensors(c: dict[str, int], seed: int = 40) -> dict[str, np.ndarray]:
    """DeepSeek-V3's HF names (per-expert tensors, the MTP module as layer num_hidden_layers)."""
    t = Tensors(seed)
    d, layers = c["hidden_size"], c["num_hidden_layers"]
    t.embeddings(d)
    for layer in range(layers + c["num_nextn_predict_layers"]):
        deepseek_layer(t, c, layer, moe=layer >= c["first_k_dense_replace"])
    mtp = f"model.layers.{layers}."
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        t.norm(f"{mtp}{norm}.weight", d)
    t.bf16(f"{mtp}eh_proj.weight", t.linear(d, 2 * d))
    return t.out


def deepseek_config(c: dict[str, int]) -> dict[str, Any]:
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **c, "vocab_size": VOCAB,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "attention_bias": False,
            "rope_interleave": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                "original_max_position_embeddings": 32},
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": [qz.FP8_BLOCK, qz.FP8_BLOCK]}}


def write(path: pathlib.Path, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str]) -> None:
    del argv
    out = pathlib.Path(_OUT_DIR.value)
    write(out / GPT_OSS_DIR, gpt_oss_tensors(GPT_OSS), gpt_oss_config(GPT_OSS))
    write(out / DEEPSEEK_DIR, deepseek_tensors(DEEPSEEK), deepseek_config(DEEPSEEK))
    for name in (GPT_OSS_DIR, DEEPSEEK_DIR):
        size = sum(f.stat().st_size for f in (out / name).iterdir())
        print(f"{out / name}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    app.run(main)
