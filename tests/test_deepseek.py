"""DeepSeek-V3: parity with transformers (bf16 and FP8-block checkpoints), FP8 dequantization,
config parsing, the latent cache size, and MLA's absorbed paged path against the expanded one."""

import json

import numpy as np
import pytest

from models import get_preset, load_model
from models.loading.quantized import dequantize_fp8_blocks
from tests.conftest import FIXTURES
from tests.test_gpt_oss import check_paged_matches_forward, config_from_hf, copy_fixture, moe_reference  # noqa: F401
from tests.test_model_parity import assert_logits_match


@pytest.fixture(scope="module")
def tiny_deepseek():
    return load_model(FIXTURES / "tiny-deepseek-v3-hf")


@pytest.mark.parametrize("name,directory", [("deepseek_v3", "tiny-deepseek-v3-hf"),
                                            ("deepseek_v3_fp8", "tiny-deepseek-v3-fp8-hf")])
def test_matches_transformers(moe_reference, name, directory):
    """transformers dequantizes FP8 at load; this fixture's 8 x 8 blocks can only be served that way
    (weights="native" serves 128 x 128: tests/test_quantized_loading.py)."""
    model = load_model(FIXTURES / directory, weights="float32")
    assert_logits_match(np.asarray(model.forward(moe_reference[f"{name}_ids"])), moe_reference[f"{name}_logits"])


def test_fixture_exercises_dense_layer_groups_and_yarn(tiny_deepseek):
    c = tiny_deepseek.config
    assert c.moe.dense_layers == (0,) and not c.is_moe_layer(0) and c.is_moe_layer(1)
    assert c.moe.n_group > 1 and c.moe.topk_group < c.moe.n_group and c.moe.num_shared_experts == 1
    assert c.mla.rope_interleave and c.rope_scaling.mscale_all_dim == 0.707
    assert c.mtp.num_layers == 1  # the fixture carries the MTP module (layer 2), as the released weights do


def test_fp8_blocks_hand_computed():
    weight = np.arange(1, 13, dtype=np.float32).reshape(3, 4)  # [N=3, K=4] in 2x2 blocks (last row: partial)
    scale_inv = np.array([[1.0, 10.0], [100.0, 1000.0]], np.float32)
    want = np.array([[1, 2, 30, 40], [5, 6, 70, 80], [900, 1000, 11000, 12000]], np.float32)
    np.testing.assert_array_equal(dequantize_fp8_blocks(weight, scale_inv, (2, 2)), want)
    with pytest.raises(ValueError, match="needs \\(2, 2\\)"):
        dequantize_fp8_blocks(weight, scale_inv[:1], (2, 2))


def test_fp8_blocks_match_transformers(moe_reference):
    ours = dequantize_fp8_blocks(moe_reference["fp8_weight"], moe_reference["fp8_scale_inv"])
    np.testing.assert_array_equal(ours, moe_reference["fp8_dequantized"])


def test_v4_config_spelling_agrees():
    """Released V3 configs: `rope_scaling` with "type", top-level rope_theta, scoring/topk fields."""
    v5 = json.loads((FIXTURES / "tiny-deepseek-v3-hf" / "config.json").read_text())
    v4 = dict(v5, scoring_func="sigmoid", topk_method="noaux_tc")
    rope = dict(v4.pop("rope_parameters"))
    v4["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    v4["rope_scaling"] = rope
    assert config_from_hf(v4, "x") == config_from_hf(v5, "x")
    with pytest.raises(ValueError, match="x/config.json: field 'scoring_func' is 'softmax'; supported: 'sigmoid'"):
        config_from_hf(dict(v4, scoring_func="softmax"), "x")


def test_missing_expert_tensor_is_a_clear_error(tmp_path):
    path = copy_fixture(tmp_path, "tiny-deepseek-v3-hf", drop_tensor="model.layers.1.mlp.experts.5.up_proj.weight")
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.experts.5.up_proj.weight'"):
        load_model(path)


def test_latent_cache_is_71x_smaller_than_full_kv():
    from engine import kv_cache
    c = get_preset("deepseek-v3")
    latent = kv_cache.bytes_per_token(c, 2)
    assert latent == 61 * 576 * 2  # one latent "head": 512 + 64 values per layer
    full = c.num_layers * c.num_heads * (c.head_dim + c.mla.v_head_dim) * 2  # K 192 + V 128 values per head
    assert round(full / latent) == 71


def test_absorbed_paged_decode_matches_expanded_forward(tiny_deepseek):
    """Latent pages + absorbed projections (chunked prefill, decode) == the expanded no-cache MLA."""
    prompt = [int(t) for t in np.random.default_rng(4).integers(0, 256, 11)]
    check_paged_matches_forward(tiny_deepseek, prompt, new_tokens=10, page_size=4, chunk=4)


def test_mtp_module_weights_load(tiny_deepseek):
    """The fixture's MTP module (layer 2, as in the released checkpoints) lands in model.mtp[0]."""
    from models.loading.hf_safetensors import SafetensorsCheckpoint
    ckpt = SafetensorsCheckpoint(FIXTURES / "tiny-deepseek-v3-hf")
    mtp = tiny_deepseek.model.mtp[0]
    np.testing.assert_array_equal(np.asarray(mtp.eh_proj.kernel[...]), ckpt.get_tensor("model.layers.2.eh_proj.weight").T)
    np.testing.assert_array_equal(np.asarray(mtp.shared_head_norm.weight[...]),
                                  ckpt.get_tensor("model.layers.2.shared_head.norm.weight"))
    np.testing.assert_array_equal(np.asarray(mtp.block.mlp.experts.down_proj[...][3]),
                                  ckpt.get_tensor("model.layers.2.mlp.experts.3.down_proj.weight").T)


def test_engine_greedy_matches_no_cache_forward(tiny_deepseek):
    """The engine with the latent cache (one latent head of 32 + 8 values per token)."""
    from tests.test_gpt_oss import engine_greedy_matches_forward
    engine_greedy_matches_forward(tiny_deepseek, (13, 21, 5), max_tokens=12)
