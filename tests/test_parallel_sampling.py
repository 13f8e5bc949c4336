"""Parallel sampling (`n`, `best_of`; engine/parallel_sampling.py): sequence i of a seeded request
equals a single request seeded seed + i, the prompt is prefilled once (the others compute only the
tail past its last full page, also with the prefix cache off), best_of returns the n of highest
cumulative logprob, aborting the request aborts and frees every sequence, a failure stays in its
sequence; over HTTP through the `openai` client, completions and chat with n=3, streamed chunks
reassembled by index equal the non-streamed choices, a disconnect aborts all n, bad n / best_of
are a 400 naming the field.

The engine tests run the tiny random-weight llama; the server tests one SmolLM2 engine shaped as
tests/test_server.py's (every step one compiled shape).
"""

from __future__ import annotations

import collections
import time

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from engine.request import Status
from models import load_model
from server.app import create_app, serving
from server.engine_loop import EngineLoop
from server.metrics import ServerMetrics, parse
from tests.engine_helpers import tiny_llm

PROMPT = list(range(3, 30))  # 27 tokens: 3 full 8-token pages, then a 3-token tail
SAMPLED = dict(temperature=1.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def llm(tiny) -> LLM:
    """Prefix caching off: sharing the prompt must not depend on it (and single requests recompute)."""
    return tiny_llm(tiny, enable_prefix_caching=False)


def prompt_tokens_computed(llm: LLM) -> list[int]:
    """Instruments the scheduler: the list grows by each step's scheduled prompt positions."""
    counts, schedule = [], llm.scheduler.schedule

    def counted():
        output = schedule()
        counts.append(sum(max(0, min(s.end, len(s.request.prompt_token_ids)) - s.start) for s in output.scheduled))
        return output
    llm.scheduler.schedule = counted
    return counts


def singles(llm: LLM, seeds: range, **kwargs) -> list:
    return llm.generate([PROMPT] * len(seeds), [SamplingParams(**SAMPLED, seed=s, **kwargs) for s in seeds],
                        use_tqdm=False)


def all_free(llm: LLM) -> bool:
    llm.allocator.check([])
    return llm.allocator.num_free == llm.allocator.capacity


# ---- the engine ------------------------------------------------------------------------------


def test_n_equals_single_requests_seeded_seed_plus_i_with_one_prefill(llm):
    counts = prompt_tokens_computed(llm)
    outs = llm.generate([PROMPT, [5, 6, 7]], SamplingParams(**SAMPLED, seed=11, n=3), use_tqdm=False)
    computed = sum(counts)
    assert [o.index for o in outs] == [0, 1, 2, 0, 1, 2]
    tail = len(PROMPT) - len(PROMPT) // 8 * 8
    assert computed == len(PROMPT) + 2 * tail + 3 * 3  # one prefill + two tails; a 3-token prompt has no full page
    assert [o.token_ids for o in outs[:3]] == [o.token_ids for o in singles(llm, range(11, 14))]
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3
    assert all_free(llm)
    unseeded = llm.generate([PROMPT], SamplingParams(**SAMPLED, n=3), use_tqdm=False)
    assert len({tuple(o.token_ids) for o in unseeded}) == 3  # each sequence draws its own seed


def test_later_sequences_inherit_prompt_logprobs(llm):
    outs = llm.generate([PROMPT], SamplingParams(**SAMPLED, seed=3, n=2, prompt_logprobs=1), use_tqdm=False)
    [alone] = singles(llm, range(4, 5), prompt_logprobs=1)
    assert outs[1].token_ids == alone.token_ids and outs[1].prompt_logprobs == outs[0].prompt_logprobs
    assert [None if e is None else list(e) for e in outs[1].prompt_logprobs] == \
        [None if e is None else list(e) for e in alone.prompt_logprobs]


def test_best_of_returns_the_n_of_highest_cumulative_logprob(llm):
    candidates = singles(llm, range(20, 24), logprobs=0)
    ranked = sorted(candidates, key=lambda o: -o.cumulative_logprob)[:2]
    best = llm.generate([PROMPT], SamplingParams(**SAMPLED, seed=20, n=2, best_of=4, logprobs=0), use_tqdm=False)
    assert [o.token_ids for o in best] == [o.token_ids for o in ranked] and [o.index for o in best] == [0, 1]
    assert [o.cumulative_logprob for o in best] == pytest.approx([o.cumulative_logprob for o in ranked], abs=1e-5)
    assert all(o.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(o.token_ids, o.logprobs)))
               for o in best)
    plain = llm.generate([PROMPT], SamplingParams(**SAMPLED, seed=20, n=2, best_of=4), use_tqdm=False)
    assert [o.token_ids for o in plain] == [o.token_ids for o in ranked]
    assert all(o.logprobs is None and o.cumulative_logprob is None for o in plain)  # ranked, not returned


def test_abort_of_the_request_aborts_all_and_frees_all_pages(llm):
    sequences = llm.add_sequences(PROMPT, SamplingParams(**{**SAMPLED, "max_tokens": 60}, n=3))
    for _ in range(3):
        llm.step()
    assert all(r.status is Status.RUNNING for r in sequences) and sequences[1].pages[:3] == sequences[0].pages[:3]
    llm.allocator.check(r.pages for r in sequences)  # the shared prompt pages counted once per holder
    assert llm.abort(sequences[0].request_id)
    assert [r.finish_reason for r in sequences] == ["abort"] * 3 and not llm.has_unfinished() and all_free(llm)

    alone = llm.add_sequences(PROMPT, SamplingParams(**SAMPLED, n=2))
    assert llm.abort(alone[0].request_id, siblings=False) and alone[1].status is Status.WAITING
    while llm.has_unfinished():
        llm.step()
    assert alone[1].finish_reason == "length" and all_free(llm)
    with pytest.raises(ValueError, match="add_sequences"):
        llm.add_request(PROMPT, SamplingParams(n=2))


def test_a_failure_stays_in_its_sequence(llm, monkeypatch):
    append = llm.processor._append

    def failing(request, token, now):
        if request.index == 1:
            raise RuntimeError("boom")
        return append(request, token, now)
    monkeypatch.setattr(llm.processor, "_append", failing)
    outs = llm.generate([PROMPT], SamplingParams(**SAMPLED, seed=1, n=3), use_tqdm=False)
    assert [o.finish_reason for o in outs] == ["length", "error", "length"] and "boom" in outs[1].error
    assert all_free(llm)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n must be >= 1"), (dict(n=2, best_of=1), "best_of must be >= n"), (dict(n=1.5), "n must be an int"),
    (dict(best_of="2"), "best_of must be an int")])
def test_bad_n_and_best_of(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


# ---- the server ------------------------------------------------------------------------------

MODEL = "smollm2"
ENGINE = dict(page_size=16, max_model_len=128, max_num_seqs=8, prefill_chunk=8, max_num_batched_tokens=8,
              decode_steps=1, attention_impl="xla")
QUESTION = [{"role": "user", "content": "Name a colour."}]
STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman and his"  # > one page
N3 = dict(n=3, seed=7, temperature=1.0, max_tokens=6, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def reference(smollm2) -> LLM:
    """An engine like the server's (it shares the compiled steps) for the expected outputs."""
    return LLM(smollm2, **ENGINE)


@pytest.fixture(scope="module")
def url(smollm2):
    llm = LLM(smollm2, **ENGINE)
    engine = EngineLoop(llm, ServerMetrics(MODEL, llm.config.num_pages)).start()
    try:
        with serving(create_app(engine, model_name=MODEL)) as served:
            yield served
    finally:
        engine.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def metric(url: str, name: str, **labels: str) -> float:
    """One series of the server's /metrics (0 before it exists)."""
    label = ",".join([f'model_name="{MODEL}"'] + [f'{k}="{v}"' for k, v in labels.items()])
    return parse(httpx.get(f"{url}/metrics").text).get(f"{name}{{{label}}}", 0)


def reassembled(chunks: list, text) -> tuple[dict[int, str], dict[int, str]]:
    """Each choice's streamed text and finish reason, by index."""
    texts, finished = collections.defaultdict(str), {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += text(choice) or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    return dict(texts), finished


def test_completions_n3_streamed_equals_not_and_generate(url, reference, smollm2):
    c = client(url)
    expected = reference.generate([STORY], SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=7,
                                                          n=3), use_tqdm=False)
    prompt_before = metric(url, "jaxserve_prompt_tokens_total")
    r = c.completions.create(model=MODEL, prompt=STORY, **N3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.text for ch in r.choices] == [o.text for o in expected]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(expected[0].prompt_token_ids), 18)
    assert metric(url, "jaxserve_prompt_tokens_total") - prompt_before == len(expected[0].prompt_token_ids)
    chunks = list(c.completions.create(model=MODEL, prompt=STORY, stream=True,
                                       stream_options={"include_usage": True}, **N3))
    texts, finished = reassembled(chunks, lambda ch: ch.text)
    assert texts == {ch.index: ch.text for ch in r.choices} and finished == {0: "length", 1: "length", 2: "length"}
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 18

    two = c.completions.create(model=MODEL, prompt=[STORY, "The sky is"], **N3)
    assert [ch.index for ch in two.choices] == list(range(6))
    assert [ch.text for ch in two.choices[:3]] == [ch.text for ch in r.choices]


def test_chat_n3_streamed_equals_not(url, smollm2):
    c = client(url)
    r = c.chat.completions.create(model=MODEL, messages=QUESTION, **N3)
    assert [ch.index for ch in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 18
    assert r.usage.prompt_tokens == len(smollm2.tokenizer.apply_chat_template(QUESTION))
    chunks = list(c.chat.completions.create(model=MODEL, messages=QUESTION, stream=True,
                                            stream_options={"include_usage": True}, **N3))
    assert sorted(ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].delta.role) == [0, 1, 2]
    texts, finished = reassembled(chunks, lambda ch: ch.delta.content)
    assert texts == {ch.index: ch.message.content for ch in r.choices} and set(finished) == {0, 1, 2}
    assert chunks[-1].usage.completion_tokens == 18


def test_best_of_over_http_equals_generate(url, reference):
    expected = reference.generate([STORY], SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=7,
                                                          n=2, best_of=3), use_tqdm=False)
    r = client(url).completions.create(model=MODEL, prompt=STORY, best_of=3, **{**N3, "n": 2})
    assert [ch.text for ch in r.choices] == [o.text for o in expected] and r.usage.completion_tokens == 12
    assert all(ch.logprobs is None for ch in r.choices)


def test_disconnect_aborts_all_n(url):
    before = metric(url, "jaxserve_requests_finished_total", finish_reason="abort")
    stream = client(url).completions.create(model=MODEL, prompt=STORY, stream=True, **{**N3, "max_tokens": 100})
    chunks = iter(stream)
    seen = {next(chunks).choices[0].index for _ in range(9)}
    assert len(seen) > 1  # the choices interleave
    stream.close()
    deadline = time.monotonic() + 30
    while metric(url, "jaxserve_kv_pages_used") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "jaxserve_kv_pages_used") == 0 and metric(url, "jaxserve_num_requests_running") == 0
    assert metric(url, "jaxserve_requests_finished_total", finish_reason="abort") == before + 3


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2, "stream": True}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "n": 1000}, "n"),
    ("/v1/chat/completions", {"messages": QUESTION, "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": QUESTION, "n": 2, "best_of": 3, "stream": True}, "best_of")])
def test_bad_n_and_best_of_are_400_naming_the_field(url, path, body, param):
    r = httpx.post(f"{url}{path}", json={"model": MODEL, "max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
