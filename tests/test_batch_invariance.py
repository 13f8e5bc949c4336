"""Batch-invariant mode (engine/batch_invariance.py): one request's token ids and logprobs, bitwise,
alone / among 31 others / chunked differently / after preemption / with decode_steps 1 or 4 /
beside requests asking for top-k and prompt logprobs; and the same request NOT bitwise the same
among 31 others with the mode off (tiny-llama, float32, XLA:CPU). Alone vs chunked and decode_steps
1 vs 4 happen to agree bitwise with the mode off too on this model and CPU (the chunk and the decode
call keep the request's shapes), so the failing composition with the mode off is the batch one."""

import numpy as np
import pytest

from benchmarks.compilations import count_compilations
from engine import LLM, SamplingParams
from engine.testing import random_prompts
from models import load_model
from tests.engine_helpers import tiny_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True, logprobs=0)
OTHERS = random_prompts(1, 31, 256, 5, 60)
TARGET = random_prompts(0, 1, 256, 40, 41)[0]
AT = 15  # the target's place among the others


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def engine(model, batch_invariant: bool = True, **overrides) -> LLM:
    """32 sequences, a 64-token budget (32 decodes beside a 32-token chunk)."""
    return tiny_llm(model, **{**dict(max_num_seqs=32, max_num_batched_tokens=64, prefill_chunk=32,
                                     batch_invariant=batch_invariant), **overrides})


def target_run(llm: LLM, params: SamplingParams, with_others: bool = False,
               others_params: SamplingParams | None = None) -> tuple[list[int], np.ndarray]:
    """The target's token ids and logprobs (float32), run alone or at AT among the 31 others."""
    prompts = OTHERS[:AT] + [TARGET] + OTHERS[AT:] if with_others else [TARGET]
    others = others_params or SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    all_params = [others] * AT + [params] + [others] * (len(OTHERS) - AT) if with_others else [params]
    out = llm.generate(prompts, all_params, use_tqdm=False)[AT if with_others else 0]
    return out.token_ids, np.asarray([lp[t] for lp, t in zip(out.logprobs, out.token_ids)], np.float32)


def assert_bitwise(a: tuple[list[int], np.ndarray], b: tuple[list[int], np.ndarray]) -> None:
    """Same token ids and the same logprob bits."""
    assert a[0] == b[0]
    assert a[1].tobytes() == b[1].tobytes(), np.abs(a[1] - b[1]).max()


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_invariant_across_batches_chunks_and_decode_steps(tiny, params):
    alone = target_run(engine(tiny, True), params)
    assert_bitwise(target_run(engine(tiny, True), params, with_others=True), alone)
    assert_bitwise(target_run(engine(tiny, True, prefill_chunk=8), params, with_others=True), alone)
    assert_bitwise(target_run(engine(tiny, True, decode_steps=1), params, with_others=True), alone)


def test_invariant_beside_logprob_variants(tiny):
    """Neighbours asking for top-k and prompt logprobs run other compiled variants of the step."""
    alone = target_run(engine(tiny, True), GREEDY)
    asking = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5, prompt_logprobs=2)
    assert_bitwise(target_run(engine(tiny, True), GREEDY, with_others=True, others_params=asking), alone)


def test_invariant_after_preemption(tiny):
    alone = target_run(engine(tiny, True), GREEDY)
    small = engine(tiny, True, num_pages=17)  # one max_model_len request's pages: the others preempt
    preempted = []
    original = small.scheduler._preempt
    small.scheduler._preempt = lambda r: (preempted.append(r.request_id), original(r))
    assert_bitwise(target_run(small, GREEDY, with_others=True), alone)
    assert preempted


def test_jnp_attention_path_is_invariant(tiny):
    alone = target_run(engine(tiny, True, attention_impl="xla"), GREEDY)
    assert engine(tiny, True, attention_impl="xla").attention.mixed == "xla"
    assert_bitwise(target_run(engine(tiny, True, attention_impl="xla", prefill_chunk=8), GREEDY, with_others=True),
                   alone)


def test_not_invariant_with_the_mode_off(tiny):
    alone = target_run(engine(tiny, False), GREEDY)
    among = target_run(engine(tiny, False), GREEDY, with_others=True)
    assert among[0] == alone[0]  # the same tokens, other logprob bits
    assert among[1].tobytes() != alone[1].tobytes()


def test_no_recompilation_in_steady_state(tiny):
    llm = engine(tiny, True)
    llm.warmup(logprobs=True)
    with count_compilations() as compiles:
        target_run(llm, GREEDY, with_others=True)
        target_run(llm, SAMPLED)
    assert compiles[0] == 0


@pytest.mark.parametrize("overrides, message", [
    (dict(attention_impl="interpret"), "attention_impl"),
    (dict(max_num_batched_tokens=16, prefill_chunk=16), "max_num_seqs"),
    (dict(batch_invariant=1), "must be a bool"),
])
def test_refused_configurations(tiny, overrides, message):
    with pytest.raises(ValueError, match=message):
        engine(tiny, **{"batch_invariant": True, **overrides})


def test_moe_models_are_refused():
    """A MoE's grouped matmul sizes each expert's rows by the batch's routing: not invariant, refused."""
    with pytest.raises(ValueError, match="MoE"):
        tiny_llm(load_model("tiny-qwen3-moe"), max_num_seqs=8, max_num_batched_tokens=16, prefill_chunk=16,
                 batch_invariant=True)
