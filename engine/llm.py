"""LLM: the engine's public API (generate, stream, chat) and its step loop.

A step is: the scheduler picks prefill chunks or decode requests, the runner runs one jitted
call, and the host appends the sampled tokens, checks stop conditions and frees finished pages.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh
from tqdm.auto import tqdm

from engine import kv_cache
from engine.config import EngineConfig
from engine.page_allocator import PageAllocator
from engine.request import Request, RequestOutput, SamplingParams, Status, is_int, is_sequence
from engine.runner import ModelRunner, StepResult
from engine.scheduler import PrefillChunk, Scheduler
from models import LoadedModel, load_model
from pallas_kernels import ops
from sharding.rules import cache_sharding, shard_model

Prompt = str | Sequence[int]


class LLM:
    """Paged-KV, continuously batched generation over one model."""

    def __init__(self, model: str | LoadedModel = "smollm2-135m-instruct", *, dtype: str = "float32",
                 page_size: int = 16, num_pages: int | None = None, max_num_seqs: int = 64,
                 max_model_len: int | None = None, attention_impl: str = "auto", decode_steps: int = 4,
                 prefill_chunk: int = 512, max_num_batched_tokens: int = 2048,
                 kv_cache_bytes: int = 4 << 30, seed: int = 0, mesh: Mesh | None = None):
        """mesh: shard the parameters (sharding/rules.py, the model's rules) and the KV cache over it.

        The cache splits its kv heads over "tensor"; with fewer kv heads than the tensor size every
        device holds all of them (replicated), and the page pool is replicated over "data" and
        "expert" (pages are shared by all sequences of the batch).
        """
        self.model = _placed_model(model, dtype, mesh)
        self.config = _engine_config(self.model, max_model_len=max_model_len, page_size=page_size,
                                     num_pages=num_pages, max_num_seqs=max_num_seqs, prefill_chunk=prefill_chunk,
                                     max_num_batched_tokens=max_num_batched_tokens, decode_steps=decode_steps,
                                     attention_impl=_attention_impl(attention_impl, self.model),
                                     kv_cache_bytes=kv_cache_bytes)
        self.allocator = PageAllocator(self.config.num_pages)
        self.scheduler = Scheduler(self.config, self.allocator)
        self.runner = ModelRunner(self.model.model, _allocate_cache(self.model, self.config), self.config)
        self._ids = itertools.count()
        self._seeds = np.random.default_rng(seed)
        tokenizer = self.model.tokenizer
        self._eos = set(tokenizer.eos_token_ids) if tokenizer else set()

    # ---- requests -------------------------------------------------------------------------
    def _prompt_ids(self, prompt: object) -> list[int]:
        """A str prompt through the tokenizer, else the ids of a list (or 1-D array) of int ids."""
        if isinstance(prompt, str):
            if self.model.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token-id lists")
            return self.model.tokenizer.encode(prompt)
        if not is_sequence(prompt):
            raise ValueError(f"a prompt must be a str or a list of int token ids, got {type(prompt).__name__}")
        bad = next((i for i, t in enumerate(prompt) if not is_int(t)), None)
        if bad is not None:
            raise ValueError(f"prompt token {bad} is {prompt[bad]!r} ({type(prompt[bad]).__name__}), "
                             f"not an int token id")
        return [int(t) for t in prompt]

    def _validate(self, ids: list[int]) -> None:
        vocab, limit = self.model.config.vocab_size, self.config.max_model_len
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= limit:
            raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {limit} "
                             f"(the prompt plus at least one output token must fit)")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")

    def _checked(self, prompt: object, params: object) -> tuple[list[int], SamplingParams]:
        """The prompt's ids and its params, or a ValueError naming what is wrong; admits nothing."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {params!r} ({type(params).__name__})")
        ids = self._prompt_ids(prompt)
        self._validate(ids)
        vocab = self.model.config.vocab_size
        bad = next((t for t in params.stop_token_ids if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids: token id {bad} is outside the vocabulary [0, {vocab})")
        return ids, params

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> Request:
        """Validate and enqueue; a bad request raises ValueError and leaves the others untouched."""
        return self._enqueue(*self._checked(prompt, params))

    def _enqueue(self, ids: list[int], params: SamplingParams) -> Request:
        """Queue a validated request, drawing its seed unless the params fix one."""
        seed = params.seed if params.seed is not None else int(self._seeds.integers(2**32))
        request = Request(next(self._ids), ids, params, seed,
                          max_total_len=min(len(ids) + params.max_tokens, self.config.max_model_len))
        self.scheduler.add(request)
        return request

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one engine step; returns the requests that finished in it (finish_reason "error" too).

        A request whose host-side processing raises fails alone; a runner call that raises fails the
        requests of its step, and the engine recovers for the next step.
        """
        plan = self.scheduler.schedule()
        items = plan.prefill or plan.decode
        if not items:
            return []
        requests = [c.request for c in plan.prefill] or plan.decode
        run, advance = ((self.runner.prefill, self._advance_prefill) if plan.prefill
                        else (self.runner.decode, self._advance_decode))
        try:
            result = run(items)
        except Exception as error:  # an XLA runtime error, OOM, ...: the whole step is lost
            return self._fail_step(requests, error)
        now = time.perf_counter()
        finished = []
        for row, (request, item) in enumerate(zip(requests, items)):
            try:
                done = advance(item, result, row, now)
            except Exception as error:  # detokenizing, stop strings, ...: only this request fails
                self._fail(request, error, now)
                done = True
            if done:
                finished.append(request)
        for request in finished:
            self.scheduler.finish(request)
        return finished

    def _advance_prefill(self, chunk: PrefillChunk, result: StepResult, row: int, now: float) -> bool:
        """Account a prefilled chunk, taking the first token when the prompt is done; True when finished."""
        chunk.request.num_computed = chunk.start + chunk.length
        return chunk.completes_prefill and self._append(chunk.request, result, row, 0, now)

    def _advance_decode(self, request: Request, result: StepResult, row: int, now: float) -> bool:
        """Take a decoded row's tokens up to the first that finishes the request; True when finished."""
        for col in range(self.config.decode_steps):
            request.num_computed += 1
            if self._append(request, result, row, col, now):
                return True
        return False

    def _fail(self, request: Request, error: Exception, now: float) -> None:
        """Finish `request` with finish_reason "error" and the error's message (the caller frees it)."""
        logging.warning("request %d failed: %r", request.request_id, error, exc_info=error)
        request.finish_reason = "error"
        request.error = f"{type(error).__name__}: {error}"
        request.metrics.finished = now

    def _fail_step(self, requests: list[Request], error: Exception) -> list[Request]:
        """Fail the requests of a step whose runner call raised; if the call consumed the KV cache
        (donated, or its outputs hold the error), allocate a fresh one and requeue the other running
        requests to recompute their lost pages."""
        now = time.perf_counter()
        for request in requests:
            self._fail(request, error, now)
            self.scheduler.finish(request)
        if not _is_intact(self.runner.cache):
            self.runner.cache = _allocate_cache(self.model, self.config)
            self.scheduler.preempt_all()
        return requests

    def _append(self, request: Request, result: StepResult, row: int, col: int, now: float) -> bool:
        """Record one sampled token; True when the request is finished."""
        token = int(result.tokens[row, col])
        request.output_token_ids.append(token)
        request.output_logprobs.append(float(result.logprobs[row, col]))
        request.metrics.token_times.append(now)
        if request.metrics.first_token is None:
            request.metrics.first_token = now
        params = request.params
        reason = None
        if (token in self._eos and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        elif len(request.tokens) >= request.max_total_len:
            reason = "length"
        if params.stop and self._hit_stop_string(request):
            reason = "stop"
        if reason:
            request.finish_reason = reason
            request.metrics.finished = now
            if not params.stop:
                request.text = self._decode(request.output_token_ids)
        return reason is not None

    def _decode(self, ids: list[int]) -> str:
        return self.model.tokenizer.decode(ids) if self.model.tokenizer else ""

    def _hit_stop_string(self, request: Request) -> bool:
        """Update the text; on a stop string, cut the text before it."""
        request.text = self._decode(request.output_token_ids)
        hits = [i for i in (request.text.find(s) for s in request.params.stop) if i >= 0]
        if hits:
            request.text = request.text[:min(hits)]
        return bool(hits)

    # ---- convenience APIs -----------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None
                 = None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order. All are validated before any starts."""
        prompts = [prompts] if _is_one_prompt(prompts) else prompts
        if not (isinstance(prompts, (list, tuple)) or (isinstance(prompts, np.ndarray) and prompts.ndim == 2)):
            raise ValueError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        checked = []
        for i, (prompt, sp) in enumerate(zip(prompts, params_list)):
            try:
                checked.append(self._checked(prompt, sp))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        requests = [self._enqueue(ids, sp) for ids, sp in checked]
        with tqdm(total=len(requests), disable=not use_tqdm, desc="generate") as bar:
            while any(r.status is not Status.FINISHED for r in requests):
                bar.update(sum(r in requests for r in self.step()))
        return [r.output() for r in requests]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas as tokens arrive (other requests in flight keep being served)."""
        return self.stream_request(self.add_request(prompt, params))

    def stream_request(self, request: Request) -> Iterator[str]:
        """`stream` for a request already added with `add_request` (its metrics stay readable); a
        request that fails raises RuntimeError with its error after the text it produced."""
        emitted = 0
        while request.status is not Status.FINISHED:
            self.step()
            text = request.text if request.status is Status.FINISHED else self._decode(request.output_token_ids)
            if request.params.stop and request.status is not Status.FINISHED:
                text = text[:max(0, len(text) - max(map(len, request.params.stop)) + 1)]
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence waits for its next byte
            if len(text) > emitted:
                yield text[emitted:]
                emitted = len(text)
        if request.error:
            raise RuntimeError(f"request {request.request_id} failed: {request.error}")

    def chat(self, messages: list[dict], params: SamplingParams | None = None, *,
             use_tqdm: bool = False) -> RequestOutput:
        """Apply the checkpoint's chat template and generate the assistant's reply."""
        if self.model.tokenizer is None:
            raise ValueError("this model has no tokenizer (and so no chat template)")
        return self.generate([self.model.tokenizer.apply_chat_template(messages)], params, use_tqdm=use_tqdm)[0]

    def warmup(self) -> int:
        """Compile every shape bucket now (with all-padding batches); returns the number of shapes."""
        return self.runner.warmup()


def _is_one_prompt(prompts: object) -> bool:
    """Whether generate's `prompts` is one prompt (a str, or ids) rather than a list of prompts."""
    return isinstance(prompts, str) or (is_sequence(prompts) and len(prompts) > 0
                                        and not isinstance(prompts[0], (str, list, tuple, np.ndarray)))


def _is_intact(cache: list) -> bool:
    """False when a failed call consumed the cache: its buffers were donated (deleted) or hold the error."""
    try:
        jax.block_until_ready(cache)
    except Exception:
        return False
    return True


def _attention_impl(impl: str, model: LoadedModel) -> str:
    """impl, except that "auto" on a CPU mesh takes the jnp path: GSPMD cannot partition the C++
    kernel's custom call and would gather every layer's whole KV cache onto each device."""
    if impl == "auto" and model.mesh is not None and ops.resolve_impl(impl) == "cpu":
        return "xla"
    return impl


def _placed_model(model: str | LoadedModel, dtype: str, mesh: Mesh | None) -> LoadedModel:
    """Load `model` (unless given loaded) and place its parameters on `mesh`."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, mesh=mesh)
    if mesh is not None and loaded.mesh is None:
        loaded = dataclasses.replace(loaded, model=shard_model(loaded.model, mesh, loaded.rules), mesh=mesh)
    return loaded


def _engine_config(model: LoadedModel, *, max_model_len: int | None, num_pages: int | None,
                   prefill_chunk: int, max_num_batched_tokens: int, kv_cache_bytes: int, **kwargs) -> EngineConfig:
    """The EngineConfig, max_model_len defaulting to the model's context and the page pool sized
    from kv_cache_bytes when num_pages is None (never more pages than max_num_seqs can use)."""
    cfg = model.config
    max_model_len = max_model_len or cfg.max_position_embeddings
    if max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's context "
                         f"({cfg.max_position_embeddings} tokens)")
    config = EngineConfig(max_model_len=max_model_len, num_pages=num_pages,
                          prefill_chunk=min(prefill_chunk, max_num_batched_tokens),
                          max_num_batched_tokens=max_num_batched_tokens, kv_cache_bytes=kv_cache_bytes, **kwargs)
    if num_pages is None:
        useful = config.max_num_seqs * (config.pages_per_seq + 1)
        num_pages = kv_cache.pages_for_budget(cfg, config.page_size, model.dtype, kv_cache_bytes, useful)
        config = dataclasses.replace(config, num_pages=num_pages)
    logging.info(kv_cache.summary(cfg, config.num_pages, config.page_size, model.dtype))
    return config


def _allocate_cache(model: LoadedModel, config: EngineConfig) -> list:
    """Zeroed pages, sharded on the model's mesh: kv heads over "tensor" (sharding/rules.py)."""
    shape = kv_cache.page_shape(model.config, config.num_pages, config.page_size)
    sharding = None if model.mesh is None else cache_sharding(shape, model.mesh, model.rules)
    return kv_cache.allocate(model.config, config.num_pages, config.page_size, model.dtype, sharding)
