"""The OpenAI-compatible routes (FastAPI), the API-key and body-size guard, and a uvicorn Server
that reports its URL once bound.

    POST /v1/completions        prompt: a string, strings, token ids or lists of ids (a choice each);
                                echo (the prompt and its logprobs first), vLLM's prompt_logprobs
    POST /v1/chat/completions   messages (and tools) through the checkpoint's chat template; the
                                reply's tool calls and reasoning parsed (server/chat_output.py)
    GET  /v1/models, /health, /metrics (Prometheus text)

Both POST routes stream server-sent events with `"stream": true` (`data: [DONE]` last; with
`stream_options.include_usage` a final chunk carries the usage, with vLLM's
`continuous_usage_stats` every chunk does). `n` choices per prompt (prompt p's j-th: index p * n + j)
run as n sequences with one prefill (engine/parallel_sampling.py), each a seat in the queue; a
stream interleaves their chunks, each carrying its choice's index; usage counts each prompt once
and every returned choice's tokens. `best_of` > n returns the n of highest cumulative logprob
(not streamable). Every error is an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`: 400 for bad input, 401 without the API key,
404 for an unknown model or route, 413 for a body over the limit, 503 when the queue is full.
Prompts are tokenized, chat templates rendered and echoed prompts decoded on worker threads
(`asyncio.to_thread`): a long prompt never stalls the event loop, which serves every stream. So is
a structured-output grammar compiled (engine/structured_output.py, cached), before the request is
submitted: one llguidance refuses is a 400 and never reaches the engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import jax
import jinja2
import numpy as np
import uvicorn
from absl import logging
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import structured_output
from engine.parallel_sampling import num_sequences, selected
from engine.request import SamplingParams, cumulative_logprob
from server import protocol
from server.admin_routes import add_admin_routes
from server.engine_loop import Delta, EngineLoop, Rejected, Stream
from server.chat_output import chat_output
from server.metrics import CONTENT_TYPE
from server.protocol import APIError
from server.reasoning_parsers import get_reasoning_parser
from server.tool_parsers import get_tool_parser

# Request fields the engine checks against the model (its vocabulary, its tokenizer): a refusal names its field.
_ENGINE_CHECKED = ("stop_token_ids", "logit_bias", "allowed_token_ids", "bad_words", "logits_processor_args")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class _Admission:
    """Counts requests in flight (event-loop thread only) against max_num_seqs + max_queue."""

    def __init__(self, capacity: int):
        self.capacity, self.in_flight = capacity, 0

    def take(self) -> None:
        if self.in_flight >= self.capacity:
            raise APIError(503, f"the server is at capacity ({self.in_flight} requests in flight): retry later",
                           code="queue_full")
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


def create_app(engine: EngineLoop, *, model_name: str, api_key: str | None = None, max_queue: int = 256,
               max_body_bytes: int = 1 << 20, tool_call_parser: str | None = None,
               reasoning_parser: str | None = None, enable_weight_updates: bool = False) -> FastAPI:
    """The app over a started EngineLoop (the caller starts and stops it). The engine-control routes
    (server/admin_routes.py) are on with an api_key or enable_weight_updates. The parsers (by name:
    server/tool_parsers.py, server/reasoning_parsers.py; None: none) split chat outputs into
    content, tool calls and reasoning."""
    tool_parser, reasoner = get_tool_parser(tool_call_parser), get_reasoning_parser(reasoning_parser)
    llm = engine.llm
    tokenizer, max_model_len = llm.model.tokenizer, llm.config.max_model_len
    renders_tools = bool(tokenizer and tokenizer.template_reads("tools"))
    admission = _Admission(llm.config.max_num_seqs + max_queue)
    metrics = engine.metrics
    app = FastAPI(title="jaxserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, on_error=metrics.http_error)
    add_admin_routes(app, engine, enabled=bool(api_key) or enable_weight_updates)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        metrics.http_error(e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        metrics.http_error(e.status_code)
        return JSONResponse(protocol.error_body(str(e.detail), code=None if e.status_code != 404 else "not_found"),
                            status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        logging.exception("unhandled error in a request handler")
        metrics.http_error(500)
        return JSONResponse(protocol.error_body(f"internal error: {type(e).__name__}: {e}", "server_error"),
                            status_code=500)

    # ---- plain endpoints ----------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    device = jax.devices()[0]
    card = {"id": model_name, "object": "model", "owned_by": "jaxserve", "max_model_len": max_model_len,
            # jaxserve's own fields (benchmarks/http_client.py records them):
            "dtype": np.dtype(llm.model.dtype).name, "engine": dataclasses.asdict(llm.config),
            "device": {"platform": device.platform, "kind": device.device_kind}}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{**card, "created": protocol.now()}]}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    # ---- generation ---------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def encode(prompts: list[str | list[int]]) -> list[list[int]]:
        """Every prompt's ids (a worker thread: a long prompt must not stall the event loop)."""
        if tokenizer is None and any(isinstance(p, str) for p in prompts):
            raise APIError(400, "this model has no tokenizer: send the prompt as a list of token ids", param="prompt")
        ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        empty = next((i for i, p in enumerate(ids) if not p), None)
        if empty is not None:
            raise APIError(400, "prompt is empty" if len(ids) == 1 else f"prompt {empty} is empty", param="prompt")
        return ids

    def chat_prompt(messages: list[protocol.ChatMessage], tools: list[dict] | None) -> tuple[str, list[int]]:
        """The rendered chat template and its ids (a worker thread, as `encode`)."""
        if tokenizer is None or not tokenizer.chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        try:
            text = tokenizer.render_chat(protocol.chat_messages(messages), tools=tools)
        except (ValueError, jinja2.TemplateError) as e:
            raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
        return text, tokenizer.encode(text, add_special_tokens=False)

    async def compile_grammar(body: protocol._Sampling, params: SamplingParams) -> None:
        """Compile the request's grammar into the cache on a worker thread (never the event loop):
        one llguidance refuses is a 400 naming its field, before the engine sees the request."""
        if params.structured_outputs is None:
            return
        try:
            await asyncio.to_thread(structured_output.compile_spec, params.structured_outputs, tokenizer,
                                    llm.model.config.vocab_size)
        except ValueError as e:
            source = protocol.structured_outputs_source(body) or "tool_choice"  # else a forced call's grammar
            raise APIError(400, f"{source}: {e}", param=source.split(".")[0]) from None

    async def submit(requests: list[tuple[list[int], Any]], param: str) -> list[Stream]:
        """Hand the requests (prompt ids, params) to the engine thread at once, so that they are
        admitted at the same step boundary: one stream per sequence, a prompt's n (or best_of) in a
        row, each taking a seat in the queue. If one is refused (or the queue is full) none runs."""
        streams: list[Stream] = []
        prompt_of: list[int] = []  # each stream's prompt
        seats = sum(num_sequences(params) for _, params in requests)
        if seats > admission.capacity:
            raise APIError(400, f"{seats} sequences (n or best_of per prompt) exceed the {admission.capacity} this "
                                f"server holds at once", param="best_of" if requests[0][1].best_of else "n")
        loop = asyncio.get_running_loop()
        try:
            for p, (ids, params) in enumerate(requests):
                group = []
                for i in range(num_sequences(params)):
                    admission.take()
                    group.append(Stream(ids, params, loop, i))
                    streams.append(group[-1])
                    prompt_of.append(p)
                try:
                    engine.submit(*group)
                except RuntimeError:
                    raise APIError(503, "the engine is not running", code="engine_stopped") from None
            firsts = [await stream.events.get() for stream in streams]
        except BaseException:  # refused, or cancelled while waiting: the client left
            for stream in streams:
                release(stream)
            raise
        rejected = next(((i, e) for i, e in enumerate(firsts) if isinstance(e, Rejected)), None)
        if rejected is not None:
            for stream in streams:
                release(stream)
            i, first = rejected
            bad = next((f for f in _ENGINE_CHECKED if first.message.startswith(f)), param)
            message = first.message if len(requests) == 1 else f"prompt {prompt_of[i]}: {first.message}"
            raise APIError(first.status, message, param=bad if first.status == 400 else None)
        return streams

    def release(stream: Stream) -> None:
        """Let go of a stream once (aborting its request unless it finished): when its deltas end,
        and again, as a no-op, after its response (whose body a client gone early never started)."""
        if not stream.released:
            stream.released = True
            if not stream.finished:
                engine.abort(stream)
            admission.release()

    async def deltas(stream: Stream) -> AsyncIterator[Delta]:
        """The stream's deltas up to its last; leaving early (a client gone) aborts the request."""
        try:
            while not stream.finished:
                delta = await stream.events.get()
                stream.finished = delta.finish_reason is not None
                yield delta
        finally:
            release(stream)

    async def merged(streams: list[Stream]) -> AsyncIterator[tuple[int, Delta]]:
        """A prompt's streams' deltas as they arrive, each with its stream's index, until every one
        ended; leaving early (a client gone) aborts them all."""
        arrived: asyncio.Queue = asyncio.Queue()

        async def pump(stream: Stream) -> None:
            async with contextlib.aclosing(deltas(stream)) as events:
                async for delta in events:
                    arrived.put_nowait((stream.index, delta))
        pumps = [asyncio.create_task(pump(stream)) for stream in streams]
        try:
            running = len(streams)
            while running:
                index, delta = await arrived.get()
                running -= delta.finish_reason is not None
                yield index, delta
        finally:
            for task in pumps:
                task.cancel()
            for stream in streams:
                release(stream)

    async def collect(streams: list[Stream], request: Request) -> list[tuple[str, protocol.Entries, Delta]]:
        """All of each non-streamed request's text and logprobs, and its last delta; a client that
        disconnects aborts them."""
        watcher = asyncio.create_task(_abort_on_disconnect(request, lambda: [engine.abort(s) for s in streams]))

        async def one(stream: Stream) -> tuple[str, protocol.Entries, Delta]:
            parts, logprobs, last = [], [], None
            async with contextlib.aclosing(deltas(stream)) as events:
                async for last in events:
                    parts.append(last.text)
                    logprobs.extend(last.logprobs or ())
            return "".join(parts), logprobs, last
        try:
            results = await asyncio.gather(*map(one, streams))
        finally:
            watcher.cancel()
            for stream in streams:
                release(stream)
        failed = next((last for _, _, last in results if last.finish_reason == "error"), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {failed.error}", code="generation_error")
        return results

    def token_text(token: int) -> str:
        """A token's text in logprobs (vLLM's "token_id:N" when the model has no tokenizer)."""
        return tokenizer.decode([token], skip_special_tokens=False) if tokenizer else f"token_id:{token}"

    def prompt_text(prompt: str | list[int]) -> str:
        """The echoed prompt: as sent, or its ids decoded (vLLM's detokenized prompt)."""
        if isinstance(prompt, str):
            return prompt
        return tokenizer.decode(prompt, skip_special_tokens=False) if tokenizer else ""

    def prompt_logprobs(stream: Stream) -> protocol.Entries:
        """The request's prompt logprobs ([None, {token: logprob, top k...}, ...]), read from the
        engine's Request: the engine thread writes them before it samples the first token and never
        after, so they are whole once a delta with tokens (or the last one) has arrived. A request
        ended before its prompt was computed (the server shutting down) has none to give."""
        entries = list(stream.request.prompt_logprobs)
        if len(entries) < len(stream.prompt_ids):
            raise APIError(503, "the request ended before its prompt was scored (the server is shutting down)",
                           code="engine_stopped")
        return entries

    def sse_response(streams: list[Stream], events: AsyncIterator[str]) -> StreamingResponse:
        def release_all() -> None:
            for stream in streams:
                release(stream)
        return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(release_all),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = protocol.parse(protocol.CompletionRequest, await request.body())
        check_model(body.model)
        protocol.check_supported(body)
        prompts = protocol.completion_prompts(body.prompt)
        if body.stream and len(prompts) > 1:
            raise APIError(400, f"streaming {len(prompts)} prompts in one request is not supported: stream one "
                                f"prompt per request, or send stream=false", param="prompt",
                           code="unsupported_parameter")
        if body.stream and body.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs are not available with stream=true (as vLLM)",
                           param="prompt_logprobs", code="unsupported_parameter")
        ids_list = await asyncio.to_thread(encode, prompts)
        requested = body.requested_max_tokens
        params_list = [protocol.sampling_params(body, protocol.max_tokens(requested, len(ids), max_model_len,
                                                                          COMPLETION_DEFAULT_MAX_TOKENS, "max_tokens"),
                                                body.engine_prompt_logprobs) for ids in ids_list]
        await compile_grammar(body, params_list[0])
        streams = await submit(list(zip(ids_list, params_list)), "prompt")
        rid, created = protocol.new_id("cmpl"), protocol.now()
        k, echo = body.logprobs, bool(body.echo)

        def choice_logprobs(entries: protocol.Entries, offset: int, prompt: str | list[int] | None = None,
                            stream: Stream | None = None) -> dict | None:
            """The choice's (or chunk's) logprobs: its generated tokens', after the prompt's when
            `prompt` is being echoed."""
            if k is None:
                return None
            ids = [next(iter(e)) for e in entries]
            if prompt is not None:
                entries, ids = prompt_logprobs(stream) + entries, stream.prompt_ids + ids
            return protocol.completion_logprobs(entries, token_text, offset, token_ids=ids, top=k)

        if not body.stream:
            groups = best_choices(streams, await collect(streams, request))

            def build() -> dict:  # a worker thread: echoing a long prompt decodes each of its tokens
                choices = []
                for p, (prompt, group) in enumerate(zip(prompts, groups)):
                    for j, (stream, (text, entries, last)) in enumerate(group):
                        if body.score_only:
                            text, entries = "", []
                        choices.append(protocol.completion_choice(
                            p * len(group) + j, prompt_text(prompt) + text if echo else text, last.finish_reason,
                            choice_logprobs(entries, 0, prompt if echo else None, stream),
                            None if body.prompt_logprobs is None else
                            protocol.prompt_logprobs_body(prompt_logprobs(stream), body.prompt_logprobs, token_text)))
                        if body.return_token_ids:  # the request finished: the engine thread no longer writes it
                            output_ids = [] if body.score_only else stream.request.output_token_ids
                            choices[-1] |= protocol.token_ids_fields(ids_list[p], output_ids)
                completion_tokens = 0 if body.score_only else sum(r[2].num_tokens for g in groups for _, r in g)
                return protocol.completion_body(rid, created, model_name, choices,
                                                protocol.usage(sum(map(len, ids_list)), completion_tokens))
            return await asyncio.to_thread(build)

        [prompt], [ids] = prompts, ids_list

        async def events() -> AsyncIterator[str]:
            # Per choice: text_offset of its next token; the prompt sent (or not asked); its tokens so far.
            offsets, echoed, tokens = [0] * len(streams), [not echo] * len(streams), [0] * len(streams)
            ids_sent = [False] * len(streams)  # return_token_ids: the choice's prompt ids went out
            async for i, d in merged(streams):
                stream = streams[i]
                text, entries, tokens[i] = d.text, d.logprobs or [], d.num_tokens
                if body.score_only:
                    text, entries, tokens[i] = "", [], 0
                echo_now = not echoed[i] and d.num_tokens > 0  # the prompt is scored once a token exists
                if echo_now:
                    echoed[i] = True
                    text = await asyncio.to_thread(prompt_text, prompt) + text
                new_ids = () if body.score_only else d.token_ids
                if text or d.finish_reason or entries or echo_now or body.continuous_usage or (
                        body.return_token_ids and (new_ids or not ids_sent[i])):
                    chunk_logprobs = (await asyncio.to_thread(choice_logprobs, entries, offsets[i], prompt, stream)
                                      if echo_now else choice_logprobs(entries, offsets[i]))
                    offsets[i] += sum(map(len, chunk_logprobs["tokens"])) if chunk_logprobs else 0
                    chunk = protocol.completion_chunk(rid, created, model_name, text, d.finish_reason,
                                                      chunk_logprobs, index=i)
                    if body.return_token_ids:
                        chunk["choices"][0] |= protocol.token_ids_fields(None if ids_sent[i] else ids, new_ids)
                        ids_sent[i] = True
                    yield protocol.sse(with_usage(chunk, body, len(ids), sum(tokens)))
                if d.finish_reason == "error":
                    yield protocol.sse(protocol.error_body(f"generation failed: {d.error}", "server_error"))
            if body.include_usage:
                chunk = protocol.completion_chunk(rid, created, model_name, "")
                yield protocol.sse(protocol.usage_chunk(chunk, protocol.usage(len(ids), sum(tokens))))
            yield protocol.sse("[DONE]")
        return sse_response(streams, events())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = protocol.parse(protocol.ChatCompletionRequest, await request.body())
        check_model(body.model)
        protocol.check_supported(body)
        use = protocol.tool_use(body, template_renders_tools=renders_tools, parser=tool_parser and tool_parser.name)
        prompt, ids = await asyncio.to_thread(chat_prompt, body.messages, use.tools)
        requested, param = ((body.max_completion_tokens, "max_completion_tokens")
                            if body.max_completion_tokens is not None else (body.max_tokens, "max_tokens"))
        budget = protocol.max_tokens(requested, len(ids), max_model_len, None, param)
        output = lambda: chat_output(use, tool_parser, reasoner, prompt)  # noqa: E731 (one per choice)
        params = output().sampling_params(protocol.sampling_params(body, budget))
        await compile_grammar(body, params)
        streams = await submit([(ids, params)], "messages")
        rid, created = protocol.new_id("chatcmpl"), protocol.now()
        logprobs = (lambda entries: protocol.chat_logprobs(entries, params.logprobs, token_text)
                    if params.logprobs is not None else None)
        if not body.stream:
            [group] = best_choices(streams, await collect(streams, request))
            outputs = [output() for _ in group]
            choices = [protocol.chat_choice(j, out.message(text), out.finish_reason(last.finish_reason),
                                            logprobs(entries))
                       for j, (out, (_, (text, entries, last))) in enumerate(zip(outputs, group))]
            return protocol.chat_body(rid, created, model_name, choices,
                                      protocol.usage(len(ids), sum(r[2].num_tokens for _, r in group)))

        async def events() -> AsyncIterator[str]:
            tokens = [0] * len(streams)  # each choice's tokens so far
            outputs = [output() for _ in streams]
            for i in range(len(streams)):
                first = protocol.chat_chunk(rid, created, model_name, {"role": "assistant", "content": ""}, index=i)
                yield protocol.sse(with_usage(first, body, len(ids), 0))
            async for i, d in merged(streams):
                tokens[i] = d.num_tokens
                parts = outputs[i].feed(d.text) + (outputs[i].finish() if d.finish_reason else [])
                if not parts and (d.logprobs or body.continuous_usage):
                    parts = [{"content": ""}]
                for j, part in enumerate(parts):  # the delta's logprobs ride on its first chunk
                    chunk = protocol.chat_chunk(rid, created, model_name, part,
                                                logprobs=logprobs(d.logprobs or []) if j == 0 else None, index=i)
                    yield protocol.sse(with_usage(chunk, body, len(ids), sum(tokens)))
                if d.finish_reason == "error":
                    yield protocol.sse(protocol.error_body(f"generation failed: {d.error}", "server_error"))
                if d.finish_reason:
                    chunk = protocol.chat_chunk(rid, created, model_name, {}, outputs[i].finish_reason(d.finish_reason),
                                                index=i)
                    yield protocol.sse(with_usage(chunk, body, len(ids), sum(tokens)))
            if body.include_usage:
                chunk = protocol.chat_chunk(rid, created, model_name, {})
                yield protocol.sse(protocol.usage_chunk(chunk, protocol.usage(len(ids), sum(tokens))))
            yield protocol.sse("[DONE]")
        return sse_response(streams, events())

    return app


Result = tuple[str, protocol.Entries, Delta]  # a sequence's text, logprobs and last delta (collect)


def best_choices(streams: list[Stream], results: list[Result]) -> list[list[tuple[Stream, Result]]]:
    """Per prompt, the n choices it returns of its sequences (in a row in `streams`), in order:
    engine/parallel_sampling.selected, by cumulative logprob when best_of > n."""
    width, n = num_sequences(streams[0].params), streams[0].params.n
    pairs = list(zip(streams, results))
    groups = [pairs[p:p + width] for p in range(0, len(pairs), width)]
    return [[group[i] for i in selected([cumulative_logprob(r[1]) for _, r in group], n)] for group in groups]


def with_usage(chunk: dict, body: protocol._Sampling, prompt_tokens: int, completion_tokens: int) -> dict:
    """A chunk with the `usage` key an include_usage stream carries: null, or the tokens so far
    with continuous_usage_stats."""
    if not body.include_usage:
        return chunk
    return {**chunk, "usage": protocol.usage(prompt_tokens, completion_tokens) if body.continuous_usage else None}


async def _abort_on_disconnect(request: Request, abort: Callable[[], None]) -> None:
    """Wait for the client's disconnect (the body was read already), then abort."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            abort()
            return


class _Guard:
    """ASGI middleware: `Authorization: Bearer <key>` on every path but /health (when a key is set),
    and the request body read whole up front, refused with 413 over `max_body_bytes`."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, on_error: Callable[[int], None]):
        self.app, self.max_body_bytes, self.on_error = app, max_body_bytes, on_error
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] != "/health":
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await self._refuse(send, 401, "invalid or missing API key: send Authorization: Bearer <key>",
                                          "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._refuse(send, 413, self._too_large(), "request_too_large")
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return None
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await self._refuse(send, 413, self._too_large(), "request_too_large")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()
        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"the request body exceeds the server's limit of {self.max_body_bytes} bytes"

    async def _refuse(self, send, status: int, message: str, code: str) -> None:
        self.on_error(status)
        payload = json.dumps(protocol.error_body(message, code=code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


class Server(uvicorn.Server):
    """uvicorn's Server; `url` once bound (port 0 picks a free one), and `on_ready(url)` then."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str], None] | None = None):
        super().__init__(config)
        self.on_ready = on_ready
        self.url: str | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.url = f"http://{host}:{port}"
            if self.on_ready is not None:
                self.on_ready(self.url)


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30) -> str:
    """Run `app` with uvicorn on a background thread; yields its URL, stops it on exit (tests, scripts)."""
    import threading  # noqa: PLC0415

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    for _ in range(int(timeout * 100)):
        if server.started or not thread.is_alive():
            break
        thread.join(0.01)
    if not server.started:
        raise RuntimeError("the HTTP server did not start")
    try:
        yield server.url
    finally:
        server.should_exit = True
        thread.join(timeout)
