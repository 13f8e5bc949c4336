"""Operations on the engine itself (a weight update, sleep, wake-up) that HTTP handlers hand to the
engine thread (server/engine_loop.py), which alone touches the LLM.

An operation runs between steps in two parts: `prepare` when it reaches the front of the queue
(a weight update loads and checks its checkpoint there: a bad one is answered at once and nothing
changes), then `apply` once no request is unfinished. `running` says how it gets there: "abort"
ends every open stream with "abort" right after `prepare`, "finish" lets them run to completion
(streaming as usual) while new requests wait, admitted after `apply`; None (wake-up, a query)
applies at once, between two steps.
The handler awaits `result`: apply's value, or the error either part raised.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from engine.llm import LLM

RUNNING = ("finish", "abort")


@dataclasses.dataclass
class EngineOp:
    """One operation: what it runs on the engine thread and the future its handler awaits."""

    name: str
    apply: Callable[[LLM, Any], Any]
    loop: asyncio.AbstractEventLoop
    prepare: Callable[[LLM], Any] = lambda llm: None
    running: str | None = None
    result: asyncio.Future = dataclasses.field(init=False)
    prepared: Any = dataclasses.field(init=False, default=None)
    prepare_s: float | None = dataclasses.field(init=False, default=None)  # set once prepare returned

    def __post_init__(self) -> None:
        if self.running not in (None, *RUNNING):
            raise ValueError(f"running must be \"finish\" or \"abort\", got {self.running!r}")
        self.result = self.loop.create_future()

    def start(self, llm: LLM) -> bool:
        """Run `prepare` (engine thread); False if it failed (the handler has its error)."""
        started = time.perf_counter()
        try:
            self.prepared = self.prepare(llm)
        except Exception as e:  # noqa: BLE001 (the handler answers it; the engine goes on)
            self.fail(e)
            return False
        self.prepare_s = time.perf_counter() - started
        return True

    def finish(self, llm: LLM) -> None:
        """Run `apply` (engine thread, no request unfinished) and hand its value to the handler."""
        try:
            value = self.apply(llm, self.prepared)
        except Exception as e:  # noqa: BLE001
            self.fail(e)
            return
        self._post(lambda: self.result.set_result(value))

    def fail(self, error: BaseException) -> None:
        self._post(lambda: self.result.set_exception(error))

    def _post(self, resolve: Callable[[], None]) -> None:
        """Resolve the future on its event loop, unless the handler already left (cancelled)."""
        def run() -> None:
            if not self.result.done():
                resolve()
        try:
            self.loop.call_soon_threadsafe(run)
        except RuntimeError:  # the event loop is closed: nobody is waiting
            pass
