"""The step policy (vLLM V1): one token budget per step, running requests first, then admissions.

Each step the running requests get their next tokens in order (a decode: 1; a prompt being
prefilled: a chunk of at most prefill_chunk), then waiting requests are admitted while the budget,
max_num_seqs and the page pool allow. A long prompt is split over steps and never blocks decodes.
When pages run out the newest running request is preempted (its pages freed, recomputed later).
An admitted request first takes its longest run of cached full pages (engine/prefix_cache.py).
A later sequence of a prompt's n (engine/parallel_sampling.py) waits at the queue's head while
its first sequence computes the prompt, then shares that one's full prompt pages by reference.
With data-parallel attention (EngineConfig.attention_shards > 1) each admission assigns the request
to a shard: the one with the longest cached prefix for it, then the most free pages, among those
with a free sequence slot and budget left. A shard has its own page pool, max_num_seqs / shards
slots and budget / shards tokens; preemption frees pages on the shard that needs them.
Two policies read what the engine measured (engine/step_costs.py): while requests decode, a step's
prefill is capped to mixed_step_ratio of their decode step, and decode-only calls run decode_steps
steps only where that was measured multi_step_min_gain faster per token.
Policy only: no JAX, no sampled tokens (engine/output_processor.py applies those).
"""

from __future__ import annotations

import collections
import dataclasses

from engine.config import EngineConfig, bucket
from engine.page_allocator import PageAllocator
from engine.prefix_cache import PrefixCache
from engine.request import Request, Status
from engine.sampling_slots import SlotAllocator
from engine.step_costs import StepCosts


@dataclasses.dataclass(frozen=True)
class ScheduledRequest:
    """Tokens [start, start + num_tokens) of `request.tokens` + `drafts` run this step (a
    speculative decode: its last token and the drafts after it, provisionally)."""

    request: Request
    start: int
    num_tokens: int
    drafts: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        """One past the last position this step computes (its context length after the step)."""
        return self.start + self.num_tokens

    @property
    def token_ids(self) -> list[int]:
        known = min(self.end, self.request.num_tokens)
        return self.request.tokens_between(self.start, known) + list(self.drafts[:self.end - known])

    @property
    def samples(self) -> bool:
        """Whether the step's last token of this request yields a kept sample (not mid-prompt)."""
        return self.end >= self.request.prefill_target


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """One step: what runs, and how many decode steps its call takes (> 1 only when decode-only)."""

    scheduled: list[ScheduledRequest]
    decode_steps: int

    @property
    def is_decode_only(self) -> bool:
        return all(s.num_tokens == 1 and not s.request.is_prefilling for s in self.scheduled)


class Scheduler:
    """Waiting and running queues, admission, chunked prefill, preemption."""

    def __init__(self, config: EngineConfig, allocator: PageAllocator, prefix_cache: PrefixCache | None = None,
                 costs: StepCosts | None = None):
        self.config = config
        self.allocator = allocator
        self.costs = costs or StepCosts()  # measured by LLM.step; read by the adaptive policies
        self.prefix_cache = prefix_cache or PrefixCache(allocator, config.page_size, config.enable_prefix_caching)
        self.slots = SlotAllocator(config.sampling_slots)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budgets = [self.config.tokens_per_shard] * self.config.attention_shards  # per attention shard
        prefill = self._prefill_budgets()
        scheduled, preempted = [], []
        for request in list(self.running):
            if request not in self.running or budgets[request.shard] == 0:
                continue  # preempted on behalf of an older request, or no budget left
            n = self._next_tokens(request, min(budgets[request.shard], prefill[request.shard]))
            if n and self._grow_or_preempt(request, request.num_computed + n, preempted):
                scheduled.append(ScheduledRequest(request, request.num_computed, n))
                budgets[request.shard] -= n
                prefill[request.shard] -= n if request.is_prefilling else 0
        scheduled = [self._with_draft_slots(s, budgets) for s in scheduled]
        if not preempted:
            self._admit(scheduled, [min(b, p) for b, p in zip(budgets, prefill)])
        return SchedulerOutput(scheduled, self._decode_steps(scheduled))

    def _next_tokens(self, request: Request, budget: int) -> int:
        """A decode: 1 (its draft slots come after every request's tokens: _with_draft_slots); else
        the next prefill chunk that fits the budget (`budget`: the step's prefill tokens left)."""
        if not request.is_prefilling:
            return 1
        return min(request.prefill_target - request.num_computed, self.config.prefill_chunk, budget)

    def _prefill_budgets(self) -> list[int]:
        """Per shard, the prefill tokens this step may carry: its token budget, or while requests decode
        there, what fills the largest token bucket (the compiled step it runs as) that keeps the step
        within mixed_step_ratio of their decode step, by the step-cost line measured so far
        (StepCosts.max_tokens); at least one page, so prompts always advance."""
        budgets = [self.config.tokens_per_shard] * self.config.attention_shards
        if self.config.mixed_step_ratio is None:
            return budgets
        buckets = [b // self.config.attention_shards for b in self.config.token_buckets]
        decodes = collections.Counter(r.shard for r in self.running if not r.is_prefilling)
        for shard, n in decodes.items():
            most = self.costs.max_tokens(bucket(n, tuple(buckets)), self.config.mixed_step_ratio)
            if most is not None:
                fits = max((b for b in buckets if b <= most), default=0)
                budgets[shard] = min(budgets[shard], max(fits - n, self.config.page_size))
        return budgets

    def _with_draft_slots(self, s: ScheduledRequest, budgets: list[int]) -> ScheduledRequest:
        """A speculative decode with K draft slots after its token, as many as it can still emit and
        the budget and the free pages hold. Drafts never preempt (the proposer may fill fewer)."""
        request, k = s.request, self.config.num_speculative_tokens
        if not k or request.is_prefilling:
            return s
        want = min(k, request.max_total_len - request.num_tokens - 1, budgets[request.shard])
        free = self.allocator.num_free_in(request.shard) * self.config.page_size
        slots = max(0, min(want, len(request.pages) * self.config.page_size + free - s.end))
        grown = self._try_grow(request, s.end + slots)
        assert grown, "draft slots are sized to the free pages"
        budgets[request.shard] -= slots
        return ScheduledRequest(request, s.start, s.num_tokens + slots)

    def _admit(self, scheduled: list[ScheduledRequest], budgets: list[int]) -> None:
        """Start waiting requests (FCFS) while budget (of prefill tokens), sequence slots and pages
        allow (per shard)."""
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if self._awaits_prompt(request):
                break  # FCFS: it, and those behind it, wait for the prompt pages it will share
            n = self._start_on_a_shard(request, budgets)
            if n is None:
                break
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.slots.take(request)
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, request.num_computed, n))
            budgets[request.shard] -= n

    def _start_on_a_shard(self, request: Request, budgets: list[int]) -> int | None:
        """Start a waiting request on a shard with a free slot, budget and the pages of its first
        chunk, preferring the longest cached prefix, then the most free pages (without DP attention:
        shard 0). Returns the chunk's tokens; None when no shard can take it."""
        seats = collections.Counter(r.shard for r in self.running)
        shared = self._prompt_pages(request)  # a later sequence of n: only on its first one's shard
        hits = {d: shared or self.prefix_cache.lookup(request, d) for d in range(self.config.attention_shards)
                if budgets[d] > 0 and seats[d] < self.config.seqs_per_shard  # a waiting request prefills from 0
                and (not shared or d == request.parent.shard)}
        for d in sorted(hits, key=lambda d: (-len(hits[d]), -self.allocator.num_free_in(d), d)):
            request.shard = d
            n = min(request.prefill_target - len(hits[d]) * self.config.page_size, self.config.prefill_chunk,
                    budgets[d])
            if self._try_start(request, hits[d], n):
                if shared:
                    _inherit_prompt_logprobs(request, len(shared) * self.config.page_size)
                return n
        return None

    # ---- parallel sampling (engine/parallel_sampling.py) ---------------------------------------
    def _shared_prompt_len(self, request: Request) -> int:
        """The prompt tokens a later sequence of n takes from its first one: the full pages before
        its last prompt token (which each sequence computes, to sample its own first token)."""
        if request.parent is None:
            return 0
        return (len(request.prompt_token_ids) - 1) // self.config.page_size * self.config.page_size

    def _awaits_prompt(self, request: Request) -> bool:
        """Whether a later sequence of n waits to be admitted: its first one is running, short of
        the prompt pages it will share (computing them itself would repeat the prefill)."""
        parent = request.parent
        return (parent is not None and parent.status is Status.RUNNING
                and parent.num_computed < self._shared_prompt_len(request))

    def _prompt_pages(self, request: Request) -> list[int]:
        """The full prompt pages a later sequence of n shares (by reference) with its first one:
        [] unless that one is running with them computed (finished or preempted: none; the prefix
        cache may still hold them)."""
        parent = request.parent
        if parent is None or parent.status is not Status.RUNNING:
            return []
        return parent.pages[:min(self._shared_prompt_len(request), parent.num_computed) // self.config.page_size]

    def _decode_steps(self, scheduled: list[ScheduledRequest]) -> int:
        """decode_steps for a decode-only step whose requests all get pages for that many more
        tokens without preempting anyone (nothing waits that could be admitted), and where that was
        measured to pay by multi_step_min_gain (StepCosts.decode_steps: else one step, each token
        streamed as soon as it is sampled), else 1. A step
        holding a constrained request takes one token (its next mask depends on the token drawn), as
        does one holding a research hook, and every step when the engine counts experts (the mixed
        step runs the hooks: engine/model_hooks.py)."""
        steps = self.config.decode_steps
        if steps == 1 or not scheduled or (self.waiting and len(self.running) < self.config.max_num_seqs):
            return 1
        if self.config.count_experts or any(s.request.constraint is not None or s.request.params.hooked
                                            for s in scheduled):
            return 1
        if not SchedulerOutput(scheduled, 1).is_decode_only:
            return 1
        if self.config.multi_step_min_gain is not None:
            rows = bucket(len(scheduled), self.config.batch_buckets)
            steps = self.costs.decode_steps(rows, steps, self.config.multi_step_min_gain)
        for s in scheduled:
            if not self._try_grow(s.request, min(s.start + steps, s.request.max_total_len)):
                return 1
        return steps

    def finish(self, request: Request, reason: str) -> None:
        """End a request (finished, aborted or failed): out of its queue, pages freed at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
        self._release(request)

    def preempt_all(self) -> None:
        """Every running request back to waiting for recompute (after the KV cache was lost)."""
        for request in reversed(list(self.running)):
            self._preempt(request)

    def run_ahead(self, output: SchedulerOutput) -> SchedulerOutput | None:
        """The next decode-only step of `output`'s requests, scheduled before its tokens are known
        (as if none finished: rows of those that did are discarded), when nothing else could run and
        the pool has their pages without preempting; else None."""
        steps = output.decode_steps
        if not self.config.async_scheduling or steps == 1:
            return None
        if self.waiting and len(self.running) < self.config.max_num_seqs:
            return None
        if [s.request for s in output.scheduled] != self.running:
            return None
        if all(s.start + 1 + steps >= s.request.max_total_len for s in output.scheduled):
            return None  # every request ends within `output`: nothing to run ahead
        for s in output.scheduled:
            if not self._try_grow(s.request, min(s.start + 2 * steps, s.request.max_total_len)):
                return None
        return SchedulerOutput([ScheduledRequest(s.request, s.start + steps, 1) for s in output.scheduled], steps)

    def _try_grow(self, request: Request, num_tokens: int) -> bool:
        """Give `request` pages for its first `num_tokens` tokens, if the pool has them."""
        need = max(0, -(-num_tokens // self.config.page_size) - len(request.pages))
        if not self.allocator.can_allocate(need, request.shard):
            return False
        request.pages += self.allocator.allocate(need, request.shard)
        return True

    def _try_start(self, request: Request, hits: list[int], n: int) -> bool:
        """Give a waiting request the cached pages `hits` (shared) and its own pages for the `n`
        tokens after them, its prefill starting past the hits, if the pool has them."""
        computed = len(hits) * self.config.page_size
        need = -(-(computed + n) // self.config.page_size) - len(hits)
        if not self.allocator.can_allocate(need + self.allocator.num_free_of(hits), request.shard):
            return False
        self.allocator.share(hits)
        request.pages = hits + self.allocator.allocate(need, request.shard)
        request.num_computed = computed
        self.prefix_cache.record(request, len(hits))
        return True

    def _grow_or_preempt(self, request: Request, num_tokens: int, preempted: list[Request]) -> bool:
        """Pages for `num_tokens` of `request`, preempting the newest running requests of its
        shard for them; False when `request` itself had to go."""
        while not self._try_grow(request, num_tokens):
            victim = next(r for r in reversed(self.running) if r.shard == request.shard)
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def trim(self, request: Request) -> None:
        """Free the pages wholly past the request's tokens (after a verify step rejected drafts)."""
        keep = -(-request.num_tokens // self.config.page_size)
        self.allocator.free(request.pages[keep:])
        del request.pages[keep:]

    def _preempt(self, request: Request) -> None:
        """Free all pages and requeue at the front to recompute prompt + generated tokens."""
        self.running.remove(request)
        self._release(request)
        request.num_computed = 0
        request.prefill_target = request.num_tokens
        request.status = Status.WAITING
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.allocator.free(request.pages)
        request.pages = []
        self.slots.release(request)


def _inherit_prompt_logprobs(request: Request, shared: int) -> None:
    """A sequence sharing its first one's prompt pages takes that one's logprobs of the prompt
    tokens they predict (it computes only the positions from `shared`)."""
    if request.params.prompt_logprobs is not None and len(request.prompt_logprobs) <= shared:
        request.prompt_logprobs = request.parent.prompt_logprobs[:shared + 1]
