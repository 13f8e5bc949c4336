"""The engine end to end on tiny-llama and SmolLM2: greedy parity with the no-cache forward,
preemption, compilation counting, seeds, stop conditions and bad input."""

import jax
import numpy as np
import pytest

from engine import LLM, SamplingParams
from benchmarks.compilations import count_compilations
from models import load_model
from engine.testing import greedy_reference, random_prompts
from tests.engine_helpers import tiny_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def test_tiny_greedy_matches_forward(tiny):
    """16 prompts crossing page (8) and chunk (32) boundaries at concurrency 8."""
    prompts = random_prompts(0, 16, 256, 1, 100)
    llm = tiny_llm(tiny)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == greedy_reference(tiny, prompts, GREEDY.max_tokens, pad_to=128)
    assert all(o.finish_reason == "length" for o in outs)


def test_smollm2_greedy_matches_forward(smollm2):
    prompts = random_prompts(1, 16, smollm2.config.vocab_size, 2, 60)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm = LLM(smollm2, page_size=16, max_model_len=128, max_num_seqs=8, prefill_chunk=32,
              max_num_batched_tokens=128, decode_steps=3,
              multi_step_min_gain=None)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == greedy_reference(smollm2, prompts, params.max_tokens, pad_to=72)


def test_smollm2_chat_answer(smollm2, smollm2_reference):
    llm = LLM(smollm2, max_model_len=256, max_num_seqs=2)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=32))
    assert out.token_ids == list(smollm2_reference["greedy_chat_ids"])
    assert out.text == "The capital of France is Paris." and out.finish_reason == "stop"
    assert out.metrics.ttft > 0 and out.metrics.e2e >= out.metrics.ttft and out.metrics.tpot > 0


def test_preemption_keeps_outputs_and_frees_pages(tiny):
    prompts = random_prompts(2, 12, 256, 20, 60)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = [o.token_ids for o in tiny_llm(tiny).generate(prompts, params, use_tqdm=False)]
    # The workload needs ~8 x 90 / 8 = 90 pages at once; give it 17 (one max_model_len request).
    small = tiny_llm(tiny, num_pages=17)
    preemptions = []
    original = small.scheduler._preempt
    small.scheduler._preempt = lambda r: (preemptions.append(r.request_id), original(r))
    outs = small.generate(prompts, params, use_tqdm=False)
    assert preemptions, "the small pool should have forced preemption"
    assert [o.token_ids for o in outs] == expected
    assert small.allocator.num_free == small.config.num_pages - 1


def test_no_recompilation_in_steady_state(tiny):
    llm = tiny_llm(tiny)
    llm.warmup()
    assert all(x.is_ready() for x in jax.tree.leaves(llm.runner.cache))  # it waited for its runs
    rng = np.random.default_rng(3)
    prompts = random_prompts(4, 100, 256, 1, 100)
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.7, 1.3])), top_k=int(rng.choice([-1, 5])),
                             top_p=float(rng.choice([1.0, 0.9])), min_p=float(rng.choice([0.0, 0.1])),
                             max_tokens=int(rng.integers(1, 25)), seed=int(rng.integers(1000)))
              for _ in prompts]
    with count_compilations() as compiles:
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert compiles[0] == 0
    assert all(1 <= len(o.token_ids) <= p.max_tokens for o, p in zip(outs, params))


def test_seeded_sampling_independent_of_batch(tiny):
    prompt = random_prompts(5, 1, 256, 10, 11)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    alone = tiny_llm(tiny).generate([prompt], params, use_tqdm=False)[0].token_ids
    others = random_prompts(6, 7, 256, 5, 40)
    mixed = tiny_llm(tiny).generate(others[:3] + [prompt] + others[3:],
                                    [SamplingParams(temperature=1.0, max_tokens=20)] * 3 + [params]
                                    + [SamplingParams(temperature=1.0, max_tokens=20)] * 4, use_tqdm=False)
    assert mixed[3].token_ids == alone
    unseeded = tiny_llm(tiny).generate([prompt], SamplingParams(temperature=1.0, max_tokens=20, seed=99,
                                                                ignore_eos=True), use_tqdm=False)[0]
    assert unseeded.token_ids != alone  # the seed matters


def test_stop_conditions(smollm2):
    llm = LLM(smollm2, max_model_len=256, max_num_seqs=4)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2.tokenizer.apply_chat_template(messages)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=32, stop=["France"]), use_tqdm=False)[0]
    assert out.text == "The capital of " and out.finish_reason == "stop"
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=32, stop_token_ids=(3575,)),
                       use_tqdm=False)[0]
    assert out.token_ids == [504, 3575] and out.finish_reason == "stop"
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, logprobs=0), use_tqdm=False)[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    assert [list(e) for e in out.logprobs] == [[t] for t in out.token_ids]
    assert all(lp <= 0 for e in out.logprobs for lp in e.values())
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 12 and out.token_ids[7] == 2  # went on past <|im_end|>
    streamed = "".join(llm.stream(prompt, SamplingParams(temperature=0.0, max_tokens=32)))
    assert streamed == "The capital of France is Paris."


def test_logprobs_match_forward(tiny):
    prompt = random_prompts(7, 1, 256, 12, 13)[0]
    out = tiny_llm(tiny).generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, logprobs=0),
                                  use_tqdm=False)[0]
    logits = np.asarray(tiny.forward([prompt]))[0, -1].astype(np.float64)
    expected = logits[out.token_ids[0]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert abs(out.logprobs[0][out.token_ids[0]] - expected) < 1e-4


@pytest.mark.parametrize("prompt,params,message", [
    ([], None, "prompt is empty"),
    (list(range(128)), None, "prompt has 128 tokens but max_model_len is 128"),
    ([1, 2, 256], None, "token id 256 is outside the vocabulary"),
    ([1, -1], None, "token id -1 is outside the vocabulary"),
    ([1.5, 2], None, r"prompt token 0 is 1.5 \(float\), not an int token id"),
    ([2, True], None, r"prompt token 1 is True \(bool\)"),
    ([[1, 2]], None, r"prompt token 0 is \[1, 2\] \(list\)"),
    (np.array([1.0, 2.0]), None, r"prompt token 0 is np.float64\(1.0\)"),
    (None, None, "a prompt must be a str or a list of int token ids, got NoneType"),
    (np.array(3), None, "a prompt must be a str or a list of int token ids, got ndarray"),
    ("hello", None, "this model has no tokenizer"),
    ([1, 2], "greedy", r"params must be SamplingParams, got 'greedy' \(str\)"),
    ([1, 2], SamplingParams(stop_token_ids=(256,)), r"stop_token_ids: token id 256 is outside the vocabulary"),
])
def test_bad_requests_rejected_while_others_continue(tiny, prompt, params, message):
    llm = tiny_llm(tiny)
    good = [llm.add_request(p, GREEDY) for p in random_prompts(8, 3, 256, 5, 30)]
    llm.step()
    with pytest.raises(ValueError, match=message):
        llm.add_request(prompt, params)
    while llm.has_unfinished():
        llm.step()
    assert all(len(r.output_token_ids) == GREEDY.max_tokens for r in good)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be -1"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(min_p=1.1), r"min_p must be in \[0, 1\]"),
    (dict(stop=[None]), "stop strings must be non-empty str, got None"),
    (dict(stop=[""]), "stop strings must be non-empty str, got ''"),
    (dict(stop=5), r"stop must be a list, got 5 \(int\)"),
    (dict(temperature=float("nan")), "temperature must be finite, got nan"),
    (dict(top_p=float("inf")), "top_p must be finite, got inf"),
    (dict(temperature=10**400), "temperature must be finite"),
    (dict(min_p=True), r"min_p must be a number, got True \(bool\)"),
    (dict(temperature="0"), r"temperature must be a number, got '0' \(str\)"),
    (dict(max_tokens=2.5), r"max_tokens must be an int, got 2.5 \(float\)"),
    (dict(max_tokens="3"), r"max_tokens must be an int, got '3' \(str\)"),
    (dict(top_k=1.5), r"top_k must be an int, got 1.5 \(float\)"),
    (dict(top_k=2**31), r"top_k must be -1 \(disabled\) or in \[0, 2\*\*31\)"),
    (dict(seed=True), r"seed must be an int, got True \(bool\)"),
    (dict(seed=2**32), r"seed must be in \[0, 2\*\*32\)"),
    (dict(stop_token_ids=["a"]), r"stop_token_ids must be an int, got 'a' \(str\)"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be >= 0, got -1"),
    (dict(stop_token_ids=3), r"stop_token_ids must be a list, got 3 \(int\)"),
    (dict(ignore_eos=1), r"ignore_eos must be a bool, got 1 \(int\)"),
    (dict(logprobs="yes"), r"logprobs must be an int, got 'yes' \(str\)"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_normalize_numpy_and_single_values():
    params = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), max_tokens=np.int32(4), seed=np.uint32(7),
                            stop="x", stop_token_ids=np.array([1, 2]), ignore_eos=np.bool_(True), min_p=0)
    assert params == SamplingParams(temperature=0.5, top_k=3, max_tokens=4, seed=7, stop=("x",),
                                    stop_token_ids=(1, 2), ignore_eos=True, min_p=0.0)
    assert [type(v) for v in (params.temperature, params.top_k, params.min_p, params.ignore_eos)] == [
        float, int, float, bool]
    assert SamplingParams(stop=None, stop_token_ids=None) == SamplingParams()


def test_prompt_forms_agree(tiny):
    """Token-id prompts as a list, a tuple, NumPy ints or an int32 array are the same prompt."""
    prompt = random_prompts(12, 1, 256, 10, 11)[0]
    llm = tiny_llm(tiny)
    expected = llm.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
    forms = [tuple(prompt), [np.int64(t) for t in prompt], np.array(prompt, np.int32)]
    assert [o.token_ids for o in llm.generate(forms, GREEDY, use_tqdm=False)] == [expected] * 3
    assert llm.generate(np.array(prompt, np.int32), GREEDY, use_tqdm=False)[0].token_ids == expected


def test_pool_too_small_for_one_request(tiny):
    with pytest.raises(ValueError, match="num_pages=10 is too small to hold even one request of max_model_len=128"):
        tiny_llm(tiny, num_pages=10)


def test_generate_names_the_bad_prompt(tiny):
    llm = tiny_llm(tiny)
    with pytest.raises(ValueError, match="prompt 1: prompt is empty"):
        llm.generate([[1, 2], []], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 1: stop_token_ids: token id 300 is outside the vocabulary"):
        llm.generate([[1, 2], [3]], [GREEDY, SamplingParams(stop_token_ids=[300])], use_tqdm=False)
    with pytest.raises(ValueError, match="prompts must be a prompt or a list of prompts, got NoneType"):
        llm.generate(None, GREEDY, use_tqdm=False)
    assert not llm.has_unfinished()  # nothing was half-admitted


def test_interpret_kernels_match_xla(tiny):
    """The engine through the Pallas kernels (GPU interpret mode on CPU) picks the same greedy tokens."""
    prompts = random_prompts(9, 2, 256, 5, 20)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    xla = tiny_llm(tiny, attention_impl="xla", max_num_seqs=2).generate(prompts, params, use_tqdm=False)
    interpret = tiny_llm(tiny, attention_impl="interpret", max_num_seqs=2).generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in interpret] == [o.token_ids for o in xla]


def test_decode_updates_cache_in_place(tiny):
    """The compiled decode loop never copies a layer's pages (a full-cache copy per step is the
    costliest silent regression: it made decode ~10x slower once), nor the penalty tables."""
    llm = tiny_llm(tiny)
    runner = llm.runner
    rows, pages = 1, llm.config.page_buckets[0]
    zeros = np.zeros((rows,), np.int32)
    from engine.sampler import SamplingTensors
    hlo = runner.decode_fn.lower(runner.state, runner.cache, np.zeros((rows, llm.config.decode_steps), np.int32),
                                 zeros, np.zeros((rows, pages), np.int32), np.ones((rows,), bool),
                                 SamplingTensors.build([], [], rows), 0, runner.penalties).compile().as_text()
    hkv, num_pages, page_size, d = runner.cache[0][0].shape
    layer_shapes = (f"[{hkv},{num_pages},{page_size},{d}]", f"[{hkv},{num_pages * page_size},{d}]",
                    "[{},{}]".format(*runner.penalties.counts.shape))
    copies = [line for line in hlo.splitlines() if " copy(" in line and any(s in line.split("copy(")[0]
                                                                           for s in layer_shapes)]
    assert not copies, copies[:3]
