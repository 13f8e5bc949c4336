"""Failures after admission stay contained: a request whose host-side processing raises finishes
alone with finish_reason "error", and a runner call that raises fails only its step's requests,
after which the engine (a fresh KV cache if the call consumed it) serves correctly again."""

import dataclasses

import jax
import pytest

from engine import SamplingParams
from models import load_model
from engine.testing import random_prompts
from tests.engine_helpers import tiny_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
# tiny-llama has no tokenizer, so its text stays "" and this stop string is checked but never hit.
CHECKED_STOP = dataclasses.replace(GREEDY, stop=("never",))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def prompts_and_expected(tiny):
    """Prompts and their greedy tokens from a clean engine."""
    prompts = random_prompts(20, 6, 256, 5, 40)
    return prompts, [o.token_ids for o in tiny_llm(tiny).generate(prompts, GREEDY, use_tqdm=False)]


def fail_on_call(original, n: int, message: str = "injected"):
    """`original`, except that its n-th call raises RuntimeError(message)."""
    calls = 0

    def wrapper(*args):
        nonlocal calls
        calls += 1
        if calls == n:
            raise RuntimeError(message)
        return original(*args)
    return wrapper


@pytest.mark.parametrize("failing_token", [1, 3])  # the token taken at prefill, or one mid-decode
def test_failing_request_fails_alone(tiny, prompts_and_expected, failing_token):
    prompts, expected = prompts_and_expected
    llm = tiny_llm(tiny)
    processor = llm.processor
    processor._hit_stop_string = fail_on_call(processor._hit_stop_string, failing_token)  # only the victim has stops
    victim = 2
    requests = [llm.add_request(p, CHECKED_STOP if i == victim else GREEDY) for i, p in enumerate(prompts)]
    while llm.has_unfinished():
        llm.step()
    outs = [r.output() for r in requests]
    assert (outs[victim].finish_reason, outs[victim].error) == ("error", "RuntimeError: injected")
    assert outs[victim].token_ids == expected[victim][:failing_token]
    others = [i for i in range(len(prompts)) if i != victim]
    assert [outs[i].token_ids for i in others] == [expected[i] for i in others]
    assert all(outs[i].finish_reason == "length" and outs[i].error is None for i in others)
    assert llm.allocator.num_free == llm.config.num_pages - 1


def test_stream_of_a_failing_request_raises(tiny):
    llm = tiny_llm(tiny)
    llm.processor._hit_stop_string = fail_on_call(llm.processor._hit_stop_string, 2)
    with pytest.raises(RuntimeError, match="request 0 failed: RuntimeError: injected"):
        list(llm.stream([1, 2, 3], CHECKED_STOP))
    assert not llm.has_unfinished() and llm.allocator.num_free == llm.config.num_pages - 1


@pytest.mark.parametrize("fn", ["mixed_fn", "decode_fn"])
@pytest.mark.parametrize("consumes_cache", [True, False], ids=["donated", "intact"])
def test_engine_recovers_from_a_failed_step(tiny, prompts_and_expected, fn, consumes_cache):
    """Two requests decode, a third is admitted, then `fn` raises once: the mixed step (the third's
    prefill beside the others' decodes) or a later decode-only call of all three fails. The step's
    requests finish with the error, and the engine serves on with clean tokens."""
    prompts, expected = prompts_and_expected
    llm = tiny_llm(tiny)
    first = [llm.add_request(p, GREEDY) for p in prompts[:2]]
    while not all(r.output_token_ids for r in first):  # prefilled (maybe in chunks): they decode from here
        llm.step()
    third = llm.add_request(prompts[2], GREEDY)
    original = getattr(llm.runner, fn)

    def fail_once(state, cache, *args):
        setattr(llm.runner, fn, original)
        if consumes_cache:  # what a donating call that failed at run time leaves behind
            for buffer in jax.tree.leaves(cache):
                buffer.delete()
        raise RuntimeError("injected XLA failure")
    setattr(llm.runner, fn, fail_once)
    while llm.has_unfinished():
        llm.step()
    outs = [r.output() for r in first + [third]]
    for out, want in zip(outs, expected):  # every running request was in the failed step
        assert (out.finish_reason, out.error) == ("error", "RuntimeError: injected XLA failure")
        assert out.token_ids == want[:len(out.token_ids)]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    assert llm.allocator.num_free == llm.config.num_pages - 1


@pytest.mark.parametrize("method", ["draft_model", "mtp"])
def test_a_failed_draft_call_that_consumed_the_proposers_cache_is_recovered(tiny, prompts_and_expected, method):
    """The proposer's draft loop donates its own KV cache: when that call fails at run time the
    cache is gone, and the engine reallocates it with the target's (running requests recompute),
    so the step's requests fail alone and the engine serves on with exact greedy tokens."""
    prompts, expected = prompts_and_expected
    model = load_model("tiny-deepseek-v3") if method == "mtp" else tiny
    spec = {"method": "mtp", "num_speculative_tokens": 2} if method == "mtp" else {"model": tiny,
                                                                                   "num_speculative_tokens": 2}
    llm = tiny_llm(model, speculative_config=spec)
    if method == "mtp":
        expected = [o.token_ids for o in tiny_llm(model).generate(prompts, GREEDY, use_tqdm=False)]
    proposer = llm.speculator.proposer
    original = proposer.loop_fn

    def fail_once(state, cache, *args):
        proposer.loop_fn = original
        for buffer in jax.tree.leaves(cache):
            buffer.delete()
        raise RuntimeError("injected draft failure")
    proposer.loop_fn = fail_once
    first = [llm.add_request(p, GREEDY) for p in prompts[:2]]
    while llm.has_unfinished():
        llm.step()
    assert [r.output().finish_reason for r in first] == ["error", "error"]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
