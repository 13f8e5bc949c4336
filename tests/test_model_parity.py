"""The no-cache forward against Hugging Face transformers' logits (fixtures from make_reference.py)."""

import numpy as np
import pytest

from models import load_model
from tests.conftest import FIXTURES

MAX_ABS_LOGIT_DIFF = 1e-3  # float32


def assert_logits_match(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= MAX_ABS_LOGIT_DIFF
    np.testing.assert_array_equal(ours.argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("prompt", [0, 1, 2])
def test_smollm2_matches_transformers(smollm2, smollm2_reference, prompt):
    ids = smollm2_reference[f"prompt{prompt}_ids"]
    assert_logits_match(np.asarray(smollm2.forward(ids[None]))[0], smollm2_reference[f"prompt{prompt}_logits"])


@pytest.mark.parametrize("variant,directory", [("single", "tiny-llama-hf"), ("sharded", "tiny-llama-hf-sharded"),
                                               ("tied", "tiny-llama-hf-tied")])
def test_tiny_llama_hf_matches_transformers(tiny_llama_reference, variant, directory):
    model = load_model(FIXTURES / directory)
    logits = np.asarray(model.forward(tiny_llama_reference[f"{variant}_ids"]))
    assert_logits_match(logits, tiny_llama_reference[f"{variant}_logits"])


def test_llama3_rope_scaling_is_read(tiny_llama_reference):
    """The fixture config uses llama3 scaling; positions past 32 would differ without it."""
    model = load_model(FIXTURES / "tiny-llama-hf")
    assert model.config.rope_scaling is not None and model.config.rope_scaling.kind == "llama3"
    assert model.config.rope_scaling.original_max_position_embeddings == 32


def test_bfloat16_forward_close_to_float32(smollm2_reference):
    """bf16 weights/activations stay near the f32 logits (loose, dtype-appropriate tolerance)."""
    model = load_model(FIXTURES / "tiny-llama-hf", dtype="bfloat16")
    ids = smollm2_reference["prompt0_ids"] % model.config.vocab_size
    ref = np.asarray(load_model(FIXTURES / "tiny-llama-hf").forward(ids[None]))
    ours = np.asarray(model.forward(ids[None]))
    assert np.abs(ours - ref).max() < 0.1 * np.abs(ref).max()
