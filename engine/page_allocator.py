"""Host-side KV page allocator: a free list with reference counts (page 0 is the reserved null page)."""

from __future__ import annotations


class PageAllocator:
    """Hands out page ids 1..num_pages-1; a page returns to the free list when its count drops to 0.

    Reference counts guard against double frees (and let a prefix cache share pages later).
    """

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"need at least 2 pages (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"out of KV pages: asked for {n}, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"page {p} freed more often than allocated")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
