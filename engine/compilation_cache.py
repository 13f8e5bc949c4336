"""The persistent XLA compilation cache: a second process with the same model and shapes loads its
compiled steps from disk instead of compiling them again (most of a first answer's latency on CPU).

Where: JAXSERVE_XLA_CACHE (a directory, or "off"), else $JAXSERVE_CACHE/xla, else
~/.cache/jaxserve/xla. A directory set through jax itself (jax_compilation_cache_dir) is left alone.
jax keys each entry by the program, the compile options, the jax/jaxlib version and the devices, so
an entry written by another version or configuration is never read; an entry that fails to
decompress or deserialize (a truncated or corrupt file) is warned about and compiled afresh.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from absl import logging

ENV = "JAXSERVE_XLA_CACHE"
OFF = ("off", "0", "false", "none", "")
MIN_COMPILE_SECS = 0.1  # cheaper compilations (eager ops) are not worth a file each


def cache_dir() -> Path | None:
    """The cache directory the environment asks for, or None when it turns the cache off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else Path(value).expanduser()
    return Path(os.environ.get("JAXSERVE_CACHE", Path.home() / ".cache" / "jaxserve")) / "xla"


def enable() -> Path | None:
    """Point jax's persistent cache at cache_dir() (once per process; idempotent); returns the
    directory in use, or None when off."""
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    path = cache_dir()
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    jax.config.update("jax_compilation_cache_dir", str(path))
    logging.info("persistent XLA compilation cache: %s", path)
    return path
