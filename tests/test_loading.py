"""Loading from every source (preset, GGUF, HF dir, orbax dir) and a clear error for each bad input."""

import json
import shutil

import gguf
import numpy as np
import pytest

from models import load_model
from models.loading import orbax_io
from models.loading.gguf import GGUFCheckpoint
from tests.conftest import FIXTURES
from tests.gguf_writer import write_gguf

TIED = FIXTURES / "tiny-llama-hf-tied"


@pytest.fixture(scope="module")
def tied_config() -> dict:
    return json.loads((TIED / "config.json").read_text())


@pytest.mark.parametrize("qtype,tolerance", [(gguf.GGMLQuantizationType.F32, 1e-4),
                                             (gguf.GGMLQuantizationType.F16, 2e-2),
                                             (gguf.GGMLQuantizationType.Q8_0, 0.1)])
def test_gguf_matches_hf_checkpoint(tmp_path, tied_config, tiny_llama_reference, qtype, tolerance):
    """A GGUF converted llama.cpp-style (Q/K rows permuted) loads back to the same model."""
    path = write_gguf(tmp_path / "tiny.gguf", TIED, tied_config, qtype=qtype)
    model = load_model(path)
    assert model.config.tie_word_embeddings and model.config.num_kv_heads == 2
    logits = np.asarray(model.forward(tiny_llama_reference["tied_ids"]))
    assert np.abs(logits - tiny_llama_reference["tied_logits"]).max() < tolerance


def test_orbax_round_trip(tmp_path, tiny_llama_reference):
    model = load_model(FIXTURES / "tiny-llama-hf")
    orbax_io.save(tmp_path / "ckpt", model.config, model.model, model.tokenizer)
    restored = load_model(tmp_path / "ckpt")
    assert restored.config == model.config
    ids = tiny_llama_reference["single_ids"]
    np.testing.assert_array_equal(np.asarray(restored.forward(ids)), np.asarray(model.forward(ids)))


def test_orbax_keeps_tokenizer(tmp_path, smollm2):
    """The tokenizer and chat template travel with an orbax checkpoint (no weights needed to check)."""
    smollm2.tokenizer.save(tmp_path)
    from models.loading.tokenizer import Tokenizer
    restored = Tokenizer.load(tmp_path)
    messages = [{"role": "user", "content": "Hi"}]
    assert restored.apply_chat_template(messages) == smollm2.tokenizer.apply_chat_template(messages)
    assert restored.eos_token_ids == smollm2.tokenizer.eos_token_ids


def test_random_preset():
    model = load_model("tiny-llama")
    assert model.tokenizer is None
    logits = np.asarray(model.forward(np.arange(10)[None]))
    assert logits.shape == (1, 10, 256) and np.isfinite(logits).all() and logits.std() > 0


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*smollm2-135m-instruct"):
        load_model("nope")


def test_unrecognised_path(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="neither a .gguf file"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="neither a .gguf file"):
        load_model(tmp_path)


def test_truncated_gguf(tmp_path, tied_config):
    path = write_gguf(tmp_path / "tiny.gguf", TIED, tied_config)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(path)


def test_unsupported_gguf_architecture(tmp_path, tied_config):
    path = write_gguf(tmp_path / "tiny.gguf", TIED, tied_config, arch="mamba")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'mamba'"):
        load_model(path)


def test_unsupported_gguf_quantization(tmp_path, tied_config):
    path = write_gguf(tmp_path / "tiny.gguf", TIED, tied_config)
    ckpt = GGUFCheckpoint(path)  # relabel one tensor as Q8_1, a type gguf cannot dequantize
    name = "blk.0.ffn_up.weight"
    ckpt.tensors[name] = ckpt.tensors[name]._replace(tensor_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ValueError, match="unsupported GGUF quantization Q8_1 for tensor 'blk.0.ffn_up.weight'"):
        ckpt.get_tensor("model.layers.0.mlp.up_proj.weight")


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "tiny-llama-hf", target)
    config = json.loads((target / "config.json").read_text())
    config["intermediate_size"] = 96
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \(64, 128\) "
                                         r"but the config expects \(64, 96\)"):
        load_model(target)


def test_missing_tensor(tmp_path, tied_config):
    target = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "tiny-llama-hf", target)
    index = {"weight_map": {"model.embed_tokens.weight": "model.safetensors"}}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.0"):
        load_model(target)


def test_corrupt_safetensors(tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "tiny-llama-hf", target)
    (target / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(target)


def test_unsupported_hf_architecture(tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "tiny-llama-hf", target)
    config = json.loads((target / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'MambaForCausalLM'"):
        load_model(target)
