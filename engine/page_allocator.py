"""Host-side KV page allocator: reference counts, the prefix-key table and the LRU free queue
(page 0 is the reserved null page). No JAX."""

from __future__ import annotations

import collections
from collections.abc import Iterable


class PageAllocator:
    """Hands out page ids 1..num_pages-1. A page whose count drops to 0 joins the free queue: with a
    prefix key at the back, keeping its contents and key for reuse (vLLM V1's free block queue), else
    at the front. Allocation takes from the front and evicts the key then, so cached pages never
    reduce the capacity a request can get, and the least recently freed cached page goes first.
    """

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"need at least 2 pages (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(1, num_pages))
        self._refs = [0] * num_pages
        self._key_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n pages of count 1 from the front of the free queue (evicting their keys)."""
        if n > len(self._free):
            raise RuntimeError(f"out of KV pages: asked for {n}, {len(self._free)} free")
        pages = [self._free.popitem(last=False)[0] for _ in range(n)]
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
                self._free[p] = None
                if p not in self._key_of:
                    self._free.move_to_end(p, last=False)  # holds nothing reusable: hand it out first

    # ---- the prefix-key table ---------------------------------------------------------------
    def cached(self, key: bytes) -> int | None:
        """The page holding the full page of tokens `key` names, if any."""
        return self._page_of.get(key)

    def key_of(self, page: int) -> bytes | None:
        """The key `page` is registered under, if any."""
        return self._key_of.get(page)

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def num_free_of(self, pages: Iterable[int]) -> int:
        """How many of `pages` are in the free queue (sharing them takes them out of it)."""
        return sum(self._refs[p] == 0 for p in pages)

    def share(self, pages: list[int]) -> None:
        """One more reference to each cached page (out of the free queue if it was there)."""
        for p in pages:
            if self._refs[p] == 0:
                del self._free[p]
            self._refs[p] += 1

    def register(self, page: int, key: bytes) -> None:
        """Record that held `page` is full and its tokens have key `key`. A key cached already (the
        same tokens computed twice, e.g. two identical prompts in one step) keeps its first page."""
        if self._refs[page] <= 0:
            raise RuntimeError(f"page {page} registered while free")
        if key not in self._page_of and page not in self._key_of:
            self._page_of[key] = page
            self._key_of[page] = key

    def forget_cached(self) -> None:
        """Drop every key (the cache contents were lost); the pages themselves stay where they are."""
        self._key_of.clear()
        self._page_of.clear()

    def check(self, holders: Iterable[list[int]]) -> None:
        """Raise AssertionError unless every page but 0 is free xor held, each count equals the number
        of `holders` (page lists) holding it, and the key table is one-to-one."""
        counts = collections.Counter(p for pages in holders for p in pages)
        assert 0 not in counts and 0 not in self._free, "the null page is held or free"
        for p in range(1, self.num_pages):
            assert self._refs[p] == counts[p], f"page {p}: count {self._refs[p]}, held {counts[p]} times"
            assert (p in self._free) != (counts[p] > 0), f"page {p}: free={p in self._free}, held={counts[p]}"
        assert len(self._key_of) == len(self._page_of), "key table not one-to-one"
        assert all(self._key_of[p] == k for k, p in self._page_of.items()), "key table not one-to-one"
