"""/v1/completions as lm-evaluation-harness and vLLM clients use it (issue #31 item 1), over HTTP:
prompts as a string, strings, token ids or lists of them (one choice each); `echo` with `logprobs`
(the prompt's tokens first, the first with null logprob and top_logprobs, then the generated ones)
and `max_tokens: 0` to score a prompt; vLLM's `prompt_logprobs`; unknown fields refused by name;
`max_completion_tokens` and `seed` errors naming their field; tokenization and chat templates off
the event loop.

Echo and prompt logprobs are checked against the engine's own LLM.generate(prompt_logprobs=k,
logprobs=k) and against a float64 log-softmax of the model's no-cache forward (1e-4), also for a
prompt whose pages the prefix cache holds. One SmolLM2 engine (decode_steps=1, an 8-token budget)
serves one app on a free 127.0.0.1 port; tests/test_server.py covers the rest of the server.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from engine import LLM, SamplingParams
from server import protocol
from server.app import create_app, serving
from server.engine_loop import EngineLoop
from server.metrics import ServerMetrics, parse

MODEL = "smollm2"
ENGINE = dict(page_size=16, max_model_len=128, max_num_seqs=8, prefill_chunk=8, max_num_batched_tokens=8,
              decode_steps=1, attention_impl="xla")
TOL = 1e-4  # against the float64 no-cache forward
SAME = 1e-5  # against LLM.generate (the same compiled steps)
C, CHAT = "/v1/completions", "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONTEXT = "Question: What is the capital of France? Answer:"


def metrics(url: str) -> dict[str, float]:
    """The unlabelled view of /metrics: {name: value} for this one model."""
    return {k.replace(f'{{model_name="{MODEL}"}}', ""): v for k, v in parse(httpx.get(f"{url}/metrics").text).items()}


class Served:
    def __init__(self, url: str, llm: LLM):
        self.url, self.llm = url, llm

    def post(self, body: dict, path: str = C, timeout: float = 120) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=timeout)

    def ok(self, body: dict, path: str = C) -> dict:
        r = self.post(body, path)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def server(smollm2):
    llm = LLM(smollm2, **ENGINE)
    engine = EngineLoop(llm, ServerMetrics(MODEL, llm.config.num_pages)).start()
    try:
        with serving(create_app(engine, model_name=MODEL)) as url:
            yield Served(url, llm)
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def reference(smollm2) -> LLM:
    return LLM(smollm2, **ENGINE)


@pytest.fixture(scope="module")
def forward(smollm2):
    """float64 log-softmax [T, V] of the no-cache forward over ids (rows padded to one length: one compile)."""
    def logprobs(ids: list[int]) -> np.ndarray:
        row = np.zeros((1, ENGINE["max_model_len"]), np.int32)
        row[0, :len(ids)] = ids
        logits = np.asarray(smollm2.forward(row))[0, :len(ids)].astype(np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return logprobs


@pytest.fixture(scope="module")
def text(smollm2):
    return lambda t: smollm2.tokenizer.decode([t], skip_special_tokens=False)


def check_echo_logprobs(lp: dict, ids: list[int], ref: np.ndarray, text, k: int) -> None:
    """The echoed prompt part of completion logprobs against the forward's log-softmax `ref` over ids."""
    n = len(ids)
    assert lp["tokens"][:n] == [text(t) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:n], [ref[i - 1, ids[i]] for i in range(1, n)], atol=TOL)
    for i in range(1, n):
        top = lp["top_logprobs"][i]
        want = {text(ids[i])} | {text(int(t)) for t in np.argsort(-ref[i - 1])[:k]}
        assert set(top) == want, (i, top, want)
        for t in {ids[i], *np.argsort(-ref[i - 1])[:k].tolist()}:
            assert abs(top[text(t)] - ref[i - 1, t]) < TOL
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(lp["tokens"]))]


# ---- echo, logprobs and prompts ----------------------------------------------------------------


def test_lm_eval_loglikelihood_batch(server, reference, forward, text, smollm2):
    """lm-eval's local-completions loglikelihood request: a batch of token-id prompts, echo, logprobs=1,
    max_tokens=1, temperature 0, seed. Its arithmetic (sum of token_logprobs over the continuation,
    greedy when each equals the max of its top_logprobs) gives the forward's numbers."""
    context = smollm2.tokenizer.encode(CONTEXT)
    [greedy] = reference.generate([context], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                                  use_tqdm=False)
    continuations = [greedy.token_ids, smollm2.tokenizer.encode(" Berlin, Germany")]
    prompts = [context + c for c in continuations]
    out = server.ok({"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
                     "seed": 1234, "echo": True})
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"]["prompt_tokens"] == sum(map(len, prompts)) and out["usage"]["completion_tokens"] == 2

    expected = reference.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, logprobs=1,
                                                          prompt_logprobs=1), use_tqdm=False)
    greedy_flags = []
    for choice, prompt, cont, want in zip(out["choices"], prompts, continuations, expected):
        lp, ref = choice["logprobs"], forward(prompt)
        assert len(lp["tokens"]) == len(prompt) + 1 and choice["finish_reason"] in ("length", "stop")
        check_echo_logprobs(lp, prompt, ref, text, 1)
        generated = want.token_ids[0]
        assert generated == int(ref[-1].argmax()) and lp["tokens"][-1] == text(generated)
        assert abs(lp["token_logprobs"][-1] - ref[-1, generated]) < TOL
        assert choice["text"] == smollm2.tokenizer.decode(prompt, skip_special_tokens=False) + want.text
        # the engine's own prompt logprobs, to the compiled steps' precision
        np.testing.assert_allclose(lp["token_logprobs"][1:-1],
                                   [e[t] for t, e in zip(prompt[1:], want.prompt_logprobs[1:])], atol=SAME)
        # lm_eval/models/openai_completions.py parse_logprobs
        ctxlen = len(context)
        total = sum(lp["token_logprobs"][ctxlen:-1])
        is_greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                                  lp["top_logprobs"][ctxlen:-1]))
        assert abs(total - sum(ref[ctxlen + i - 1, t] for i, t in enumerate(cont))) < TOL * len(cont)
        assert is_greedy == all(int(ref[ctxlen + i - 1].argmax()) == t for i, t in enumerate(cont))
        greedy_flags.append(is_greedy)
    assert greedy_flags == [True, False]


def test_echo_through_the_openai_client(server, reference, forward, text):
    """A string prompt, echo, logprobs=2, three generated tokens, streamed and not: the prompt's
    text and logprobs, then the generated ones, as generate gives them."""
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
    prompt, k = "The capital of France is", 2
    [want] = reference.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                                                         logprobs=k, prompt_logprobs=k), use_tqdm=False)
    ids = want.prompt_token_ids
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=k, echo=True,
                             extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert choice.text == prompt + want.text and r.usage.completion_tokens == 3
    lp = choice.logprobs.model_dump()
    check_echo_logprobs(lp, ids, forward(ids + want.token_ids), text, k)
    assert lp["tokens"][len(ids):] == [text(t) for t in want.token_ids]
    np.testing.assert_allclose(lp["token_logprobs"][len(ids):], [e[t] for t, e in zip(want.token_ids, want.logprobs)],
                               atol=SAME)
    assert [list(d) for d in lp["top_logprobs"][len(ids):]] == [[text(t) for t in e] for e in want.logprobs]

    chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=k,
                                       echo=True, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].text.startswith(prompt)
    assert "".join(ch.choices[0].text for ch in chunks) == choice.text
    streamed = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for s in streamed for x in getattr(s, key)] == lp[key], key

    plain = c.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                 extra_body={"ignore_eos": True}).choices[0]
    assert plain.text == prompt + want.text and plain.logprobs is None


def test_echo_max_tokens_0_scores_the_prompt(server, forward, text, smollm2):
    """max_tokens=0 with echo: the prompt alone (text, logprobs), nothing generated; without echo, a 400."""
    ids = smollm2.tokenizer.encode(CONTEXT)
    out = server.ok({"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    [choice] = out["choices"]
    assert choice["text"] == CONTEXT and out["usage"] == protocol.usage(len(ids), 0)
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    check_echo_logprobs(choice["logprobs"], ids, forward(ids), text, 0)
    assert choice["finish_reason"] in ("length", "stop")

    events = server.post({"model": MODEL, "prompt": CONTEXT, "max_tokens": 0, "echo": True, "stream": True})
    chunks = [json.loads(line[6:]) for line in events.text.splitlines() if line.startswith("data: {")]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == CONTEXT

    r = server.post({"model": MODEL, "prompt": CONTEXT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_prompt_batches_are_one_choice_each(server, reference):
    """A list of strings and a list of id lists: one choice per prompt, index in prompt order, each
    generate's; usage sums them. lm-eval's generate_until payload (strings, stop, seed) included."""
    prompts = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
    expected = reference.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                                  use_tqdm=False)
    for batch in (prompts, [e.prompt_token_ids for e in expected]):
        out = server.ok({"model": MODEL, "prompt": batch, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
        assert [(c["index"], c["text"]) for c in out["choices"]] == [(i, e.text) for i, e in enumerate(expected)]
        assert out["usage"] == protocol.usage(sum(len(e.prompt_token_ids) for e in expected), 15)
    lm_eval = server.ok({"prompt": prompts, "model": MODEL, "max_tokens": 5, "temperature": 0, "stop": ["\n\n"],
                         "seed": 1234})
    assert [c["text"] for c in lm_eval["choices"]] == [e.text.split("\n\n")[0] for e in expected]
    r = server.post({"model": MODEL, "prompt": prompts, "max_tokens": 2, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = server.post({"model": MODEL, "prompt": ["fine", [1, 2]], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    for batch in (["fine", ""], [[1, 2], [10**6]]):  # one bad prompt (empty; outside the vocabulary) refuses all
        r = server.post({"model": MODEL, "prompt": batch, "max_tokens": 2})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "prompt" and error["message"].startswith("prompt 1"), error
    deadline = time.monotonic() + 30  # the refused batch's admitted prompt was aborted: nothing left running
    while (held := metrics(server.url))["jaxserve_kv_pages_used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held["jaxserve_kv_pages_used"] == 0 and held["jaxserve_num_requests_running"] == 0


def test_prompt_logprobs_field(server, reference, text):
    """vLLM's prompt_logprobs: each choice's prompt_logprobs, [null, {"id": {logprob, rank,
    decoded_token}}, ...]; with echo and logprobs=1 the echoed top_logprobs keep the token and its
    top-1 (vLLM); refused with stream=true (as vLLM)."""
    prompt, k = "The capital of France is", 3
    [want] = reference.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True,
                                                         prompt_logprobs=k), use_tqdm=False)
    ids = want.prompt_token_ids
    out = server.ok({"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True,
                     "prompt_logprobs": k})
    [choice] = out["choices"]
    assert choice["logprobs"] is None and choice["text"] == want.text
    got = choice["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    for i in range(1, len(ids)):
        entry, engine = got[i], want.prompt_logprobs[i]
        assert list(entry) == [str(t) for t in engine]
        np.testing.assert_allclose([v["logprob"] for v in entry.values()], list(engine.values()), atol=SAME)
        assert all(v["decoded_token"] == text(int(t)) for t, v in entry.items())
        top = sorted((t for t in engine if t != ids[i] or len(engine) == k), key=lambda t: -engine[t])
        assert [entry[str(t)]["rank"] for t in top] == list(range(1, k + 1))
        if len(engine) > k:  # the prompt token is outside the top k: its rank is not known here
            assert entry[str(ids[i])]["rank"] is None

    echoed = server.ok({"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True,
                        "logprobs": 1, "prompt_logprobs": k})["choices"][0]
    assert len(echoed["prompt_logprobs"][1]) >= k
    assert all(len(top) <= 2 for top in echoed["logprobs"]["top_logprobs"][1:])
    assert server.ok({"model": MODEL, "prompt": "hi", "max_tokens": 1})["choices"][0]["prompt_logprobs"] is None
    for bad in ({"stream": True}, {"prompt_logprobs": 21}, {"prompt_logprobs": -1}):
        r = server.post({"model": MODEL, "prompt": prompt, "max_tokens": 2, "prompt_logprobs": k, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text


def test_echo_of_a_prefix_cached_prompt(server, forward, text, smollm2):
    """A prompt whose leading pages the prefix cache holds (a plain request served them first): the
    echo request recomputes the whole prompt (no cache hit) and its logprobs are the forward's; the
    plain request after it hits the cache again."""
    ids = smollm2.tokenizer.encode(" ".join(CONTEXT.replace("France", c) + f" {a}." for c, a in
                                            [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid")]))
    assert len(ids) > 2 * ENGINE["page_size"]
    stats = server.llm.prefix_cache.stats
    server.ok({"model": MODEL, "prompt": ids, "max_tokens": 1})
    before = stats.hits
    server.ok({"model": MODEL, "prompt": ids, "max_tokens": 1})
    assert stats.hits > before  # the pages are cached
    before = stats.hits
    out = server.ok({"model": MODEL, "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1})
    assert stats.hits == before
    check_echo_logprobs(out["choices"][0]["logprobs"], ids, forward(ids), text, 1)
    server.ok({"model": MODEL, "prompt": ids, "max_tokens": 1})
    assert stats.hits > before


# ---- fields --------------------------------------------------------------------------------------

OK = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
CHAT_OK = {"model": MODEL, "messages": QUESTION, "max_tokens": 1}
UNKNOWN = [  # path, body, the param the 400 names
    (C, {**OK, "foo": 1}, "foo"),
    (C, {**OK, "metadata": {"a": "b"}}, "metadata"),  # not a completions field
    (C, {**OK, "stream": True, "stream_options": {"include_usage": True, "extra": 1}}, "stream_options"),
    (CHAT, {**CHAT_OK, "reasoning_effort": "high"}, "reasoning_effort"),
    (CHAT, {**CHAT_OK, "chat_template_kwargs": {}}, "chat_template_kwargs"),
    (CHAT, {**CHAT_OK, "echo": True}, "echo"),
    (CHAT, {**CHAT_OK, "messages": [{"role": "user", "content": "hi", "weird": 1}]}, "messages"),
    (CHAT, {**CHAT_OK, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "weird": 1}]}]},
     "messages"),
]
HARMLESS = [  # documented OpenAI fields with no effect here, and what clients send
    (C, {**OK, "user": "someone", "echo": False, "suffix": "", "logit_bias": {}}),
    (C, {**OK, "stream": True, "stream_options": {"include_usage": True}}),
    (CHAT, {**CHAT_OK, "user": "u", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
            "parallel_tool_calls": True, "function_call": "none"}),
    (CHAT, {**CHAT_OK, "messages": [{"role": "user", "content": "hi", "name": "alice"}]}),
]


@pytest.mark.parametrize("path,body,param", UNKNOWN)
def test_unknown_fields_are_refused_by_name(server, path, body, param):
    r = server.post(body, path)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == "unknown_parameter"
    assert [k for k in ("foo", "metadata", "extra", "reasoning_effort", "chat_template_kwargs", "echo", "weird")
            if k in json.dumps(body)][0] in error["message"]


@pytest.mark.parametrize("path,body", HARMLESS)
def test_harmless_fields_are_accepted(server, path, body):
    assert server.post(body, path).status_code == 200


@pytest.mark.parametrize("value", [0, -3])
def test_max_completion_tokens_error_names_it(server, value):
    r = server.post({**CHAT_OK, "max_completion_tokens": value}, CHAT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens", r.text
    assert "max_completion_tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize("path,body", [(C, OK), (CHAT, CHAT_OK)])
def test_seed_out_of_range_is_a_400_naming_it(server, path, body):
    for seed in (-1, 2**32, 2**63, 10**30):
        r = server.post({**body, "seed": seed}, path)
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", (seed, r.text)
    assert server.post({**body, "seed": 2**32 - 1}, path).status_code == 200


# ---- the event loop ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [C, CHAT])
def test_tokenizing_a_prompt_does_not_block_the_event_loop(server, smollm2, monkeypatch, path):
    """While one request's prompt is being tokenized (or its chat template rendered), held here on an
    event, /health answers and another request completes."""
    tokenizer = smollm2.tokenizer
    entered, release = threading.Event(), threading.Event()

    def held(original):
        def call(arg, *args, **kwargs):
            if "SLOW" in json.dumps(arg):
                entered.set()
                release.wait(60)
            return original(arg, *args, **kwargs)
        return call
    monkeypatch.setattr(tokenizer, "encode", held(tokenizer.encode))
    monkeypatch.setattr(tokenizer, "apply_chat_template", held(tokenizer.apply_chat_template))
    slow_body = ({**OK, "prompt": "SLOW " * 20} if path == C
                 else {**CHAT_OK, "messages": [{"role": "user", "content": "SLOW"}]})
    slow: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: slow.append(server.post(slow_body, path)))
    thread.start()
    try:
        assert entered.wait(30)
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        assert server.post(OK, timeout=30).status_code == 200
        assert server.post(CHAT_OK, CHAT, timeout=30).status_code == 200
        assert thread.is_alive()  # still held
    finally:
        release.set()
        thread.join(60)
    assert slow[0].status_code == 200


# ---- pieces without the model --------------------------------------------------------------------


def test_completion_prompts_shapes():
    assert protocol.completion_prompts("a") == ["a"]
    assert protocol.completion_prompts(["a", "b"]) == ["a", "b"]
    assert protocol.completion_prompts([1, 2]) == [[1, 2]]
    assert protocol.completion_prompts([[1, 2], [3]]) == [[1, 2], [3]]
    assert protocol.completion_prompts([]) == [[]]  # one empty prompt: the engine refuses it
    for bad in (5, [1, True], ["a", [1]], [[1], [2.0]], None, [None]):
        with pytest.raises(protocol.APIError) as e:
            protocol.completion_prompts(bad)
        assert e.value.param == "prompt"


def test_echo_logprobs_shape():
    text = {5: "a", 6: "bc", 7: "é"}.__getitem__
    entries = [None, {6: -0.5, 5: -1.0, 7: -2.0}, {7: -3.0, 5: -0.1, 6: float("-inf")}]
    out = protocol.completion_logprobs(entries, text, token_ids=[5, 6, 7], top=1)
    assert out == {"tokens": ["a", "bc", "é"], "token_logprobs": [None, -0.5, -3.0], "text_offset": [0, 1, 3],
                   "top_logprobs": [None, {"bc": -0.5, "a": -1.0}, {"é": -3.0, "a": -0.1}]}
    vllm = protocol.prompt_logprobs_body([None, {6: -0.5, 5: -1.0}, {7: -3.0, 5: -0.1, 6: float("-inf")}], 2, text)
    assert vllm == [None,
                    {"6": {"logprob": -0.5, "rank": 1, "decoded_token": "bc"},
                     "5": {"logprob": -1.0, "rank": 2, "decoded_token": "a"}},
                    {"7": {"logprob": -3.0, "rank": None, "decoded_token": "é"},
                     "5": {"logprob": -0.1, "rank": 1, "decoded_token": "a"},
                     "6": {"logprob": -9999.0, "rank": 2, "decoded_token": "bc"}}]
