"""The server's lifecycle and per-request robustness (issue #31): a submit racing stop() is answered,
a stream whose publishing raises fails alone, Ctrl-C ends open streams with an "abort" chunk and
[DONE], aborted and failed requests keep the text they produced, stop strings are matched on
incrementally detokenized text exactly as on a full decode, and scripts/serve.py's engine flags.

The engine is tiny-llama with SmolLM2's tokenizer: its 256 ids are SmolLM2's special and byte
tokens, so its (random) text is full of multi-byte and incomplete characters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.output_processor import OutputProcessor
from engine.request import Request, Status
from engine_helpers import tiny_llm
from models import load_model
from server.engine_loop import Delta, EngineLoop, Rejected, Stream

ROOT = Path(__file__).parent.parent
PROMPT = [17, 30, 40, 50, 60]
TIMEOUT_S = 60  # generous on a busy 2-core machine; a hang fails instead of blocking the suite


@pytest.fixture(scope="module")
def llm(smollm2) -> LLM:
    return tiny_llm(dataclasses.replace(load_model("tiny-llama"), tokenizer=smollm2.tokenizer), attention_impl="xla")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The event loop the streams post to (run only while a test collects their events)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def sampled(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=7, **kwargs)


def events(stream: Stream, loop: asyncio.AbstractEventLoop, timeout: float = TIMEOUT_S) -> list:
    """The stream's events up to its last (a Rejected, or a Delta with a finish reason); TimeoutError if it hangs."""
    async def collect() -> list:
        out = []
        while not out or not (isinstance(out[-1], Rejected) or getattr(out[-1], "finish_reason", None)):
            out.append(await asyncio.wait_for(stream.events.get(), timeout))
        return out
    return loop.run_until_complete(collect())


def first_delta(stream: Stream, loop: asyncio.AbstractEventLoop) -> list:
    """The stream's events up to its first Delta with tokens (the request is running)."""
    async def collect() -> list:
        out = [await asyncio.wait_for(stream.events.get(), TIMEOUT_S)]
        while not isinstance(out[-1], Delta) or not out[-1].num_tokens:
            out.append(await asyncio.wait_for(stream.events.get(), TIMEOUT_S))
        return out
    return loop.run_until_complete(collect())


class _WatchedInbox:
    """The engine's inbox, watched: `stopping` is set when stop() posts to it. With `late`, a
    request's put first waits (bounded) for the engine thread to end: the interleaving where
    submit() found the engine alive just before stop() ended it."""

    def __init__(self, engine: EngineLoop, late: bool = False):
        self.inbox, self.thread, self.late = engine._inbox, engine._thread, late
        self.putting, self.stopping = threading.Event(), threading.Event()
        engine._inbox = self

    def put(self, item) -> None:
        is_request = isinstance(item, tuple)
        if is_request and item[0] == "add" and self.late:
            self.putting.set()
            self.thread.join(0.5)
        self.inbox.put(item)
        if not is_request:
            self.stopping.set()

    def get(self, *args, **kwargs):
        return self.inbox.get(*args, **kwargs)

    def get_nowait(self):
        return self.inbox.get_nowait()


# ---- 1. submit racing stop ---------------------------------------------------------------------


def test_submit_racing_stop_is_answered(llm, loop):
    """A submit() that found the engine alive while stop() ends it is answered, never left waiting."""
    engine = EngineLoop(llm).start()
    inbox = _WatchedInbox(engine, late=True)
    stream, refused = Stream(PROMPT, sampled(4), loop), []

    def submit() -> None:
        try:
            engine.submit(stream)
        except RuntimeError as e:
            refused.append(e)
    submitter = threading.Thread(target=submit)
    submitter.start()
    assert inbox.putting.wait(TIMEOUT_S)
    engine.stop()
    submitter.join(TIMEOUT_S)
    if not refused:  # accepted into the inbox: it must be answered (admitted and aborted, or refused)
        last = events(stream, loop, timeout=10)[-1]
        assert isinstance(last, Rejected) and last.status == 503 or last.finish_reason == "abort"
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit(Stream(PROMPT, sampled(4), loop))


# ---- 2. a stream whose publishing raises -------------------------------------------------------


def test_a_stream_whose_publishing_raises_fails_alone(llm, loop, monkeypatch):
    """Its text raising on the engine thread ends that stream with "error"; the engine and the other go on."""
    bad, good = Stream(PROMPT, sampled(8), loop), Stream(PROMPT, sampled(12), loop)
    stream_text = llm.processor.stream_text

    def failing(request: Request) -> str:
        if request is bad.request:
            raise RuntimeError("detokenizer broke")
        return stream_text(request)
    monkeypatch.setattr(llm.processor, "stream_text", failing)
    engine = EngineLoop(llm).start()
    try:
        engine.submit(bad)
        engine.submit(good)
        bad_last, good_last = events(bad, loop)[-1], events(good, loop)[-1]
        assert bad_last.finish_reason == "error" and "detokenizer broke" in bad_last.error
        assert good_last.finish_reason == "length" and good_last.num_tokens == 12
        assert engine.alive and not llm.has_unfinished()
    finally:
        engine.stop()


# ---- 3. Ctrl-C under open streams --------------------------------------------------------------


@contextlib.contextmanager
def serving(tmp_path: Path, *runs: tuple[str, ...]) -> Iterator[list[tuple[subprocess.Popen, str]]]:
    """scripts/serve.py on tiny-llama and a free port, one process per flag tuple (started together):
    each process and its URL; Ctrl-C on exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "JAXSERVE_XLA_CACHE": "off"}
    servers = []
    for i, flags in enumerate(runs):
        with open(tmp_path / f"serve{i}.log", "w") as log:
            servers.append(subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--model=tiny-llama",
                                             "--port=0", "--max_num_seqs=2", "--attention_impl=xla", *flags],
                                            stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp_path, env=env))
    watchdogs = [threading.Timer(120, server.kill) for server in servers]
    for watchdog in watchdogs:
        watchdog.start()
    try:
        urls = [re.search(r"http://127\.0\.0\.1:\d+", server.stdout.readline()) for server in servers]
        for i, url in enumerate(urls):
            assert url, f"serve.py did not start; log:\n{(tmp_path / f'serve{i}.log').read_text()[-3000:]}"
        yield [(server, url[0]) for server, url in zip(servers, urls)]
    finally:
        for server in servers:
            if server.poll() is None:
                server.send_signal(signal.SIGINT)
        for server, watchdog in zip(servers, watchdogs):
            server.wait(TIMEOUT_S)
            watchdog.cancel()


def test_ctrl_c_ends_open_streams_with_an_abort_chunk(tmp_path):
    """Ctrl-C once the stream's headers are in (its request admitted; tiny-llama would finish 500
    tokens before the signal lands otherwise): the stream still ends with a chunk and [DONE]."""
    body = {"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": True}
    lines = []
    with serving(tmp_path, ("--max_model_len=512", "--graceful_shutdown_s=0")) as [(server, url)]:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT_S) as response:
            server.send_signal(signal.SIGINT)
            with contextlib.suppress(httpx.HTTPError):  # a connection cut mid-stream
                lines = [line for line in response.iter_lines() if line]
    assert server.returncode == 0
    assert lines[-1:] == ["data: [DONE]"], lines[-3:]
    last = json.loads(lines[-2].removeprefix("data: "))["choices"][0]
    assert last["finish_reason"] == "abort"


# ---- 4. aborted and failed requests keep their text --------------------------------------------


def test_aborted_and_failed_requests_keep_their_text(llm, monkeypatch):
    """LLM.abort and a failed step leave a request's output the text of the tokens it had."""
    decode = llm.model.tokenizer.decode
    aborted = llm.add_request(PROMPT, sampled(60, stop=("never-seen",)))
    failed = llm.add_request(PROMPT, sampled(60))
    while len(aborted.output_token_ids) < 12:
        llm.step()
    llm.abort(aborted.request_id)

    def broken(*args) -> None:
        raise RuntimeError("device lost")
    monkeypatch.setattr(llm, "_run", broken)
    llm.step()
    for request, reason in ((aborted, "abort"), (failed, "error")):
        out = request.output()
        assert out.finish_reason == reason and len(out.token_ids) >= 12
        assert out.text and out.text == decode(out.token_ids)


def test_stop_ends_open_streams_with_all_their_text(llm, loop, monkeypatch):
    """stop() ends each open stream with "abort" and the text it held back (for a stop string, a
    character's next byte): its deltas add up to the request's text."""
    streams = [Stream(PROMPT, sampled(100, stop=("never-seen",)), loop), Stream(PROMPT, sampled(100), loop)]
    engine = EngineLoop(llm).start()
    inbox, step = _WatchedInbox(engine), llm.step

    def held_step() -> list[Request]:
        """Once every stream has tokens, the next step waits for stop(): the streams are open then."""
        if all(s.request is not None and s.request.output_token_ids for s in streams):
            inbox.stopping.wait(TIMEOUT_S)
        return step()
    monkeypatch.setattr(llm, "step", held_step)
    try:
        for stream in streams:
            engine.submit(stream)
        seen = [first_delta(stream, loop) for stream in streams]
    finally:
        engine.stop()
    for stream, before in zip(streams, seen):
        deltas = [e for e in before + events(stream, loop) if isinstance(e, Delta)]
        out = stream.request.output()
        assert deltas[-1].finish_reason == "abort" and deltas[-1].num_tokens == len(out.token_ids) < 100
        assert "".join(d.text for d in deltas) == out.text == llm.model.tokenizer.decode(out.token_ids)


# ---- 5. incremental stop strings ---------------------------------------------------------------


class _WindowedTokenizer:
    """A tokenizer that records how many ids each decode call is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_token_ids, self.windows = tokenizer, tokenizer.eos_token_ids, []

    def decode(self, ids, **kwargs) -> str:
        self.windows.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def run_processor(tokenizer, ids: list[int], stop: tuple[str, ...]) -> list[tuple[str | None, str, str]]:
    """Append `ids` one by one through the OutputProcessor: per token (reason, text, stream text)."""
    processor = OutputProcessor(None, tokenizer)
    request = Request(0, [1], SamplingParams(max_tokens=len(ids), stop=stop, ignore_eos=True), 0, 1 + len(ids))
    steps = []
    for token in ids:
        reason = processor._append(request, token, 0.0)
        if reason:
            request.status = Status.FINISHED
        steps.append((reason, request.text, processor.stream_text(request)))
        if reason:
            break
    return steps


def full_decode_reference(tokenizer, ids: list[int], stop: tuple[str, ...]) -> list[tuple[str | None, str, str]]:
    """The same from a full decode of every prefix (the old, quadratic stop-string matching)."""
    steps, hold = [], max(map(len, stop), default=1) - 1
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        reason = "stop" if hits else ("length" if n == len(ids) else None)
        text = text[:min(hits)] if hits else text
        shown = text if reason else text[:max(0, len(text) - hold)]
        steps.append((reason, text, shown.rstrip("\ufffd")))
        if reason:
            break
    return steps


def random_ids(rng: np.random.Generator, tokenizer, n: int) -> list[int]:
    """n ids drawn from: words and multi-byte characters (whole, or split over byte tokens), byte tokens
    (SmolLM2's ids 17-272: incomplete and invalid UTF-8), special tokens (0-16) and any id."""
    words = [tokenizer.encode(s) for s in ("héllo", " wörld", "日本語", " 🙂👍", " the", "\n", "ß€", "ab", " Ωμέγα")]
    draws = (lambda: words[rng.integers(len(words))], lambda: [int(rng.integers(17, 273))],
             lambda: [int(rng.integers(17))], lambda: [int(rng.integers(tokenizer.vocab_size))])
    ids = []
    while len(ids) < n:
        ids += draws[rng.choice(4, p=[0.35, 0.3, 0.05, 0.3])]()
    return ids[:n]


def random_stops(rng: np.random.Generator, text: str) -> tuple[str, ...]:
    """None, one that never matches, or up to 3 substrings of `text` (1-6 characters, U+FFFD too)."""
    kind = rng.integers(3)
    if kind < 2:
        return ("§never§",) * kind
    starts = rng.integers(len(text) + 1, size=rng.integers(1, 4))
    return tuple(text[i:i + rng.integers(1, 7)] for i in starts if i < len(text)) or ("§never§",)


def test_incremental_stop_strings_equal_a_full_decode(smollm2):
    """Per token, the finish reason, the text and the stream's text equal a full decode's."""
    tokenizer, rng = smollm2.tokenizer, np.random.default_rng(0)
    for _ in range(150):
        ids = random_ids(rng, tokenizer, int(rng.integers(1, 60)))
        stop = random_stops(rng, tokenizer.decode(ids))
        assert run_processor(tokenizer, ids, stop) == full_decode_reference(tokenizer, ids, stop), (ids, stop)


def test_stop_strings_decode_only_new_tokens(smollm2):
    """Each token decodes a few ids (the new one and the window before it), not the whole output."""
    tokenizer = _WindowedTokenizer(smollm2.tokenizer)
    ids = smollm2.tokenizer.encode("Ünïcödé text, 日本語 and emoji 🙂👍 repeated. " * 20)
    steps = run_processor(tokenizer, ids, ("§never§",))
    assert len(steps) == len(ids) > 300 and steps[-1][1] == smollm2.tokenizer.decode(ids)
    assert max(tokenizer.windows) <= 8, max(tokenizer.windows)


# ---- 6. scripts/serve.py's engine flags --------------------------------------------------------


def test_serve_flags_speculation_prefix_caching_and_context_from_the_kv_pool(tmp_path):
    """--speculative_config and --enable_prefix_caching reach the engine; --max_model_len defaults to
    the model's context (tiny-llama: 512), cut to what the KV pool holds (20 pages: 19 * 16 tokens)."""
    twenty_pages = 20 * 16 * 2 * 2 * 2 * 16 * 4  # pages x tokens x layers x (K, V) x kv heads x head_dim x float32
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
    runs = (f"--speculative_config={spec}", "--noenable_prefix_caching", f"--kv_cache_bytes={twenty_pages}"), ()
    with serving(tmp_path, *runs) as servers:
        small, large = (httpx.get(f"{url}/v1/models", timeout=TIMEOUT_S).json()["data"][0] for _, url in servers)
    assert small["engine"]["num_speculative_tokens"] == 3 and small["engine"]["enable_prefix_caching"] is False
    assert small["max_model_len"] == small["engine"]["max_model_len"] == 19 * 16
    assert large["engine"]["num_speculative_tokens"] == 0 and large["engine"]["enable_prefix_caching"] is True
    assert large["max_model_len"] == 512
