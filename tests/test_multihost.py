"""Multi-host on one machine: two processes (4 CPU devices each, gloo collectives) form one
8-device mesh through jax.distributed, and their sharded forward equals the single-process one."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models import load_model

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_processes_match_single_process(tmp_path):
    out, port = tmp_path / "logits.npy", str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    workers = [subprocess.Popen([sys.executable, "tests/multihost_worker.py", port, str(i), str(out)], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    logs = [w.communicate(timeout=240)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n---\n".join(log[-3000:] for log in logs)
    reference = np.asarray(load_model("tiny-gpt-oss").forward(np.arange(64).reshape(4, 16) % 256))
    np.testing.assert_allclose(np.load(out), reference, rtol=0, atol=1e-5)
