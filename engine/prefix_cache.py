"""Automatic prefix caching (vLLM V1's hashed blocks): full pages keyed by a hash chain over their
tokens, looked up when a request is admitted and registered once their tokens are computed.

A page's key is blake2b(parent key, its token ids), the chain rooted in the cache's identity (the
model and its dtype), so equal keys mean equal KV contents. Partial pages are never keyed. Where a
page's KV also depends on tokens after it (`lookahead`: MTP's entry at a slot reads the embedding
of the next token), those tokens join its key, so a hit needs them equal too.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from engine.page_allocator import PageAllocator
from engine.request import Request


@dataclasses.dataclass
class PrefixCacheStats:
    """Prompt tokens admitted requests asked the cache for (queries) and the ones it had (hits);
    a preempted request's readmission is a query too."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def since(self, before: PrefixCacheStats) -> PrefixCacheStats:
        """The counts accumulated after the snapshot `before`."""
        return PrefixCacheStats(self.queries - before.queries, self.hits - before.hits)


def identity_key(*parts: object) -> bytes:
    """The root of the key chain: a hash of what else decides a page's contents (model, dtype)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def page_key(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a full page holding `tokens`, whose preceding page has key `parent`."""
    return hashlib.blake2b(parent + np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


class PrefixCache:
    """Finds a request's longest run of cached full pages and registers pages as they fill."""

    def __init__(self, allocator: PageAllocator, page_size: int, enabled: bool, identity: object = (),
                 lookahead: int = 0):
        self.allocator = allocator
        self.page_size = page_size
        self.enabled = enabled
        self.lookahead = lookahead
        self.root = identity_key(identity)
        self.stats = PrefixCacheStats()

    def _key(self, request: Request, i: int) -> bytes:
        """The key of `request`'s page i (its tokens and the lookahead after them must be known),
        memoized on the request."""
        keys, size = request.page_keys, self.page_size
        while len(keys) <= i:
            j = len(keys)
            tokens = request.tokens_between(j * size, (j + 1) * size + self.lookahead)
            keys.append(page_key(keys[-1] if keys else self.root, tokens))
        return keys[i]

    def _keyable(self, request: Request, num_tokens: int) -> int:
        """How many of the full pages holding `num_tokens` tokens can be keyed (lookahead known)."""
        return min(num_tokens, request.num_tokens - self.lookahead) // self.page_size

    def lookup(self, request: Request, shard: int = 0) -> list[int]:
        """The cached pages of `request`'s longest cached prefix, not yet referenced. The last
        prefill token is never among them (its logit must be computed), so writes start on a page
        of the request's own: with a fully cached prompt its whole last page is recomputed. A
        request asking for prompt logprobs computes its whole prompt (as vLLM). Only pages of
        attention shard `shard` are found (a shard's devices hold only their own pages)."""
        if not self.enabled or request.params.prompt_logprobs is not None or request.params.hooked:
            return []  # prompt logprobs (and captures, edits) need every prompt position: nothing may be skipped
        hits = []
        for i in range(self._keyable(request, request.prefill_target - 1)):
            page = self.allocator.cached(self._key(request, i), shard)
            if page is None:
                break
            hits.append(page)
        return hits

    def record(self, request: Request, num_hit_pages: int) -> None:
        """Count an admission that took `num_hit_pages` cached pages."""
        if self.enabled:
            self.stats.queries += request.prefill_target
            self.stats.hits += num_hit_pages * self.page_size

    def commit(self, request: Request, start: int) -> None:
        """Register the pages a step filled: it computed tokens [start, request.num_computed)."""
        if not self.enabled or request.params.interventions:
            return  # edited pages hold what the tokens alone would not: never shared
        for i in range(start // self.page_size, self._keyable(request, request.num_computed)):
            self.allocator.register(request.pages[i], self._key(request, i))
