"""SmolLM2's GGUF-embedded tokenizer and chat template against transformers' ids."""

import numpy as np


def test_encode_matches_transformers(smollm2, smollm2_reference):
    for i, text in enumerate(smollm2_reference["tok_texts"]):
        assert smollm2.tokenizer.encode(str(text)) == list(smollm2_reference[f"tok_ids_{i}"]), text


def test_decode_round_trips(smollm2, smollm2_reference):
    for text in smollm2_reference["tok_texts"]:
        assert smollm2.tokenizer.decode(smollm2.tokenizer.encode(str(text))) == str(text)


def test_chat_template_matches_transformers(smollm2, smollm2_reference):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert smollm2.tokenizer.render_chat(messages) == str(smollm2_reference["prompt2_text"])
    assert smollm2.tokenizer.apply_chat_template(messages) == list(smollm2_reference["prompt2_ids"])


def test_eos_and_greedy_answer(smollm2, smollm2_reference):
    """Greedy decoding through the no-cache forward reproduces transformers' chat answer."""
    ids = list(smollm2_reference["prompt2_ids"])
    expected = list(smollm2_reference["greedy_chat_ids"])
    for _ in expected:
        ids.append(int(np.asarray(smollm2.forward(np.array([ids])))[0, -1].argmax()))
    assert ids[-len(expected):] == expected
    assert expected[-1] in smollm2.tokenizer.eos_token_ids
    assert smollm2.tokenizer.decode(expected) == "The capital of France is Paris."
