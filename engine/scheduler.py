"""FCFS scheduler: admission, chunked prefill, decode batches and preemption. Policy only, no JAX."""

from __future__ import annotations

import collections
import dataclasses

from engine.config import EngineConfig, bucket
from engine.page_allocator import PageAllocator
from engine.request import Request, Status


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    """Tokens [start, start + length) of `request.tokens` to run this step."""

    request: Request
    start: int
    length: int

    @property
    def completes_prefill(self) -> bool:
        return self.start + self.length == self.request.prefill_target


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """One step: prefill chunks or decode requests (never both), and who was preempted for it."""

    prefill: list[PrefillChunk]
    decode: list[Request]
    preempted: list[Request]


class Scheduler:
    """Prefill first (continuing chunked prompts, then admitting new ones), else decode everyone."""

    def __init__(self, config: EngineConfig, allocator: PageAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        preempted = []
        while True:
            prefill = self._schedule_prefill()
            if prefill:
                return SchedulerOutput(prefill, [], preempted)
            if any(not r.is_prefilling for r in self.running) or not self.running:
                break
            # Every running request is mid-prefill and blocked on pages: free the newest one's.
            preempted.append(self.running[-1])
            self._preempt(self.running[-1])
        preempted += self._reserve_decode_pages()
        return SchedulerOutput([], [r for r in self.running if not r.is_prefilling], preempted)

    def finish(self, request: Request) -> None:
        """Release a finished request's pages."""
        self.running.remove(request)
        request.status = Status.FINISHED
        self._release(request)

    def preempt_all(self) -> None:
        """Requeue every running request to recompute from its tokens (when the KV cache was lost)."""
        for request in self.running[::-1]:  # newest first: each goes to the front of the queue
            self._preempt(request)

    def _pages_needed(self, request: Request, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.config.page_size) - len(request.pages))

    def _try_grow(self, request: Request, num_tokens: int) -> bool:
        """Give `request` pages for its first `num_tokens` tokens, if the pool has them."""
        need = self._pages_needed(request, num_tokens)
        if not self.allocator.can_allocate(need):
            return False
        request.pages += self.allocator.allocate(need)
        return True

    def _schedule_prefill(self) -> list[PrefillChunk]:
        budget, rows = self.config.max_num_batched_tokens, []
        candidates = [r for r in self.running if r.is_prefilling] + list(self.waiting)
        for request in candidates:
            if budget <= 0 or len(rows) >= self.config.max_num_seqs:
                break
            if request.status is Status.WAITING and len(self.running) >= self.config.max_num_seqs:
                break
            length = min(request.prefill_target - request.num_computed, self.config.prefill_chunk, budget)
            if rows and self._padded_tokens(rows, length) > self.config.max_num_batched_tokens:
                break
            if not self._try_grow(request, request.num_computed + length):
                break
            if request.status is Status.WAITING:
                self.waiting.popleft()
                request.status = Status.RUNNING
                self.running.append(request)
            rows.append(PrefillChunk(request, request.num_computed, length))
            budget -= length
        return rows

    def _padded_tokens(self, rows: list[PrefillChunk], length: int) -> int:
        """Tokens the step would compute once rows and chunk width are rounded up to their buckets."""
        width = bucket(max([length] + [c.length for c in rows]), self.config.chunk_buckets)
        return bucket(len(rows) + 1, self.config.batch_buckets) * width

    def _reserve_decode_pages(self) -> list[Request]:
        """Pages for the next decode_steps tokens of every running request; preempt the newest if short."""
        preempted = []
        for request in [r for r in self.running if not r.is_prefilling]:
            if request not in self.running:
                continue  # preempted below on behalf of an older request
            target = min(len(request.tokens) - 1 + self.config.decode_steps, request.max_total_len)
            while not self._try_grow(request, target):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
        return preempted

    def _preempt(self, request: Request) -> None:
        """Free all pages and requeue at the front to recompute prompt + generated tokens."""
        self.running.remove(request)
        self._release(request)
        request.num_computed = 0
        request.prefill_target = len(request.tokens)
        request.status = Status.WAITING
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.allocator.free(request.pages)
        request.pages = []
