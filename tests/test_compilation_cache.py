"""The persistent compilation cache: a second process loads the engine's steps from disk, and a
corrupt entry (truncated, overwritten, one byte flipped) is recompiled, never changing a result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import compilation_cache

# Greedy with top-k logprobs beside seeded sampling, in a fresh process; prints what it produced.
RUN = """
import json
import jax
from benchmarks.compilations import count_compilations
from engine import LLM, SamplingParams
hits = [0]
jax.monitoring.register_event_listener(lambda event, **kw: hits.__setitem__(0, hits[0] + (event == "/jax/compilation_cache/cache_hits")))
with count_compilations() as compiles:
    llm = LLM("tiny-llama", page_size=8, max_model_len=64, max_num_seqs=2, prefill_chunk=16,
              max_num_batched_tokens=16, decode_steps=2, attention_impl="xla")
    outs = llm.generate([[1, 2, 3, 4, 5], [7] * 20],
                        [SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3),
                         SamplingParams(temperature=0.8, seed=3, max_tokens=5, ignore_eos=True)], use_tqdm=False)
print(json.dumps({"tokens": [o.token_ids for o in outs], "logprobs": [list(map(list, d.items())) for d in outs[0].logprobs],
                  "compiles": compiles[0], "hits": hits[0]}))
"""


def run(cache: Path) -> tuple[dict, str]:
    """RUN in a fresh process with the cache at `cache`: its result and its stderr."""
    env = {**os.environ, compilation_cache.ENV: str(cache), "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "always"}
    done = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def corrupt(entries: list[Path]) -> None:
    """Truncate, overwrite with zeros, or flip one byte in the middle of each entry, in turn."""
    for i, path in enumerate(entries):
        data = bytearray(path.read_bytes())
        if i % 3 == 0:
            data = data[:len(data) // 2]
        elif i % 3 == 1:
            data = bytearray(b"\0" * len(data))
        else:
            data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def test_second_process_hits_and_corrupt_entries_recompile(tmp_path):
    """The second process reads every entry the first wrote, except six corrupted ones, which it
    compiles again (jax warns): the outputs are bit-identical."""
    first, _ = run(tmp_path)
    entries = sorted(p for p in tmp_path.iterdir() if p.name.endswith("-cache"))
    assert first["hits"] == 0 and len(entries) > 6
    corrupt(entries[:6])
    second, stderr = run(tmp_path)
    assert second["tokens"] == first["tokens"] and second["logprobs"] == first["logprobs"]
    assert second["hits"] == len(entries) - 6  # (count_compilations counts cache loads too)
    assert stderr.count("Error reading persistent compilation cache entry") == 6


@pytest.mark.parametrize("value,expected", [("off", None), ("OFF", None), ("0", None), ("/x/y", Path("/x/y"))])
def test_cache_dir_from_environment(monkeypatch, value, expected):
    monkeypatch.setenv(compilation_cache.ENV, value)
    assert compilation_cache.cache_dir() == expected


def test_cache_dir_default_under_jaxserve_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation_cache.ENV)
    monkeypatch.setenv("JAXSERVE_CACHE", str(tmp_path))
    assert compilation_cache.cache_dir() == tmp_path / "xla"
