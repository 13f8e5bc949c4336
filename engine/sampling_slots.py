"""Sampling slots: the rows of the device penalty tables (engine/penalties.py), one per running
request that asks for penalties or biases, taken at admission and given back with its pages
(finished, aborted, failed or preempted). Row 0 is the null row of every other request.

Each holding gets a new lease number: the runner writes a slot's row when the lease it last wrote
differs, so a request that comes back (preempted, then readmitted) starts from its host tokens."""

from __future__ import annotations

import itertools

from engine.request import Request


class SlotAllocator:
    """Slots 1..slots-1 for the running requests with a LogitsRow (at most max_num_seqs of them)."""

    def __init__(self, slots: int):
        self._free = list(range(slots - 1, 0, -1))
        self._leases = itertools.count(1)

    def take(self, request: Request) -> None:
        """Give a request with a LogitsRow a slot and a new lease (others keep the null slot 0)."""
        if request.logits_row is None or request.sampling_slot:
            return
        assert self._free, "more running requests with penalties than sampling slots"
        request.sampling_slot, request.slot_lease = self._free.pop(), next(self._leases)

    def release(self, request: Request) -> None:
        """Take back the request's slot, if it holds one."""
        if request.sampling_slot:
            self._free.append(request.sampling_slot)
            request.sampling_slot = 0
