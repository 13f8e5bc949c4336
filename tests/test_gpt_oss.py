"""gpt-oss: parity with transformers (bf16 and MXFP4 checkpoints), MXFP4 dequantization, config
parsing, bad checkpoints, and the paged-cache path against the no-cache forward."""

import json
import math
import shutil
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engine import kv_cache
from models import load_model
from models.attention import AttentionMetadata
from models import registry
from models.loading.hf_config import HFConfig
from models.loading.quantized import dequantize_mxfp4
from tests.conftest import FIXTURES
from tests.test_model_parity import assert_logits_match


@pytest.fixture(scope="module")
def moe_reference() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "moe_reference.npz"))


@pytest.fixture(scope="module")
def tiny_gpt_oss():
    return load_model(FIXTURES / "tiny-gpt-oss-hf")


@pytest.mark.parametrize("name,directory", [("gpt_oss", "tiny-gpt-oss-hf"), ("gpt_oss_mxfp4", "tiny-gpt-oss-mxfp4-hf")])
def test_matches_transformers(moe_reference, name, directory):
    model = load_model(FIXTURES / directory)
    assert_logits_match(np.asarray(model.forward(moe_reference[f"{name}_ids"])), moe_reference[f"{name}_logits"])


def test_fixture_exercises_sliding_window_and_experts(tiny_gpt_oss, moe_reference):
    c = tiny_gpt_oss.config
    assert c.layer_types == ("sliding_attention", "full_attention")
    assert c.sliding_window < moe_reference["gpt_oss_ids"].shape[1]
    assert 1 < c.moe.num_experts_per_tok < c.moe.num_experts
    assert c.rope_scaling.kind == "yarn" and not c.rope_scaling.truncate


def test_mxfp4_hand_computed():
    # byte 0x2F: low nibble 0xF = -6.0 comes first, high nibble 0x2 = 1.0; scale 128 = 2**1.
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, 0], blocks[0, 1], blocks[0, 15] = 0x2F, 0x93, 0x70
    values = dequantize_mxfp4(blocks, np.array([128], np.uint8))
    want = np.zeros(32, np.float32)
    want[[0, 1, 2, 3, 30, 31]] = [-12.0, 2.0, 3.0, -1.0, 0.0, 12.0]
    np.testing.assert_array_equal(values, want)
    assert dequantize_mxfp4(np.full((1, 16), 0x11, np.uint8), np.array([124], np.uint8)).max() == 0.5 / 8


def test_mxfp4_matches_transformers(moe_reference):
    """transformers' convert_moe_packed_tensors returns [E, K, N]: the transpose of ours per expert."""
    ours = dequantize_mxfp4(moe_reference["mxfp4_blocks"], moe_reference["mxfp4_scales"])  # [E, N, K]
    np.testing.assert_array_equal(np.swapaxes(ours, -1, -2), moe_reference["mxfp4_dequantized"])


def test_rope_scaling_spellings_agree():
    """transformers v4 (`rope_scaling` + top-level `rope_theta`) and v5 (`rope_parameters`) configs."""
    v5 = json.loads((FIXTURES / "tiny-gpt-oss-hf" / "config.json").read_text())
    v4 = dict(v5)
    rope = dict(v4.pop("rope_parameters"))
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["rope_scaling"] = rope
    del v4["layer_types"]  # older configs leave it implicit: sliding on even layers
    assert config_from_hf(v4, "x") == config_from_hf(v5, "x")


def config_from_hf(raw: dict, name: str):
    """The ModelConfig of a config.json's fields (as if read from x/config.json)."""
    return registry.config_from_hf(HFConfig(raw, "x/config.json"), name)


def copy_fixture(tmp_path, directory: str, edit_config=None, drop_tensor: str | None = None):
    """A copy of a fixture dir, optionally with its config edited or one tensor left out."""
    from safetensors.numpy import save_file

    from models.loading.hf_safetensors import SafetensorsCheckpoint
    src, dst = FIXTURES / directory, tmp_path / directory
    shutil.copytree(src, dst)
    if edit_config is not None:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if drop_tensor is not None:
        ckpt = SafetensorsCheckpoint(src)
        save_file({n: np.ascontiguousarray(ckpt.get_raw(n)) for n in ckpt.weight_map if n != drop_tensor},
                  str(dst / "model.safetensors"))
    return dst


def test_missing_expert_tensor_is_a_clear_error(tmp_path):
    path = copy_fixture(tmp_path, "tiny-gpt-oss-mxfp4-hf", drop_tensor="model.layers.1.mlp.experts.down_proj_scales")
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.experts.down_proj_scales'"):
        load_model(path)


def test_unknown_quant_method_is_a_clear_error(tmp_path):
    path = copy_fixture(tmp_path, "tiny-gpt-oss-mxfp4-hf",
                        edit_config=lambda c: c["quantization_config"].update(quant_method="awq"))
    with pytest.raises(ValueError, match="unknown quant_method 'awq'"):
        load_model(path)


def test_too_many_experts_per_token_is_a_clear_error(tmp_path):
    path = copy_fixture(tmp_path, "tiny-gpt-oss-hf", edit_config=lambda c: c.update(num_experts_per_tok=5))
    with pytest.raises(ValueError, match="num_experts_per_tok=5 must be in 1..num_experts=4"):
        load_model(path)


@partial(jax.jit, static_argnums=(0, 5))
def _step(graphdef, state, tokens, positions, cache, impl, metadata):
    model = nnx.merge(graphdef, state)
    hidden, cache = model(tokens, positions, cache, metadata, attention_impl=impl)
    return model.logits(hidden), cache


def _metadata(table: np.ndarray, positions: np.ndarray, page_size: int) -> AttentionMetadata:
    """One sequence's ragged metadata: its new tokens at `positions`, the last ones of its context."""
    slots = table[positions // page_size] * page_size + positions % page_size
    return AttentionMetadata(slot_mapping=jnp.asarray(slots), query_start_loc=jnp.asarray([0, len(positions)], jnp.int32),
                             context_lens=jnp.asarray([positions[-1] + 1], jnp.int32),
                             block_tables=jnp.asarray(table)[None], max_query_len=len(positions))


def paged_greedy(model: nnx.Module, prompt: list[int], new_tokens: int, *, page_size: int, chunk: int,
                 impl: str = "xla") -> tuple[np.ndarray, list[int]]:
    """One sequence through the paged cache: the prompt in chunks, then one token per step feeding
    back the greedy token. Pages are a random permutation (page 0 stays the null page). Returns the
    logits [new_tokens, V] that chose each new token, and the new tokens."""
    total = len(prompt) + new_tokens
    num_pages = math.ceil(total / page_size)
    table = np.random.default_rng(0).permutation(np.arange(1, num_pages + 1)).astype(np.int32)
    cache = kv_cache.allocate(model.config, num_pages + 1, page_size, jnp.float32)
    graphdef, state = nnx.split(model)
    seq, chosen, pos = list(prompt), [], 0
    while len(chosen) < new_tokens:
        n = min(chunk, len(prompt) - pos) if pos < len(prompt) else 1
        positions = np.arange(pos, pos + n, dtype=np.int32)
        logits, cache = _step(graphdef, state, jnp.asarray(seq[pos:pos + n])[None], jnp.asarray(positions)[None],
                              cache, impl, _metadata(table, positions, page_size))
        pos += n
        if pos >= len(prompt):
            chosen.append(np.asarray(logits[0, -1]))
            seq.append(int(np.argmax(chosen[-1])))
    return np.stack(chosen), seq[len(prompt):]


def check_paged_matches_forward(loaded, prompt: list[int], new_tokens: int, page_size: int, chunk: int) -> None:
    """Greedy through the cache == greedy of the no-cache forward; logits agree at every step."""
    logits, generated = paged_greedy(loaded.model, prompt, new_tokens, page_size=page_size, chunk=chunk)
    full = np.asarray(loaded.forward(np.asarray([prompt + generated[:-1]])))[0, len(prompt) - 1:]
    np.testing.assert_allclose(logits, full, atol=1e-4)
    np.testing.assert_array_equal(np.argmax(full, -1), generated)


def test_paged_cache_greedy_matches_no_cache_forward(tiny_gpt_oss):
    """Prompt of 13 in chunks of 5 (pages of 4), 12 decode steps: crosses pages and the window of 8."""
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 256, 13)]
    check_paged_matches_forward(tiny_gpt_oss, prompt, new_tokens=12, page_size=4, chunk=5)


def engine_greedy_matches_forward(loaded, prompt_lens: tuple[int, ...], max_tokens: int) -> None:
    """Several prompts through the engine (pages of 4, prefill chunks of 8, batched decode)."""
    from engine import LLM, SamplingParams
    from engine.testing import greedy_reference
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, loaded.config.vocab_size, n)] for n in prompt_lens]
    llm = LLM(loaded, page_size=4, num_pages=64, max_num_seqs=4, prefill_chunk=8, max_num_batched_tokens=16,
              max_model_len=64, attention_impl="xla")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    want = greedy_reference(loaded, prompts, max_tokens, pad_to=max(prompt_lens) + max_tokens)
    assert [o.token_ids for o in outs] == want


def test_engine_greedy_matches_no_cache_forward(tiny_gpt_oss):
    """Prompts shorter and longer than the window of 8, crossing pages of 4 and prefill chunks of 8."""
    engine_greedy_matches_forward(tiny_gpt_oss, (13, 21, 5), max_tokens=12)
