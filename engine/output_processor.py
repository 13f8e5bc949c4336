"""The one owner of a step's results: advance each request's computed tokens, append its sampled
tokens, register the pages it filled with the prefix cache, check stop conditions, finish it and
free its pages. The LLM facade only calls `apply`.

Each token is detokenized incrementally (vLLM's prefix and read offsets), so `request.text` always
holds the output so far, also when an abort or a failure ends the request, and a stop string is
looked for only where a new one can be: the text the new token changed and the few characters before.

A verify step (speculation) appends a row's accepted drafts and then its drawn token, in order and
nothing past a stop; its computed tokens stop at the last accepted one (so only accepted tokens'
pages are ever cached), and pages past the new length are freed (rejected drafts' KV slots are
simply overwritten later)."""

from __future__ import annotations

import dataclasses
import time
import weakref

import numpy as np
from absl import logging

from engine import model_hooks
from engine.request import Request, Status
from engine.runner import StepResult, wants_prompt_logprobs
from engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from models.loading.tokenizer import Tokenizer


@dataclasses.dataclass
class _Detokenized:
    """One request's incremental detokenization: `text` is output ids[:read] decoded, ending on a complete
    character. Each new window is decoded from `prefix` (ids already in `text`) and that prefix's own
    decode cut off, so decoders that merge or strip at a window's start see a full decode's neighbours."""

    text: str = ""
    prefix: int = 0
    read: int = 0


class OutputProcessor:
    """Applies step results; EOS ids and stop strings need the model's tokenizer."""

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer | None):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos = set(tokenizer.eos_token_ids) if tokenizer else set()
        # Running requests' detokenizers (an aborted request's goes with it).
        self._detokenized: weakref.WeakKeyDictionary[Request, _Detokenized] = weakref.WeakKeyDictionary()

    def apply(self, output: SchedulerOutput, result: StepResult) -> list[Request]:
        """Record what the step computed and sampled; returns the requests it finished. A request
        whose output cannot be processed (e.g. its stop strings raise) finishes with "error" alone."""
        now = time.perf_counter()
        finished = []
        for row, s in enumerate(output.scheduled):
            request = s.request
            if request.status is Status.FINISHED:
                continue  # aborted, or finished before this run-ahead call's rows were known
            steps = output.decode_steps if result.counts is None else int(result.counts[row])
            try:
                if result.prompt_logprobs is not None and wants_prompt_logprobs(s):
                    _record_prompt_logprobs(s, int(result.prompt_starts[row]), result)
                done = self._apply_one(request, s.end - len(s.drafts), s.samples, result, row, steps, now)
                if result.hooks is not None:  # a hooked mixed step (decode and verify steps carry none)
                    model_hooks.record(s, int(result.prompt_starts[row]), result.hooks)
                if s.drafts:
                    request.metrics.speculation.record(len(s.drafts), steps - 1)
                self.scheduler.prefix_cache.commit(request, s.start)  # before finish frees its pages
                if result.counts is not None and not done:  # a verify step: free the unused draft slots' pages
                    self.scheduler.trim(request)
            except Exception as e:  # noqa: BLE001 (contained: one request fails, the engine goes on)
                logging.warning("request %d failed while processing its output: %r", request.request_id, e)
                request.error = f"{type(e).__name__}: {e}"
                done = "error"
            if done:
                request.metrics.finished = now
                self.scheduler.finish(request, done)
                finished.append(request)
        return finished

    def _apply_one(self, request: Request, computed: int, samples: bool, result: StepResult, row: int,
                   steps: int, now: float) -> str | None:
        """Advance `request` by one row of `result`; its finish reason, or None while it runs."""
        request.num_computed = computed
        if not samples:
            return None  # mid-prompt chunk: its sample is discarded
        for col in range(steps):
            if col:
                request.num_computed += 1
            token = int(result.tokens[row, col])
            if request.params.logprobs is not None:
                top = None if result.top_ids is None else (result.top_ids[row, col], result.top_logprobs[row, col])
                request.output_logprobs.append(
                    _logprob_entry(token, result.logprobs[row, col], top, request.params.logprobs))
            reason = self._append(request, token, now)
            if reason:
                return reason
        return None

    def _append(self, request: Request, token: int, now: float) -> str | None:
        """Record one sampled token (its constraint advanced past it) and the text so far; the finish
        reason when it ends the request. Stop strings count once more than min_tokens tokens exist
        (vLLM: before then EOS and stop ids are banned on device)."""
        if request.constraint is not None:
            request.constraint.accept(token)
        detokenized = self._detokenized.setdefault(request, _Detokenized())
        settled = len(detokenized.text)  # text no new token can change: it held no stop string
        request.output_token_ids.append(token)
        request.metrics.token_times.append(now)
        if request.metrics.first_token is None:
            request.metrics.first_token = now
        params = request.params
        stop_token = (token in self.eos and not params.ignore_eos) or token in params.stop_token_ids
        if not stop_token:  # the token that stops the output is not part of its text (vLLM's)
            request.text = self._detokenize(request.output_token_ids, detokenized, params.skip_special_tokens)
        reason = None
        if stop_token:
            reason = "stop"
        elif len(request.tokens) >= request.max_total_len:
            reason = "length"
        past_min = len(request.output_token_ids) > params.min_tokens
        if params.stop and past_min and self._hit_stop_string(request, settled):
            reason = "stop"
        if reason:
            del self._detokenized[request]
        return reason

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) if self.tokenizer else ""

    def _detokenize(self, ids: list[int], state: _Detokenized, skip_special_tokens: bool) -> str:
        """All of `ids` decoded, decoding only the ids since the last complete character (and the
        window before them); an incomplete character's U+FFFD stays out of `state` until it completes."""
        done = self.decode(ids[state.prefix:state.read], skip_special_tokens)
        new = self.decode(ids[state.prefix:], skip_special_tokens)[len(done):]
        if not new or new.endswith("\ufffd"):
            return state.text + new
        state.text += new
        state.prefix, state.read = state.read, len(ids)
        return state.text

    def _hit_stop_string(self, request: Request, settled: int) -> bool:
        """Cut the text before its first stop string, if it has one. Only a string ending past
        `settled` can be new: the search starts the longest stop string's length before it."""
        stop = request.params.stop
        start = max(0, settled - max(map(len, stop)) + 1)
        hits = [i for i in (request.text.find(s, start) for s in stop) if i >= 0]
        if hits:
            request.text = request.text[:min(hits)]
        return bool(hits)

    def stream_text(self, request: Request) -> str:
        """The text a stream may show so far: complete characters, nothing a stop string could take back."""
        text = request.text
        if request.status is not Status.FINISHED and request.params.stop:
            text = text[:max(0, len(text) - max(map(len, request.params.stop)) + 1)]
        return text.rstrip("\ufffd")  # an incomplete UTF-8 sequence waits for its next byte


def _logprob_entry(token: int, logprob: float, top: tuple[np.ndarray, np.ndarray] | None, k: int) -> dict[int, float]:
    """vLLM's per-token logprobs: {token: logprob} of the chosen token, then its k most likely alternatives."""
    entry = {token: float(logprob)}
    if top is not None:
        for alt, value in zip(top[0][:k].tolist(), top[1][:k].tolist()):
            entry.setdefault(alt, value)
    return entry


def _record_prompt_logprobs(s: ScheduledRequest, offset: int, result: StepResult) -> None:
    """Append the logprobs of the prompt tokens this chunk's flat positions (from `offset`) predict,
    each once (a request recomputed after preemption has them already)."""
    request, k = s.request, s.request.params.prompt_logprobs
    prompt = request.prompt_token_ids
    for i in range(s.num_tokens):
        target = s.start + i + 1
        if target == len(request.prompt_logprobs) and target < len(prompt):
            j = offset + i
            top = result.prompt_top_ids[j], result.prompt_top_logprobs[j]
            request.prompt_logprobs.append(_logprob_entry(prompt[target], result.prompt_logprobs[j], top, k))
