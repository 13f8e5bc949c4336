"""An OpenAI-compatible server in a subprocess (scripts/serve.py, vLLM): its own process group, its
output in a log file, ready once GET /health answers 200, stopped with Ctrl-C (SIGINT) to the whole
group and killed if it does not end. A server that dies while starting raises with its log's tail."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


class ServerProcess:
    """`command` started in its own session (it and its workers one process group), stdout and stderr
    into `log_path`; `url` is where it answers once ready."""

    def __init__(self, command: list[str], url: str, log_path: Path, env: dict[str, str] | None = None):
        self.command, self.url, self.log_path = command, url, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def wait_ready(self, timeout_s: float, poll_s: float = 0.5) -> float:
        """Seconds until /health answered 200; raises if the server exits or `timeout_s` passes first."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command[:3]} exited ({self.proc.returncode}) before it was ready; "
                                   f"{self.log_path}:\n{log_tail(self.log_path)}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(poll_s)
        raise RuntimeError(f"{self.url}/health did not answer 200 in {timeout_s:.0f} s; {self.log_path}:\n"
                           f"{log_tail(self.log_path)}")

    def stop(self, grace_s: float = 60) -> int:
        """SIGINT to the process group, then SIGKILL to what is left of it (the server after `grace_s`,
        or workers it left behind); the server's exit status."""
        if self.proc.poll() is None:
            self._signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)
        return self.proc.wait()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:  # the group is gone
            pass

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
