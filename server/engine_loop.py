"""The engine thread: the one owner of the LLM (which is not thread-safe).

HTTP handlers run on the asyncio event loop. They hand requests over through a thread-safe inbox
(`submit`, `abort`) and receive each request's events on its own asyncio.Queue, filled from the
engine thread with `loop.call_soon_threadsafe`, so the event loop never blocks on the engine. The
thread steps while work exists and sleeps on the inbox when there is none; between steps it
admits new requests (`LLM.add_sequences`, whose ValueError becomes a `Rejected` event) and applies
aborts (`LLM.abort`: pages freed at once).

A prompt's n (or best_of) sequences are one stream each, submitted and added together (one
prefill: engine/parallel_sampling.py). A stream's events: `Accepted` or `Rejected` first, then
`Delta`s; the last Delta carries the finish reason ("stop", "length", "abort" or "error") and the
rest of the sequence's text. Every submitted stream gets its last event: submit() after (or racing)
stop() either raises or is answered by the thread's last drain, a stream whose publishing raises
ends with "error" alone, and stop() ends every open stream with "abort".
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
import time

from absl import logging

from engine.llm import LLM
from engine.parallel_sampling import num_sequences
from engine.request import Request, SamplingParams, Status
from engine.sleep_mode import EngineAsleepError
from server.engine_ops import EngineOp
from server.metrics import ServerMetrics


@dataclasses.dataclass(frozen=True)
class Accepted:
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Rejected:
    message: str
    status: int = 400  # 503 when the server is shutting down


@dataclasses.dataclass(frozen=True)
class Delta:
    """New text since the previous delta, the output tokens so far, the new tokens' logprobs (when
    the request asks for them), and on the last one why it ended."""

    text: str
    num_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[dict[int, float]] | None = None
    token_ids: tuple[int, ...] = ()  # the new output tokens


class Stream:
    """One sequence as both threads see it: the handler awaits `events`; the engine thread fills it.
    A prompt with n (or best_of) > 1 has one stream per sequence, `index` its place among them."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 index: int = 0):
        self.prompt_ids, self.params, self.loop, self.index = prompt_ids, params, loop, index
        self.events: asyncio.Queue = asyncio.Queue()
        self.received = time.perf_counter()
        self.finished = False  # the handler saw the last delta
        self.released = False  # the handler let go of it (server/app.py)
        # Engine thread only:
        self.request: Request | None = None
        self.text_sent = 0
        self.tokens_sent = 0

    def post(self, event: Accepted | Rejected | Delta) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


_STOP = object()


class EngineLoop:
    """Runs `llm` on a background thread; submit/abort are safe from any thread."""

    def __init__(self, llm: LLM, metrics: ServerMetrics | None = None, idle_wait_s: float = 0.5):
        self.llm = llm
        self.metrics = metrics or ServerMetrics("model", llm.config.num_pages)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[int, Stream] = {}  # request_id -> stream (engine thread only)
        self._idle_wait_s = idle_wait_s
        self._closed = False
        self._ops: collections.deque[EngineOp] = collections.deque()  # engine operations, in order (engine thread)
        self._held: list[tuple[Stream, ...]] = []  # prompts submitted while an operation waits: admitted after it
        self._lock = threading.Lock()  # orders submit()'s put against closing: nothing enters a closed inbox
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 60) -> None:
        """Finish the current step, abort every request (their streams end with "abort"), join."""
        self._close()
        self._inbox.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, *streams: Stream) -> None:
        """Hand one prompt's streams (one per sequence, in index order: engine/parallel_sampling.py)
        to the engine thread; RuntimeError once it stopped (or is stopping)."""
        if len(streams) != num_sequences(streams[0].params):
            raise ValueError(f"{len(streams)} streams for {num_sequences(streams[0].params)} sequences")
        with self._lock:
            if not self.alive:
                raise RuntimeError("the engine is not running")
            self._inbox.put(("add", streams))

    def run_op(self, op: EngineOp) -> None:
        """Queue an operation on the engine (server/engine_ops.py); RuntimeError once it stopped."""
        with self._lock:
            if not self.alive:
                raise RuntimeError("the engine is not running")
            self._inbox.put(("op", op))

    def abort(self, stream: Stream) -> None:
        """Abort the stream's sequence (a no-op once it finished). Safe after stop()."""
        self._inbox.put(("abort", stream))

    def _close(self) -> None:
        """Refuse every later submit(): what the inbox holds now is all it will ever hold."""
        with self._lock:
            self._closed = True

    # ---- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._drain(block=not self.llm.has_unfinished() and not self._ops):
                if self.llm.has_unfinished():
                    self._step()
                self._run_ops()
        except BaseException as e:  # noqa: BLE001 (a bug here must not leave clients waiting forever)
            logging.exception("the engine thread failed")
            self._shut_down(f"the engine failed: {type(e).__name__}: {e}")
            raise
        self._shut_down("the server is shutting down")

    def _drain(self, block: bool) -> bool:
        """Apply everything in the inbox (waiting for the first item when `block`); False on stop."""
        try:
            item = self._inbox.get(timeout=self._idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return not self._closed
        while True:
            if item is _STOP:
                return False
            kind, payload = item  # "add": one prompt's streams; "abort": one stream; "op": an EngineOp
            if kind == "op":
                self._ops.append(payload)
            elif kind == "add":
                self._held.append(payload) if self._ops else self._add(payload)
            else:
                self._abort(payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._publish_state()
        return True

    def _add(self, streams: tuple[Stream, ...]) -> None:
        """Add one prompt's sequences (its prompt tokens counted once), or refuse them all."""
        prompt_ids, params = streams[0].prompt_ids, streams[0].params
        try:
            requests = self.llm.add_sequences(prompt_ids, params)
        except (ValueError, EngineAsleepError) as e:
            for stream in streams:
                stream.post(Rejected(str(e), status=503 if isinstance(e, EngineAsleepError) else 400))
            return
        self.metrics.admitted(len(prompt_ids))
        for stream, request in zip(streams, requests):
            stream.request = request
            self._active[request.request_id] = stream
            stream.post(Accepted(len(prompt_ids)))

    def _abort(self, stream: Stream) -> None:
        request = stream.request
        if request is None:  # held back by an engine operation (its client left), or rejected
            self._held = [streams for streams in self._held if stream not in streams]
            return
        if request.request_id not in self._active:
            return  # already finished (its last delta is out)
        self._end_safely(stream, "abort")

    def _run_ops(self) -> None:
        """Advance the queued operations: the first one's prepare (then with running="abort" every
        open stream ends), its apply once no request is unfinished, and so on; the prompts held
        meanwhile are admitted once the queue is empty."""
        if not self._ops and not self._held:
            return
        while self._ops:
            op = self._ops[0]
            if op.prepare_s is None:
                if not op.start(self.llm):
                    self._ops.popleft()
                    continue
                if op.running == "abort":
                    for stream in list(self._active.values()):
                        self._end_safely(stream, "abort", f"aborted by {op.name}")
            if op.running is not None and self.llm.has_unfinished():
                return
            self._ops.popleft().finish(self.llm)
        held, self._held = self._held, []
        for streams in held:
            self._add(streams)
        self._publish_state()

    def _step(self) -> None:
        try:
            self.llm.step()
        except Exception as e:  # noqa: BLE001 (LLM.step contains step failures; this is a last resort)
            logging.exception("engine step raised")
            for stream in list(self._active.values()):
                self._end_safely(stream, "error", f"{type(e).__name__}: {e}")
        for stream in list(self._active.values()):
            try:
                self._publish(stream)
            except Exception as e:  # noqa: BLE001 (one stream failing, e.g. its detokenizing, must not stop the rest)
                logging.exception("publishing request %d failed", stream.request.request_id)
                self._end_safely(stream, "error", f"{type(e).__name__}: {e}")
        self._publish_state()

    def _publish(self, stream: Stream) -> None:
        """Post the stream's new text and tokens, if any, and its end when it finished."""
        request = stream.request
        if request.status is Status.FINISHED:
            self._end(stream, request.finish_reason, request.error)
        elif len(request.output_token_ids) > stream.tokens_sent:
            stream.post(self._delta(stream, self.llm.processor.stream_text(request)))

    def _delta(self, stream: Stream, text: str, finish_reason: str | None = None,
               error: str | None = None) -> Delta:
        """A delta of what `text` and the request's tokens hold past what the stream has sent (counted as sent)."""
        request = stream.request
        n = len(request.output_token_ids)
        delta = text[stream.text_sent:]
        stream.text_sent = max(stream.text_sent, len(text))
        first = stream.tokens_sent == 0 and n > 0
        ttft = request.metrics.first_token - stream.received if first else None
        self.metrics.generated(n - stream.tokens_sent, ttft=ttft)
        logprobs = None if request.params.logprobs is None else request.output_logprobs[stream.tokens_sent:n]
        token_ids = tuple(request.output_token_ids[stream.tokens_sent:n])
        stream.tokens_sent = n
        return Delta(delta, n, finish_reason, error, logprobs, token_ids)

    def _end(self, stream: Stream, finish_reason: str, error: str | None = None) -> None:
        """Abort the request unless it finished (pages freed at once) and post the stream's last delta:
        the rest of its text whole, as generate() returns it (an incomplete UTF-8 tail too)."""
        request = stream.request
        self._active.pop(request.request_id, None)
        self.llm.abort(request.request_id, siblings=False)  # the handler aborts each of a prompt's streams
        self._finished(stream, self._delta(stream, request.text, finish_reason, error))

    def _end_safely(self, stream: Stream, finish_reason: str, error: str | None = None) -> None:
        """`_end`, or if that raises (the request's text or the engine may be what failed), a last
        delta without the text not sent yet: the stream ends either way."""
        try:
            self._end(stream, finish_reason, error)
        except Exception:  # noqa: BLE001 (contained: the other streams go on)
            logging.exception("ending request %d failed", stream.request.request_id)
            self._active.pop(stream.request.request_id, None)
            stream.post(Delta("", len(stream.request.output_token_ids), finish_reason, error))

    def _finished(self, stream: Stream, last: Delta) -> None:
        stream.post(last)
        m = stream.request.metrics
        end = m.token_times[-1] if m.token_times else time.perf_counter()
        self.metrics.request_finished(last.finish_reason, m.tpot, end - stream.received)

    def _publish_state(self) -> None:
        scheduler, allocator, cached = self.llm.scheduler, self.llm.allocator, self.llm.prefix_cache.stats
        self.metrics.engine_state(len(scheduler.running), len(scheduler.waiting),
                                  allocator.capacity - allocator.num_free, cached.queries, cached.hits)
        if self.llm.runner.expert_counts is not None:
            self.metrics.expert_load(self.llm.runner.expert_counts.summary())

    def _shut_down(self, message: str) -> None:
        """Abort every request in flight and refuse every one in the inbox (closed first: no more come)."""
        self._close()
        for stream in list(self._active.values()):
            self._end_safely(stream, "abort", message)
        for op in self._ops:
            op.fail(RuntimeError(message))
        for streams in self._held:
            for stream in streams:
                stream.post(Rejected(message, status=503))
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and item[0] == "add":
                for stream in item[1]:
                    stream.post(Rejected(message, status=503))
            elif item is not _STOP and item[0] == "op":
                item[1].fail(RuntimeError(message))
