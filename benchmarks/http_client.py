"""The closed-loop workload of scripts/benchmark_serving.py against any OpenAI-compatible server
(`--base_url`): ours (scripts/serve.py), vLLM, SGLang.

Each request is a streamed `/v1/completions` call with the prompt as token ids (the in-process
workload exactly), `max_tokens` = its output length, `ignore_eos` (vLLM's extension, which the
others accept too) and `stream_options` asking for usage: `include_usage` for the final count and
vLLM's `continuous_usage_stats` for the count so far in every chunk. A token's time is the
arrival of the chunk that carried it (`perf_counter`, the in-process clock): several tokens in one
chunk (a multi-step decode's burst) share it, as they share a host sync in process. Without
per-chunk counts each chunk with text is one token, as vLLM's own benchmark counts.

Agentic sessions (`run_agentic`) send their turns one after another, each after its think time,
`concurrency` sessions at once; a request's prefix-cache tokens come from the usage's
`prompt_tokens_details.cached_tokens` where the server reports it (vLLM with
`--enable-prompt-tokens-details`). Both loops sample the server's `/metrics` (`MetricsSampler`):
KV-cache usage, running and waiting requests and the prefix cache's counters, by vLLM's names
(which ours exports too) or else jaxserve's, and ours' XLA compilations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Sequence

import httpx

from benchmarks.metrics import RequestTiming, StateSample, TurnResult
from benchmarks.workloads import AgentSession

logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request and /metrics scrape

# The state a sample reads: the first of these names the server exports (vLLM's V1 names, older vLLM's, jaxserve's).
STATE_METRICS = {
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "jaxserve_kv_cache_usage_ratio"),
    "running": ("vllm:num_requests_running", "jaxserve_num_requests_running"),
    "waiting": ("vllm:num_requests_waiting", "jaxserve_num_requests_waiting"),
    "prefix_cache_queries": ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries",
                             "vllm:gpu_prefix_cache_queries_total", "jaxserve_prefix_cache_queries_total"),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits",
                          "vllm:gpu_prefix_cache_hits_total", "jaxserve_prefix_cache_hits_total"),
    "compilations": ("jaxserve_xla_compilations_total",),
}


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
    return (await _stream(client, info, prompt, max_tokens, temperature))[0]


async def _stream(client: httpx.AsyncClient, info: ServerInfo, prompt: list[int], max_tokens: int,
                  temperature: float) -> tuple[RequestTiming, int | None]:
    """stream_completion's timing, and the prompt tokens the server says its prefix cache served."""
    payload = {"model": info.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
               "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks, final, cached = [], None, None
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
            details = (usage or {}).get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                cached = int(details["cached_tokens"])
            if event.get("choices"):
                chunks.append((now, usage["completion_tokens"] if usage else None,
                               bool(event["choices"][0].get("text"))))
            elif usage:
                final = usage["completion_tokens"]
    return RequestTiming(arrival, token_times(chunks, final), len(prompt)), cached


def parse_metrics(text: str) -> dict[str, list[float]]:
    """{metric name: its samples' values, one per label set} of a Prometheus text page."""
    values: dict[str, list[float]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        brace = line.find("{")
        if 0 <= brace < line.find(" "):  # name{labels} value [timestamp]; a label value may hold spaces
            name, rest = line[:brace], line[line.rindex("}") + 1:]
        else:
            name, _, rest = line.partition(" ")
        try:
            values.setdefault(name, []).append(float(rest.split()[0]))
        except (ValueError, IndexError):
            continue
    return values


def state_sample(text: str) -> StateSample:
    """A StateSample of a /metrics page: per quantity the first name present (STATE_METRICS), summed
    over its label sets (KV-cache usage averaged: a fraction per engine)."""
    values = parse_metrics(text)

    def read(key: str) -> float | None:
        name = next((n for n in STATE_METRICS[key] if n in values), None)
        if name is None:
            return None
        xs = values[name]
        return sum(xs) / len(xs) if key == "kv_cache_usage" else sum(xs)
    return StateSample(**{k: read(k) for k in STATE_METRICS})


class MetricsSampler:
    """Scrapes `/metrics` before a run, every `interval_s` during it and after it; a server without
    /metrics gives empty samples (every field None)."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, interval_s: float):
        self.client, self.url, self.interval_s = client, f"{base_url}/metrics", interval_s
        self.samples: list[StateSample] = []
        self.before = self.after = StateSample(None, None, None)
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def scrape(self) -> StateSample:
        try:
            response = await self.client.get(self.url)
            if response.status_code == 200:
                return state_sample(response.text)
        except httpx.HTTPError:
            pass
        return StateSample(None, None, None)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(await self.scrape())
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass

    async def __aenter__(self) -> "MetricsSampler":
        self.before = await self.scrape()
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        self.after = await self.scrape()


def _client(concurrency: int, api_key: str | None) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    return httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits, headers=_headers(api_key))


async def _closed_loop(info: ServerInfo, prompts: list[list[int]], output_lens: list[int], concurrency: int,
                       temperature: float, api_key: str | None,
                       interval_s: float) -> tuple[list[RequestTiming], float, MetricsSampler]:
    pending = list(zip(prompts, output_lens))[::-1]
    done: list[RequestTiming] = []
    async with _client(concurrency, api_key) as client:
        async def worker() -> None:
            while pending:
                prompt, n = pending.pop()
                done.append(await stream_completion(client, info, prompt, n, temperature))
        async with MetricsSampler(client, info.base_url, interval_s) as sampler:
            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            duration = time.perf_counter() - start
    return done, duration, sampler


def run_closed_loop(info: ServerInfo, prompts: list[list[int]], output_lens: list[int], concurrency: int,
                    temperature: float, api_key: str | None = None,
                    metrics_interval_s: float = 0.0) -> tuple[list[RequestTiming], float, MetricsSampler]:
    """Keep exactly `concurrency` requests in flight (a new one as soon as one ends) until every
    prompt is served; the timings and the wall seconds, as the in-process loop returns them, and the
    /metrics samples (before, after, and every `metrics_interval_s` when > 0)."""
    return asyncio.run(_closed_loop(info, prompts, output_lens, concurrency, temperature, api_key,
                                    metrics_interval_s))


async def _agentic(info: ServerInfo, sessions: list[AgentSession], concurrency: int, temperature: float,
                   api_key: str | None, interval_s: float) -> tuple[list[TurnResult], float, MetricsSampler]:
    pending = list(enumerate(sessions))[::-1]
    done: list[TurnResult] = []
    async with _client(concurrency, api_key) as client:
        async def worker() -> None:
            while pending:
                i, session = pending.pop()
                for t, turn in enumerate(session.turns):
                    if turn.think_s > 0:
                        await asyncio.sleep(turn.think_s)
                    timing, cached = await _stream(client, info, session.prompt(t), session.output_len(t), temperature)
                    done.append(TurnResult(i, t, timing, cached))
        async with MetricsSampler(client, info.base_url, interval_s) as sampler:
            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            duration = time.perf_counter() - start
    return done, duration, sampler


def run_agentic(info: ServerInfo, sessions: list[AgentSession], concurrency: int, temperature: float,
                api_key: str | None = None, metrics_interval_s: float = 0.0) -> tuple[list[TurnResult], float,
                                                                                       MetricsSampler]:
    """`concurrency` sessions at once (the next starts when one ends), each sending its turns in
    order, turn t (its whole conversation so far) after the previous one's last token and turn t's
    think time; every request's TurnResult, the wall seconds and the /metrics samples."""
    return asyncio.run(_agentic(info, sessions, concurrency, temperature, api_key, metrics_interval_s))
