"""The engine-control routes (vLLM's and SGLang's RL hooks): weight updates and sleep mode.

    POST /update_weights   {"path": orbax or HF checkpoint dir, "running": "finish" | "abort"}
    POST /sleep?level=1|2[&running=finish|abort]     POST /wake_up     GET /is_sleeping

Each runs on the engine thread between steps (server/engine_ops.py) and answers when done, with the
seconds it took. Loading a checkpoint reads a path on the server's machine and replaces what every
client is served, so the routes are on only where they are guarded: behind --api_key (the guard
of server/app.py asks for it on every route but /health), or where --enable_weight_updates says
the operator accepts an unauthenticated server (a trusted network, a local RL loop). Otherwise each
answers 403. A bad path or a checkpoint that does not match the served model is a 400 with the
reason; the engine goes on serving the weights it had.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict

from engine.llm import LLM
from engine.sleep_mode import check_level
from server import protocol
from server.engine_loop import EngineLoop
from server.engine_ops import EngineOp
from server.protocol import APIError


class UpdateWeightsRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")  # as server/protocol.py: an unknown field is a 400

    path: str
    running: Literal["finish", "abort"] = "finish"


def add_admin_routes(app: FastAPI, engine: EngineLoop, *, enabled: bool) -> None:
    """Add the routes to `app`; `enabled` False answers each with 403 (see the module docstring)."""

    async def run(op: EngineOp) -> dict:
        """Queue the operation on the engine thread and await it: its value, or a 400 with its error."""
        if not enabled:
            raise APIError(403, "engine control routes are off: start the server with --api_key (and send it) "
                                "or --enable_weight_updates", code="weight_updates_disabled")
        start = time.perf_counter()
        try:
            engine.run_op(op)
        except RuntimeError:
            raise APIError(503, "the engine is not running", code="engine_stopped") from None
        try:
            value = await op.result
        except (ValueError, RuntimeError) as e:
            raise APIError(400, str(e), code=f"{op.name}_failed") from None
        return {**(value or {}), "status": "ok", "time_s": round(time.perf_counter() - start, 6)}

    def op(name: str, apply, **kwargs) -> EngineOp:
        """An EngineOp answered on this event loop."""
        return EngineOp(name, apply, asyncio.get_running_loop(), **kwargs)

    @app.post("/update_weights")
    async def update_weights(request: Request) -> dict:
        body = protocol.parse(UpdateWeightsRequest, await request.body())
        update = op("update_weights", _apply_update, prepare=lambda llm: llm.prepare_weights(body.path),
                    running=body.running)
        return {**await run(update), "path": body.path, "load_s": round(update.prepare_s, 6)}

    @app.post("/sleep")
    async def sleep(request: Request) -> dict:
        level, running = _sleep_args(dict(request.query_params))
        return await run(op("sleep", lambda llm, _: _slept(llm, level), running=running))

    @app.post("/wake_up")
    async def wake_up() -> dict:
        return await run(op("wake_up", lambda llm, _: llm.wake_up()))

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict:
        return await run(op("is_sleeping", lambda llm, _: {"is_sleeping": llm.is_sleeping}))


def _apply_update(llm: LLM, prepared) -> None:
    """Swap in the prepared weights (no request is unfinished by now)."""
    llm.update_weights(prepared)


def _sleep_args(query: dict[str, str]) -> tuple[int, str]:
    """/sleep's query: level (vLLM's, default 1) and running (default "finish"), or a 400 naming the bad one."""
    unknown = next((name for name in query if name not in ("level", "running")), None)
    if unknown is not None:
        raise APIError(400, f"unknown parameter {unknown!r} (/sleep takes level and running)", param=unknown)
    level, running = query.get("level", "1"), query.get("running", "finish")
    try:
        check_level(int(level) if level.isdigit() else level)
    except ValueError as e:
        raise APIError(400, str(e), param="level") from None
    if running not in ("finish", "abort"):
        raise APIError(400, f"running must be \"finish\" or \"abort\", got {running!r}", param="running")
    return int(level), running


def _slept(llm: LLM, level: int) -> dict:
    """Put the engine to sleep; what it freed."""
    report = llm.sleep(level)
    return {"level": level, "freed_bytes": report.freed_bytes, "device_bytes_freed": report.device_bytes_freed}
