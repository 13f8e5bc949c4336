"""Top-k and prompt logprobs (vLLM's `logprobs=k`, `prompt_logprobs=k`) against log-softmax of the
no-cache forward on tiny-llama: chunked prefill across chunks, decode calls, and a batch mixing
requests that ask with requests that do not."""

import numpy as np
import pytest

from benchmarks.compilations import count_compilations
from engine import SamplingParams
from engine.request import MAX_LOGPROBS
from models import load_model
from engine.testing import greedy_reference, random_prompts
from tests.engine_helpers import tiny_llm

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def forward_logprobs(model, ids: list[int]) -> np.ndarray:
    """float64 log-softmax [T, V] of the no-cache forward over `ids`."""
    logits = np.asarray(model.forward([ids]))[0].astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def assert_entry(entry: dict[int, float], token: int, row: np.ndarray, k: int) -> None:
    """entry holds `token` and the k most likely ids, with the reference row's logprobs."""
    top = np.argsort(-row)[:k]
    assert token in entry and set(top.tolist()) <= set(entry) and len(entry) <= k + 1
    for t, value in entry.items():
        assert abs(value - row[t]) < TOL, (t, value, row[t])


def test_logprobs_match_forward_in_mixed_batch(tiny):
    """A 70-token prompt over three 32-token chunks asks for both; beside it requests asking for
    nothing, and for the chosen token's logprob only; decode calls of 4 steps follow the prefill."""
    prompts = random_prompts(3, 3, 256, 20, 71)
    prompts[0] = random_prompts(4, 1, 256, 70, 71)[0]
    asks = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    plain = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    chosen_only = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=0)
    outs = tiny_llm(tiny).generate(prompts, [asks, plain, chosen_only], use_tqdm=False)
    assert [o.token_ids for o in outs] == greedy_reference(tiny, prompts, 9, pad_to=96)

    out = outs[0]
    reference = forward_logprobs(tiny, out.prompt_token_ids + out.token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompts[0])
    for i in range(1, len(prompts[0])):  # prompt token i from position i-1, across chunk boundaries
        assert_entry(out.prompt_logprobs[i], prompts[0][i], reference[i - 1], 3)
    assert len(out.logprobs) == len(out.token_ids)
    for n, token in enumerate(out.token_ids):
        assert_entry(out.logprobs[n], token, reference[len(prompts[0]) - 1 + n], 5)

    assert outs[1].logprobs is None and outs[1].prompt_logprobs is None
    reference = forward_logprobs(tiny, outs[2].prompt_token_ids + outs[2].token_ids)
    assert [list(e) for e in outs[2].logprobs] == [[t] for t in outs[2].token_ids]
    for n, entry in enumerate(outs[2].logprobs):
        assert abs(entry[outs[2].token_ids[n]] - reference[len(prompts[2]) - 1 + n, outs[2].token_ids[n]]) < TOL


def test_sampled_logprobs_are_of_the_unfiltered_distribution(tiny):
    """With temperature and top-k the logprobs stay those of the model (vLLM's default)."""
    prompt = random_prompts(5, 1, 256, 10, 11)[0]
    params = SamplingParams(temperature=0.7, top_k=3, seed=1, max_tokens=6, ignore_eos=True, logprobs=2)
    out = tiny_llm(tiny).generate([prompt], params, use_tqdm=False)[0]
    reference = forward_logprobs(tiny, prompt + out.token_ids)
    for n, token in enumerate(out.token_ids):
        assert_entry(out.logprobs[n], token, reference[len(prompt) - 1 + n], 2)


def test_logprob_variants_compile_only_when_asked(tiny):
    """After warmup a run without logprobs compiles nothing; one asking compiles its variants once."""
    llm = tiny_llm(tiny)
    llm.warmup()
    prompts = random_prompts(6, 4, 256, 5, 60)
    with count_compilations() as compiles:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    assert compiles[0] == 0
    asks = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, prompt_logprobs=2)
    llm.generate(prompts, asks, use_tqdm=False)
    with count_compilations() as compiles:
        llm.generate(prompts, asks, use_tqdm=False)
    assert compiles[0] == 0


def test_warmup_with_logprobs_leaves_nothing_to_compile(tiny):
    """warmup(logprobs=True) compiles every bucket's logprob variants: asking for top-k and prompt
    logprobs afterwards compiles nothing (a server warmed this way never stalls mid-serving)."""
    llm = tiny_llm(tiny)
    assert llm.warmup(logprobs=True) > 0
    prompts = random_prompts(7, 4, 256, 5, 60)
    with count_compilations() as compiles:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, prompt_logprobs=2),
                     use_tqdm=False)
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, logprobs=0), use_tqdm=False)
    assert compiles[0] == 0


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value,message", [
    (MAX_LOGPROBS + 1, rf"must be None or in \[0, {MAX_LOGPROBS}\], got {MAX_LOGPROBS + 1}"),
    (-1, r"must be None or in \[0, 20\], got -1"),
    (True, r"must be an int, got True \(bool\)"),
    (2.0, r"must be an int, got 2.0 \(float\)"),
])
def test_bad_logprobs_rejected(field, value, message):
    with pytest.raises(ValueError, match=f"{field} {message}"):
        SamplingParams(**{field: value})


def test_prompt_logprobs_bypass_the_prefix_cache(tiny):
    """A prompt whose pages are cached still gets every prompt logprob (its prefill skips the cache),
    and later requests without prompt logprobs hit the cache again."""
    llm = tiny_llm(tiny)  # prefix caching is on by default
    prompt = random_prompts(7, 1, 256, 40, 41)[0]  # five full 8-token pages
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    llm.generate([prompt], plain, use_tqdm=False)
    before = llm.prefix_cache.stats.hits
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1), use_tqdm=False)[0]
    assert llm.prefix_cache.stats.hits == before and len(out.prompt_logprobs) == len(prompt)
    reference = forward_logprobs(tiny, prompt)
    for i in range(1, len(prompt)):
        assert_entry(out.prompt_logprobs[i], prompt[i], reference[i - 1], 1)
    llm.generate([prompt], plain, use_tqdm=False)
    assert llm.prefix_cache.stats.hits > before


def test_top_logprobs_refused_with_speculation(tiny):
    llm = tiny_llm(tiny, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    for params in (SamplingParams(logprobs=1), SamplingParams(prompt_logprobs=0)):
        with pytest.raises(ValueError, match="not supported with speculative decoding"):
            llm.add_request([1, 2, 3], params)
    out = llm.generate([[1, 2, 3, 1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=4, logprobs=0),
                       use_tqdm=False)[0]
    assert [list(e) for e in out.logprobs] == [[t] for t in out.token_ids]
