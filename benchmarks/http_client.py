"""The closed-loop workload of scripts/benchmark_serving.py against any OpenAI-compatible server
(`--base_url`): ours (scripts/serve.py), vLLM, SGLang.

Each request is a streamed `/v1/completions` call with the prompt as token ids (the in-process
workload exactly), `max_tokens` = its output length, `ignore_eos` (vLLM's extension, which the
others accept too) and `stream_options` asking for usage: `include_usage` for the final count and
vLLM's `continuous_usage_stats` for the count so far in every chunk. A token's time is the
arrival of the chunk that carried it (`perf_counter`, the in-process clock): several tokens in one
chunk (a multi-step decode's burst) share it, as they share a host sync in process. Without
per-chunk counts each chunk with text is one token, as vLLM's own benchmark counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence

import httpx

from benchmarks.metrics import RequestTiming


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """What the server says about itself in /v1/models (the jaxserve fields only from ours)."""

    base_url: str
    model: str  # the name requests use
    system: str  # `owned_by`: jaxserve, vllm, sglang, ...
    max_model_len: int | None = None
    engine: dict | None = None  # jaxserve: its EngineConfig
    dtype: str | None = None
    device: dict | None = None  # jaxserve: {platform, kind}


def server_info(base_url: str, model: str | None = None, api_key: str | None = None,
                timeout: float = 30) -> ServerInfo:
    """Read /v1/models: the entry named `model` (default: the first)."""
    url = base_url.rstrip("/")
    response = httpx.get(f"{url}/v1/models", headers=_headers(api_key), timeout=timeout)
    response.raise_for_status()
    cards = response.json()["data"]
    card = next((c for c in cards if c["id"] == model), None) if model else cards[0]
    if card is None:
        raise ValueError(f"{url} serves {[c['id'] for c in cards]}, not {model!r}")
    return ServerInfo(url, card["id"], card.get("owned_by") or "openai-compatible", card.get("max_model_len"),
                      card.get("engine"), card.get("dtype"), card.get("device"))


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def token_times(chunks: Sequence[tuple[float, int | None, bool]], final_count: int | None) -> tuple[float, ...]:
    """Per-token arrival times from (time, output tokens so far or None, has text) per chunk.

    With counts, a chunk's new tokens take its time; without, each chunk with text is one token.
    A final usage count beyond what the chunks covered gives the remaining tokens the last time.
    """
    times: list[float] = []
    for t, count, has_text in chunks:
        new = (count - len(times)) if count is not None else int(has_text)
        times.extend([t] * max(0, new))
    if final_count is not None and times:
        times = times[:final_count] + [times[-1]] * (final_count - len(times))
    return tuple(times)


async def stream_completion(client: httpx.AsyncClient, info: ServerInfo, prompt: list[int], max_tokens: int,
                            temperature: float) -> RequestTiming:
    """One streamed completion; its arrival (the send) and token times."""
    payload = {"model": info.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
               "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks, final = [], None
    arrival = time.perf_counter()
    async with client.stream("POST", f"{info.base_url}/v1/completions", json=payload) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"the server failed the request: {event['error']}")
            usage = event.get("usage")
            if event.get("choices"):
                chunks.append((now, usage["completion_tokens"] if usage else None,
                               bool(event["choices"][0].get("text"))))
            elif usage:
                final = usage["completion_tokens"]
    return RequestTiming(arrival, token_times(chunks, final), len(prompt))


async def _closed_loop(info: ServerInfo, prompts: list[list[int]], output_lens: list[int], concurrency: int,
                       temperature: float, api_key: str | None) -> tuple[list[RequestTiming], float]:
    pending = list(zip(prompts, output_lens))[::-1]
    done: list[RequestTiming] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits, headers=_headers(api_key)) as client:
        async def worker() -> None:
            while pending:
                prompt, n = pending.pop()
                done.append(await stream_completion(client, info, prompt, n, temperature))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return done, duration


def run_closed_loop(info: ServerInfo, prompts: list[list[int]], output_lens: list[int], concurrency: int,
                    temperature: float, api_key: str | None = None) -> tuple[list[RequestTiming], float]:
    """Keep exactly `concurrency` requests in flight (a new one as soon as one ends) until every
    prompt is served; the timings and the wall seconds, as the in-process loop returns them."""
    return asyncio.run(_closed_loop(info, prompts, output_lens, concurrency, temperature, api_key))
