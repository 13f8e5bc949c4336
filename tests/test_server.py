"""The OpenAI-compatible server (server/) through the official `openai` client and raw HTTP:
greedy outputs equal LLM.generate's, 32 concurrent streaming clients, a disconnect frees its
pages, bad input is refused without hurting a concurrent stream, the queue limit and the API key.

One engine (SmolLM2, decode_steps=1 and an 8-token budget: every step is one compiled shape)
serves three apps on free 127.0.0.1 ports: the main one, one with a queue of 0 and one with an
API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from benchmarks.http_client import token_times
from engine import LLM, SamplingParams
from server import protocol
from server.app import create_app, serving
from server.engine_loop import EngineLoop
from server.metrics import ServerMetrics, parse
from engine.testing import random_prompts

MODEL = "smollm2"
KEY = "sekrit"
ENGINE = dict(page_size=16, max_model_len=128, max_num_seqs=8, prefill_chunk=8, max_num_batched_tokens=8,
              decode_steps=1, attention_impl="xla")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def reference(smollm2) -> LLM:
    """An engine like the server's (it shares the compiled steps) for the expected outputs."""
    return LLM(smollm2, **ENGINE)


@pytest.fixture(scope="module")
def urls(smollm2):
    llm = LLM(smollm2, **ENGINE)
    engine = EngineLoop(llm, ServerMetrics(MODEL, llm.config.num_pages)).start()
    apps = {"main": create_app(engine, model_name=MODEL, max_body_bytes=64 << 10),
            "tight": create_app(engine, model_name=MODEL, max_queue=0),
            "keyed": create_app(engine, model_name=MODEL, api_key=KEY)}
    try:
        with contextlib.ExitStack() as stack:
            yield {name: stack.enter_context(serving(app)) for name, app in apps.items()}
    finally:
        engine.stop()
    assert not engine.alive


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def metrics(url: str) -> dict[str, float]:
    return parse(httpx.get(f"{url}/metrics").text)


def gauge(values: dict[str, float], name: str) -> float:
    return values[f'{name}{{model_name="{MODEL}"}}']


# ---- correctness -----------------------------------------------------------------------------


def test_completions_streamed_and_not_equal_generate(urls, reference):
    c = client(urls["main"])
    prompt = "The capital of France is"
    [expected] = reference.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                                    use_tqdm=False)
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(expected.prompt_token_ids), 12)
    assert r.object == "text_completion" and r.model == MODEL

    chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 12
    assert all(ch.usage is None for ch in chunks[:-1])

    by_ids = c.completions.create(model=MODEL, prompt=expected.prompt_token_ids, max_tokens=12, **GREEDY)
    assert by_ids.choices[0].text == expected.text
    short = c.completions.create(model=MODEL, prompt=prompt, temperature=0.0)  # OpenAI's default: 16 tokens
    assert short.usage.completion_tokens <= 16


def test_chat_streamed_and_not_equal_generate(urls, reference, smollm2):
    c = client(urls["main"])
    expected = reference.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=32))
    assert expected.text == "The capital of France is Paris."
    r = c.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=32, temperature=0.0)
    assert r.choices[0].message.content == expected.text and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(smollm2.tokenizer.apply_chat_template(QUESTION))
    assert r.usage.completion_tokens == len(expected.token_ids)

    chunks = list(c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)

    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}]
    cut = c.chat.completions.create(model=MODEL, messages=parts, max_tokens=32, temperature=0.0, stop=["Paris"])
    assert cut.choices[0].message.content == "The capital of France is " and cut.choices[0].finish_reason == "stop"


def test_logprobs_equal_generate(urls, reference, smollm2):
    """Completions' and chat's logprobs, streamed and not, are the engine's for the same request."""
    c = client(urls["main"])
    prompt, k = "The capital of France is", 3
    [expected] = reference.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                             logprobs=k), use_tqdm=False)
    text = lambda t: smollm2.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    tokens = [text(t) for t in expected.token_ids]
    values = [e[t] for t, e in zip(expected.token_ids, expected.logprobs)]

    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, logprobs=k, **GREEDY).choices[0].logprobs
    assert r.tokens == tokens and r.text_offset == [sum(map(len, tokens[:i])) for i in range(6)]
    np.testing.assert_allclose(r.token_logprobs, values, atol=1e-5)
    assert [list(d) for d in r.top_logprobs] == [[text(t) for t in e] for e in expected.logprobs]
    np.testing.assert_allclose([v for d in r.top_logprobs for v in d.values()],
                               [v for e in expected.logprobs for v in e.values()], atol=1e-5)
    chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, logprobs=k, stream=True, **GREEDY))
    streamed = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert [t for x in streamed for t in x.tokens] == tokens
    assert [o for x in streamed for o in x.text_offset] == r.text_offset
    np.testing.assert_allclose([v for x in streamed for v in x.token_logprobs], values, atol=1e-5)

    chat = reference.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=6, logprobs=k))
    ranked = [sorted(e.items(), key=lambda tv: -tv[1])[:k] for e in chat.logprobs]
    for stream in (False, True):
        out = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0.0, logprobs=True,
                                        top_logprobs=k, stream=stream)
        content = ([x for ch in out if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
                   if stream else out.choices[0].logprobs.content)
        assert [x.token for x in content] == [text(t) for t in chat.token_ids]
        np.testing.assert_allclose([x.logprob for x in content],
                                   [e[t] for t, e in zip(chat.token_ids, chat.logprobs)], atol=1e-5)
        assert [[a.token for a in x.top_logprobs] for x in content] == [[text(t) for t, _ in r] for r in ranked]
        np.testing.assert_allclose([a.logprob for x in content for a in x.top_logprobs],
                                   [v for r in ranked for _, v in r], atol=1e-5)
        assert all(x.bytes == list(x.token.encode()) for x in content)
    plain = c.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_penalties_and_biases_equal_generate(urls, reference, smollm2):
    """OpenAI's presence/frequency_penalty and logit_bias (string keys) and vLLM's repetition_penalty,
    min_tokens, bad_words and allowed_token_ids, through the openai client on completions and chat:
    LLM.generate's tokens for the same params, which the biases visibly changed."""
    c = client(urls["main"])
    prompt, paris = "The capital of France is", smollm2.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    wire = dict(presence_penalty=0.8, frequency_penalty=0.6, logit_bias={str(paris): -100})
    extra = dict(repetition_penalty=1.3, min_tokens=3, bad_words=["London"])
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, **wire | extra
                            | {"logit_bias": {paris: -100}})
    [expected] = reference.generate([prompt], params, use_tqdm=False)
    [free] = reference.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                                use_tqdm=False)
    assert paris in free.token_ids and paris not in expected.token_ids
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0.0, **wire,
                             extra_body={"ignore_eos": True, **extra})
    assert r.choices[0].text == expected.text
    allowed = sorted(set(free.token_ids))
    chat = reference.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=6, allowed_token_ids=allowed))
    r = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0.0,
                                  extra_body={"allowed_token_ids": allowed})
    assert r.choices[0].message.content == chat.text and set(chat.token_ids) <= set(allowed)


def test_32_concurrent_streaming_clients(urls, reference, smollm2):
    """32 clients x 3 streamed requests each: every one complete, with the greedy text of generate."""
    clients, per_client, max_tokens = 32, 3, 4
    prompts = random_prompts(7, clients * per_client, smollm2.config.vocab_size, 2, 12)
    expected = reference.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                                  use_tqdm=False)

    async def one(c: openai.AsyncOpenAI, prompt: list[int]) -> tuple[str, str, int]:
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
        text, finish, used = [], None, None
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                used = chunk.usage.completion_tokens
        return "".join(text), finish, used

    async def main() -> list:
        c = openai.AsyncOpenAI(base_url=f"{urls['main']}/v1", api_key="none", max_retries=0, timeout=120)

        async def user(i: int) -> list:
            return [await one(c, prompts[i * per_client + j]) for j in range(per_client)]
        try:
            return [r for rs in await asyncio.gather(*(user(i) for i in range(clients))) for r in rs]
        finally:
            await c.close()

    results = asyncio.run(main())
    assert results == [(e.text, "length", max_tokens) for e in expected]
    m = metrics(urls["main"])
    assert gauge(m, "jaxserve_kv_pages_used") == 0 and gauge(m, "jaxserve_num_requests_running") == 0


def test_client_killed_mid_stream_frees_its_pages(urls):
    c = client(urls["main"])
    before = metrics(urls["main"]).get(f'jaxserve_requests_finished_total{{model_name="{MODEL}",finish_reason="abort"}}', 0)
    stream = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=100, stream=True, **GREEDY)
    chunks = iter(stream)
    next(chunks), next(chunks)
    during = metrics(urls["main"])
    assert gauge(during, "jaxserve_num_requests_running") == 1 and gauge(during, "jaxserve_kv_pages_used") > 0
    stream.close()  # the connection goes: the server aborts the request
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = metrics(urls["main"])
        if gauge(m, "jaxserve_kv_pages_used") == 0:
            break
        time.sleep(0.05)
    assert gauge(m, "jaxserve_kv_pages_used") == 0 and gauge(m, "jaxserve_num_requests_running") == 0
    assert m[f'jaxserve_requests_finished_total{{model_name="{MODEL}",finish_reason="abort"}}'] == before + 1
    assert m[f'jaxserve_generation_tokens_total{{model_name="{MODEL}"}}'] > 0


# ---- bad input -------------------------------------------------------------------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
CHAT_OK = {"model": MODEL, "messages": QUESTION, "max_tokens": 2}
BAD = [  # path, body (bytes or a dict), status, the error's param (None: any), its code (None: any)
    (C, b"{not json", 400, None, "invalid_json"),
    (C, b"[1, 2]", 400, None, None),
    (C, {**OK, "prompt": 5}, 400, "prompt", None),
    (C, {"model": MODEL}, 400, "prompt", None),
    (C, {**OK, "temperature": "hot"}, 400, "temperature", None),
    (C, {**OK, "max_tokens": "5"}, 400, "max_tokens", None),
    (C, {**OK, "max_tokens": 1.5}, 400, "max_tokens", None),
    (C, {**OK, "stream": "yes"}, 400, "stream", None),
    (C, {**OK, "model": "gpt-5"}, 404, "model", "model_not_found"),
    (C, {**OK, "prompt": [1] * 200}, 400, "prompt", "context_length_exceeded"),
    (C, {**OK, "max_tokens": 500}, 400, "max_tokens", "context_length_exceeded"),
    (C, {**OK, "temperature": -1}, 400, "temperature", None),
    (C, {**OK, "top_p": 0}, 400, "top_p", None),
    (C, {**OK, "top_k": -5}, 400, "top_k", None),
    (C, {**OK, "min_p": 2}, 400, "min_p", None),
    (C, {**OK, "seed": -1}, 400, "seed", None),
    (C, {**OK, "stop": [""]}, 400, "stop", None),
    (C, {**OK, "max_tokens": 0}, 400, "max_tokens", None),
    (C, {**OK, "n": 0}, 400, "n", None),
    (C, {**OK, "n": 2, "best_of": 1}, 400, "best_of", None),
    (C, {**OK, "logprobs": 21}, 400, "logprobs", None),
    (C, {**OK, "logprobs": -1}, 400, "logprobs", None),
    (C, {**OK, "presence_penalty": 2.5}, 400, "presence_penalty", None),
    (C, {**OK, "frequency_penalty": -3}, 400, "frequency_penalty", None),
    (C, {**OK, "repetition_penalty": 0}, 400, "repetition_penalty", None),
    (C, {**OK, "logit_bias": {"abc": 1}}, 400, "logit_bias", None),
    (C, {**OK, "logit_bias": {"5": "x"}}, 400, "logit_bias", None),
    (C, {**OK, "logit_bias": {"1000000": 1}}, 400, "logit_bias", None),  # outside the vocabulary
    (C, {**OK, "min_tokens": 3}, 400, "min_tokens", None),  # more than max_tokens
    (C, {**OK, "bad_words": [""]}, 400, "bad_words", None),
    (C, {**OK, "allowed_token_ids": []}, 400, "allowed_token_ids", None),
    (C, {**OK, "prompt": [10**6]}, 400, "prompt", None),
    (C, {**OK, "prompt": [1, True]}, 400, "prompt", None),
    (C, {**OK, "prompt": []}, 400, "prompt", None),
    (C, {**OK, "prompt": ""}, 400, "prompt", None),
    (C, {**OK, "prompt": ["a", "b"], "stream": True}, 400, "prompt", "unsupported_parameter"),
    (C, {**OK, "stop_token_ids": [10**6]}, 400, "stop_token_ids", None),
    (C, {**OK, "prompt": "x" * (100 << 10)}, 413, None, "request_too_large"),
    (CHAT, {**CHAT_OK, "messages": "hi"}, 400, "messages", None),
    (CHAT, {**CHAT_OK, "messages": []}, 400, "messages", None),
    (CHAT, {"model": MODEL}, 400, "messages", None),
    (CHAT, {**CHAT_OK, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
    (CHAT, {**CHAT_OK, "top_logprobs": 2}, 400, "top_logprobs", None),
    (CHAT, {**CHAT_OK, "n": 0}, 400, "n", None),
    (CHAT, {**CHAT_OK, "presence_penalty": -2.1}, 400, "presence_penalty", None),
    (CHAT, {**CHAT_OK, "allowed_token_ids": [10**6]}, 400, "allowed_token_ids", None),
    (CHAT, {**CHAT_OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", None),
    (CHAT, {**CHAT_OK, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages", "unsupported_parameter"),
    (CHAT, {**CHAT_OK, "max_completion_tokens": 10**6}, 400, "max_completion_tokens", "context_length_exceeded"),
    ("/v1/nothing", {}, 404, None, None),
]


def test_bad_input_is_refused_while_a_good_stream_finishes(urls, reference):
    [expected] = reference.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=60,
                                                                         ignore_eos=True), use_tqdm=False)
    got: list[str] = []

    def good() -> None:
        stream = client(urls["main"]).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=60,
                                                         stream=True, **GREEDY)
        got.extend(ch.choices[0].text for ch in stream if ch.choices)
    thread = threading.Thread(target=good)
    thread.start()
    statuses = []
    with httpx.Client(base_url=urls["main"], timeout=60) as http:
        for path, body, status, param, code in BAD:
            r = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], (body, error)
            statuses.append((r.status_code, error["param"] if param else None, error["code"] if code else None))
        assert statuses == [(s, p, c) for _, _, s, p, c in BAD]
        assert http.get("/health").json() == {"status": "ok"}
        assert http.post(C, json=OK).status_code == 200  # and it keeps serving
    thread.join(120)
    assert "".join(got) == expected.text


def test_queue_full_is_503(urls):
    """The "tight" app takes max_num_seqs (8) requests at once: a 9th gets 503 until one ends."""
    async def main() -> None:
        async with httpx.AsyncClient(base_url=urls["tight"], timeout=60) as http, contextlib.AsyncExitStack() as held:
            lines = []  # kept: a dropped line iterator closes its response
            for _ in range(8):
                long = {**OK, "max_tokens": 100, "stream": True, "ignore_eos": True}
                r = await held.enter_async_context(http.stream("POST", C, json=long))
                assert r.status_code == 200
                lines.append(r.aiter_lines())
                await anext(lines[-1])  # admitted and streaming
            busy = await http.post(C, json=OK)
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_full"
        async with httpx.AsyncClient(base_url=urls["tight"], timeout=60) as http:
            for _ in range(200):  # the 8 left: room again once the server has seen them go
                if (r := await http.post(C, json=OK)).status_code != 503:
                    break
                await asyncio.sleep(0.05)
            assert r.status_code == 200
    asyncio.run(main())


def test_api_key_is_enforced(urls):
    url = urls["keyed"]
    assert httpx.get(f"{url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(f"{url}{path}", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert client(url, KEY).completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    assert [m.id for m in client(url, KEY).models.list()] == [MODEL]


def test_models_and_metrics(urls):
    assert httpx.post(f"{urls['main']}{C}", json={**OK, "n": 0}).status_code == 400
    assert httpx.post(f"{urls['main']}{C}", json=OK).status_code == 200
    [card] = httpx.get(f"{urls['main']}/v1/models").json()["data"]
    assert card["id"] == MODEL and card["owned_by"] == "jaxserve" and card["max_model_len"] == 128
    assert card["engine"]["max_num_seqs"] == 8 and card["dtype"] == "float32"
    text = httpx.get(f"{urls['main']}/metrics").text
    for name in ("jaxserve_num_requests_running", "jaxserve_num_requests_waiting", "jaxserve_kv_pages_used",
                 "jaxserve_prompt_tokens_total", "jaxserve_generation_tokens_total"):
        assert f"# TYPE {name} " in text
    m = parse(text)
    for name in ("jaxserve_time_to_first_token_seconds", "jaxserve_time_per_output_token_seconds"):
        assert f"# TYPE {name} histogram" in text and m[f'{name}_count{{model_name="{MODEL}"}}'] > 0
        assert m[f'{name}_bucket{{model_name="{MODEL}",le="+Inf"}}'] == m[f'{name}_count{{model_name="{MODEL}"}}']
    assert m[f'jaxserve_http_errors_total{{model_name="{MODEL}",status="400"}}'] > 0


# ---- pieces without the model ----------------------------------------------------------------


def test_logprobs_shapes():
    body = protocol.parse(protocol.ChatCompletionRequest, b'{"messages": [], "logprobs": true, "top_logprobs": 3}')
    assert protocol.requested_logprobs(body) == (3, "top_logprobs")
    assert protocol.sampling_params(body, 4).logprobs == 3
    plain = protocol.parse(protocol.ChatCompletionRequest, b'{"messages": [], "logprobs": true}')
    assert protocol.sampling_params(plain, 4).logprobs == 0
    text = {5: "a", 6: "bc", 7: "é"}.__getitem__
    entries = [{6: -0.5, 5: -1.0, 7: -2.0}, {7: -3.0, 5: -0.1, 6: float("-inf")}]  # chosen first, then top-k
    chat = protocol.chat_logprobs(entries, 2, text)["content"]
    assert [(c["token"], c["logprob"]) for c in chat] == [("bc", -0.5), ("é", -3.0)]
    assert chat[1]["bytes"] == [0xC3, 0xA9]
    assert [[t["token"] for t in c["top_logprobs"]] for c in chat] == [["bc", "a"], ["a", "é"]]
    legacy = protocol.completion_logprobs(entries, text, 10)
    assert legacy == {"tokens": ["bc", "é"], "token_logprobs": [-0.5, -3.0], "text_offset": [10, 12],
                      "top_logprobs": [{"bc": -0.5, "a": -1.0, "é": -2.0}, {"é": -3.0, "a": -0.1, "bc": -9999.0}]}


def test_sampling_defaults_are_openai_s():
    body = protocol.parse(protocol.CompletionRequest, b'{"prompt": "x", "top_k": 0, "stop": "\\n"}')
    params = protocol.sampling_params(body, 7)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens, params.stop) == (1.0, 1.0, -1, 7, ("\n",))
    assert protocol.max_tokens(None, 10, 128, 16, "max_tokens") == 16
    assert protocol.max_tokens(None, 120, 128, 16, "max_tokens") == 8
    assert protocol.max_tokens(None, 120, 128, None, "max_tokens") == 8


def test_token_times_from_chunks():
    # counted chunks: a burst of 3 shares its chunk's time; an empty-text chunk still counts
    assert token_times([(1.0, 1, True), (2.0, 4, True), (3.0, 5, False)], 5) == (1.0, 2.0, 2.0, 2.0, 3.0)
    # uncounted (one token per chunk with text), the final usage tops up the rest at the last time
    assert token_times([(1.0, None, True), (2.0, None, False), (3.0, None, True)], 3) == (1.0, 3.0, 3.0)
    assert token_times([(1.0, None, True), (2.0, None, True)], None) == (1.0, 2.0)
