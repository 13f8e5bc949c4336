"""Host-side KV page allocator: reference counts, the prefix-key table and the LRU free queues
(page 0 of each shard is its reserved null page). No JAX.

With data-parallel attention (sharding/attention_shards.py) the pool is split into
`shards` equal ranges of page ids, one per attention shard, each held by that shard's devices:
shard s owns pages [s * P, (s + 1) * P) for P = num_pages / shards, its first one its null page.
A request takes every page from its own shard, and a cached prefix is found only on the shard
that holds it. With one shard (the default) this is one pool of pages 1..num_pages-1."""

from __future__ import annotations

import collections
from collections.abc import Iterable


class PageAllocator:
    """Hands out page ids 1..num_pages-1. A page whose count drops to 0 joins the free queue: with a
    prefix key at the back, keeping its contents and key for reuse (vLLM V1's free block queue), else
    at the front. Allocation takes from the front and evicts the key then, so cached pages never
    reduce the capacity a request can get, and the least recently freed cached page goes first.
    """

    def __init__(self, num_pages: int, shards: int = 1):
        if shards < 1 or num_pages % shards:
            raise ValueError(f"{num_pages} KV pages cannot be split into {shards} equal attention shards")
        if num_pages // shards < 2:
            raise ValueError(f"need at least 2 pages per shard (page 0 is reserved), got {num_pages // shards}")
        self.num_pages, self.shards = num_pages, shards
        self.pages_per_shard = num_pages // shards
        self._free: list[collections.OrderedDict[int, None]] = [
            collections.OrderedDict.fromkeys(range(s * self.pages_per_shard + 1, (s + 1) * self.pages_per_shard))
            for s in range(shards)]
        self._refs = [0] * num_pages
        self._key_of: dict[int, tuple[int, bytes]] = {}
        self._page_of: dict[tuple[int, bytes], int] = {}

    @property
    def num_free(self) -> int:
        return sum(len(free) for free in self._free)

    @property
    def capacity(self) -> int:
        """Pages that can ever be held: all but each shard's null page."""
        return self.num_pages - self.shards

    def num_free_in(self, shard: int) -> int:
        return len(self._free[shard])

    def shard_of(self, page: int) -> int:
        return page // self.pages_per_shard

    def local(self, page: int) -> int:
        """The page's id within its shard's pool (what that shard's devices index)."""
        return page % self.pages_per_shard

    def can_allocate(self, n: int, shard: int = 0) -> bool:
        return n <= len(self._free[shard])

    def allocate(self, n: int, shard: int = 0) -> list[int]:
        """n pages of count 1 from the front of `shard`'s free queue (evicting their keys)."""
        free = self._free[shard]
        if n > len(free):
            raise RuntimeError(f"out of KV pages: asked for {n}, {len(free)} free" +
                               (f" on attention shard {shard}" if self.shards > 1 else ""))
        pages = [free.popitem(last=False)[0] for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
            key = self._key_of.pop(p, None)
            if key is not None:
                del self._page_of[key]
        return pages

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each of one sequence's pages. The last page is queued first: a
        prefix's tail is evicted before its head, which more requests share (vLLM does the same)."""
        for p in reversed(pages):
            if self._refs[p] <= 0:
                raise RuntimeError(f"page {p} freed more often than allocated")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                free = self._free[self.shard_of(p)]
                free[p] = None
                if p not in self._key_of:
                    free.move_to_end(p, last=False)  # holds nothing reusable: hand it out first

    # ---- the prefix-key table ---------------------------------------------------------------
    def cached(self, key: bytes, shard: int = 0) -> int | None:
        """The page of `shard` holding the full page of tokens `key` names, if any."""
        return self._page_of.get((shard, key))

    def key_of(self, page: int) -> bytes | None:
        """The key `page` is registered under, if any."""
        entry = self._key_of.get(page)
        return None if entry is None else entry[1]

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def num_free_of(self, pages: Iterable[int]) -> int:
        """How many of `pages` are in the free queue (sharing them takes them out of it)."""
        return sum(self._refs[p] == 0 for p in pages)

    def share(self, pages: list[int]) -> None:
        """One more reference to each cached page (out of the free queue if it was there)."""
        for p in pages:
            if self._refs[p] == 0:
                del self._free[self.shard_of(p)][p]
            self._refs[p] += 1

    def register(self, page: int, key: bytes) -> None:
        """Record that held `page` is full and its tokens have key `key`. A key cached already (the
        same tokens computed twice, e.g. two identical prompts in one step) keeps its first page."""
        if self._refs[page] <= 0:
            raise RuntimeError(f"page {page} registered while free")
        entry = (self.shard_of(page), key)
        if entry not in self._page_of and page not in self._key_of:
            self._page_of[entry] = page
            self._key_of[page] = entry

    def forget_cached(self) -> None:
        """Drop every key (the cache contents were lost); the pages themselves stay where they are."""
        self._key_of.clear()
        self._page_of.clear()

    def check(self, holders: Iterable[list[int]]) -> None:
        """Raise AssertionError unless every page but the null pages is free xor held (in its own
        shard's queue), each count equals the number of `holders` (page lists) holding it, and the
        key table is one-to-one."""
        counts = collections.Counter(p for pages in holders for p in pages)
        for p in range(self.num_pages):
            free = p in self._free[self.shard_of(p)]
            if self.local(p) == 0:
                assert not counts[p] and not free, f"the null page {p} is held or free"
                continue
            assert self._refs[p] == counts[p], f"page {p}: count {self._refs[p]}, held {counts[p]} times"
            assert free != (counts[p] > 0), f"page {p}: free={free}, held={counts[p]}"
        assert len(self._key_of) == len(self._page_of), "key table not one-to-one"
        assert all(self._key_of[p] == k for k, p in self._page_of.items()), "key table not one-to-one"
