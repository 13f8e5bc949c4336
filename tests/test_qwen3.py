"""Qwen3 and Qwen3-MoE, and DeepSeek-V3 as transformers saves it (no MTP tensors): checkpoints written
by save_pretrained load and match transformers' logits; config parsing; the engine's greedy path."""

import json

import numpy as np
import pytest

from models import load_model
from tests.conftest import FIXTURES
from tests.test_gpt_oss import config_from_hf, copy_fixture, engine_greedy_matches_forward
from tests.test_model_parity import assert_logits_match

SAVED = {"qwen3": "tiny-qwen3-hf", "qwen3_moe": "tiny-qwen3-moe-hf", "deepseek_v3_no_mtp": "tiny-deepseek-v3-no-mtp-hf"}


@pytest.fixture(scope="module")
def saved_reference() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "saved_reference.npz"))


@pytest.fixture(scope="module")
def saved_models():
    return {name: load_model(FIXTURES / directory) for name, directory in SAVED.items()}


@pytest.mark.parametrize("name", SAVED)
def test_matches_transformers(saved_models, saved_reference, name):
    logits = np.asarray(saved_models[name].forward(saved_reference[f"{name}_ids"]))
    assert_logits_match(logits, saved_reference[f"{name}_logits"])


def test_fixtures_exercise_what_differs(saved_models):
    """q/k norm, a tied head (Qwen3); a dense layer, no top-k renormalization, shards (Qwen3-MoE)."""
    qwen3, moe = saved_models["qwen3"].config, saved_models["qwen3_moe"].config
    assert qwen3.architecture == "qwen3" and qwen3.qk_norm and qwen3.tie_word_embeddings and qwen3.moe is None
    assert moe.architecture == "qwen3_moe" and moe.qk_norm and not moe.tie_word_embeddings
    assert moe.moe.dense_layers == (0,) and not moe.moe.norm_topk_prob and moe.moe.router_bias is False
    assert (FIXTURES / SAVED["qwen3_moe"] / "model.safetensors.index.json").exists()
    norm = np.asarray(saved_models["qwen3"].model.layers[1].self_attn.k_norm.weight[...])
    assert np.abs(norm - 1).max() > 0.05  # the fixture's norms are perturbed: a dropped norm would show


def test_deepseek_without_mtp_tensors_loads_with_mtp_off(saved_models, caplog):
    """config.json says num_nextn_predict_layers=1; save_pretrained wrote no MTP module."""
    raw = json.loads((FIXTURES / SAVED["deepseek_v3_no_mtp"] / "config.json").read_text())
    assert raw["num_nextn_predict_layers"] == 1 and raw["num_hidden_layers"] == 3
    loaded = saved_models["deepseek_v3_no_mtp"]
    assert loaded.config.mtp is None and len(loaded.model.mtp) == 0
    with caplog.at_level("WARNING"):
        load_model(FIXTURES / SAVED["deepseek_v3_no_mtp"])
    assert sum("MTP off" in r.getMessage() for r in caplog.records) == 1


def test_deepseek_with_mtp_tensors_keeps_them():
    loaded = load_model(FIXTURES / "tiny-deepseek-v3-hf")
    assert loaded.config.mtp.num_layers == 1 and len(loaded.model.mtp) == 1


def test_qwen3_moe_v4_expert_count_spelling():
    """Released Qwen3-MoE configs say num_experts; transformers 5.x writes num_local_experts."""
    v5 = json.loads((FIXTURES / SAVED["qwen3_moe"] / "config.json").read_text())
    v4 = {k: v for k, v in v5.items() if k != "num_local_experts"} | {"num_experts": v5["num_local_experts"]}
    assert config_from_hf(v4, "x") == config_from_hf(v5, "x")


@pytest.mark.parametrize("edit,match", [
    (dict(hidden_act="gelu"), "x/config.json: field 'hidden_act' is 'gelu'; supported: 'silu'"),
    (dict(use_sliding_window=True), "field 'use_sliding_window' is True; supported: False"),
    (dict(num_attention_heads="4"), "field 'num_attention_heads' is '4', expected int"),
    (dict(num_key_value_heads=3), "x/config.json: num_heads=4 is not a multiple of num_kv_heads=3"),
    (dict(vocab_size=None), "field 'vocab_size' is missing"),
])
def test_bad_config_fields_name_field_and_file(edit, match):
    raw = json.loads((FIXTURES / SAVED["qwen3"] / "config.json").read_text()) | edit
    with pytest.raises(ValueError, match=match):
        config_from_hf(raw, "x")


def test_bad_moe_fields_name_field_and_file(tmp_path):
    path = copy_fixture(tmp_path, SAVED["qwen3_moe"], edit_config=lambda c: c.update(decoder_sparse_step=0))
    with pytest.raises(ValueError, match=f"{path / 'config.json'}: field 'decoder_sparse_step' is 0"):
        load_model(path)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_engine_greedy_matches_no_cache_forward(saved_models, name):
    engine_greedy_matches_forward(saved_models[name], (13, 21, 5), max_tokens=12)
