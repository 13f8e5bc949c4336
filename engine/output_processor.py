"""The one owner of a step's results: advance each request's computed tokens, append its sampled
tokens, register the pages it filled with the prefix cache, check stop conditions, finish it and
free its pages. The LLM facade only calls `apply`.

A verify step (speculation) appends a row's accepted drafts and then its drawn token, in order and
nothing past a stop; its computed tokens stop at the last accepted one (so only accepted tokens'
pages are ever cached), and pages past the new length are freed (rejected drafts' KV slots are
simply overwritten later)."""

from __future__ import annotations

import time

from absl import logging

from engine.request import Request, Status
from engine.runner import StepResult
from engine.scheduler import Scheduler, SchedulerOutput
from models.loading.tokenizer import Tokenizer


class OutputProcessor:
    """Applies step results; EOS ids and stop strings need the model's tokenizer."""

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer | None):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos = set(tokenizer.eos_token_ids) if tokenizer else set()

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
                done = self._apply_one(request, s.start + s.num_tokens - len(s.drafts), s.samples, result, row,
                                       steps, now)
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
            reason = self._append(request, int(result.tokens[row, col]), float(result.logprobs[row, col]), now)
            if reason:
                return reason
        return None

    def _append(self, request: Request, token: int, logprob: float, now: float) -> str | None:
        """Record one sampled token; the finish reason when it ends the request."""
        request.output_token_ids.append(token)
        request.output_logprobs.append(logprob)
        request.metrics.token_times.append(now)
        if request.metrics.first_token is None:
            request.metrics.first_token = now
        params = request.params
        reason = None
        if (token in self.eos and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        elif len(request.tokens) >= request.max_total_len:
            reason = "length"
        if params.stop and self._hit_stop_string(request):
            reason = "stop"
        if reason and not params.stop:
            request.text = self.decode(request.output_token_ids)
        return reason

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer else ""

    def _hit_stop_string(self, request: Request) -> bool:
        """Update the text; on a stop string, cut the text before it."""
        request.text = self.decode(request.output_token_ids)
        hits = [i for i in (request.text.find(s) for s in request.params.stop) if i >= 0]
        if hits:
            request.text = request.text[:min(hits)]
        return bool(hits)

    def stream_text(self, request: Request) -> str:
        """The text a stream may show so far: complete characters, nothing a stop string could take back."""
        if request.status is Status.FINISHED:
            text = request.text
        else:
            text = self.decode(request.output_token_ids)
            if request.params.stop:
                text = text[:max(0, len(text) - max(map(len, request.params.stop)) + 1)]
        return text.rstrip("\ufffd")  # an incomplete UTF-8 sequence waits for its next byte
