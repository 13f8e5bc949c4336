"""Progress bars where a person waits (loading weights, compiling the engine's shapes): shown on a
terminal, quiet in CI (the CI environment variable) and when stderr is not a terminal (logs, notebooks)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def quiet() -> bool:
    """Whether bars stay hidden: in CI, or with no terminal to draw on."""
    return bool(os.environ.get("CI")) or not sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """`items`, drawing a bar (removed when done) unless quiet()."""
    return iter(tqdm(items, desc=desc, total=total, disable=quiet(), leave=False))
