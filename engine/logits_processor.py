"""Logits processors: user-defined, per-request logits transforms compiled into the engine's steps.

A `LogitsProcessor` is a pure jnp function of a batch's float32 logits [B, V], its per-row
arguments (each an `Arg` of fixed shape and dtype, so every batch has the same shapes and no
request compiles anything) and the rows' positions. It is registered once, at engine creation
(`LLM(..., logits_processors=[...])`), and a request turns it on by naming it in
`SamplingParams.logits_processor_args` ({processor name: {argument name: value}}); the arguments
a request leaves out, and every row of the requests that do not name it, take the Arg's default.

Each step applies the registered processors in order after the built-in penalties and biases and
before temperature, top-k, top-p and min-p (engine/sampler.py processed_logits): in the mixed
step, the multi-step decode loop and the speculative verify step (at each verified position).
Logprobs stay the raw model's. A batch in which no row names a processor skips it (a lax.cond),
and a row that does not name it keeps its logits bit for bit (a where).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np


class RequestLike(Protocol):
    """What a batch reads of a request (engine.request.Request, which imports this module)."""

    prompt_token_ids: list[int]
    params: Any  # SamplingParams: its logits_processor_args


FIELD = "logits_processor_args"  # the SamplingParams field (and server request field) holding the arguments


@dataclasses.dataclass(frozen=True)
class Arg:
    """One per-row argument: its shape per row, its dtype, and the value of rows that do not set it
    (which also pads a shorter 1-D value). token_ids: values are token ids, -1 for none (checked
    against the vocabulary at admission)."""

    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    default: float | int | bool = 0
    token_ids: bool = False


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
    """What a processor reads besides its arguments, per row [B]: the position its sampled token
    will occupy, its request's prompt length and, for a processor that `reads_counts`, how often
    each token was generated so far [B, V] int32 (the request's device state, engine/penalties.py)."""

    positions: jax.Array
    prompt_lens: jax.Array
    counts: jax.Array | None = None

    @property
    def generated(self) -> jax.Array:
        """How many output tokens precede the token being sampled [B] (negative mid-prompt)."""
        return self.positions - self.prompt_lens


@dataclasses.dataclass(frozen=True, eq=False)
class LogitsProcessor:
    """A named transform: apply(logits [B, V] float32, {argument: [B, *shape]}, Rows) -> [B, V].
    reads_counts: it reads Rows.counts, so a request naming it keeps its generated-token counts on
    the device (a sampling slot, updated after every kept token). Compared and hashed by identity:
    the processors are the static part of a compiled step."""

    name: str
    apply: Callable[[jax.Array, dict[str, jax.Array], Rows], jax.Array]
    args: Mapping[str, Arg]
    reads_counts: bool = False


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProcessorBatch:
    """A step's rows [B]: each processor's arguments [B, *shape], which rows use it, and the rows'
    prompt lengths; the processors themselves are the pytree's static part."""

    processors: tuple[LogitsProcessor, ...] = dataclasses.field(metadata=dict(static=True))
    args: dict[str, dict[str, jax.Array]]
    used: dict[str, jax.Array]
    prompt_lens: jax.Array

    @classmethod
    def of(cls, processors: tuple[LogitsProcessor, ...], requests: Sequence[RequestLike], rows: int,
           at: np.ndarray | None = None) -> ProcessorBatch | None:
        """Host arrays of `rows` rows, request i's at row at[i] (default i); None without processors."""
        if not processors:
            return None
        where = np.arange(len(requests)) if at is None else at
        args = {p.name: {a: np.full((rows, *s.shape), s.default, s.dtype) for a, s in p.args.items()}
                for p in processors}
        used = {p.name: np.zeros((rows,), bool) for p in processors}
        prompt_lens = np.zeros((rows,), np.int32)
        for r, row in zip(requests, where):
            prompt_lens[row] = len(r.prompt_token_ids)
            for name, values in r.params.logits_processor_args.items():
                used[name][row] = True
                for arg, value in values.items():
                    args[name][arg][row] = value
        return cls(processors, args, used, prompt_lens)

    def apply(self, logits: jax.Array, positions: jax.Array,
              counts: Callable[[], jax.Array] | None = None) -> jax.Array:
        """logits [B, V] float32 through every processor, in order, on the rows that use it;
        counts() gives the rows' token counts [B, V] (traced only inside a processor that reads them)."""
        rows = Rows(positions, self.prompt_lens)
        for p in self.processors:
            if p.reads_counts and counts is None:
                raise ValueError(f"logits processor {p.name!r} reads token counts: the step has no penalty tables")
            used = self.used[p.name]
            run = functools.partial(_run, p, args=self.args[p.name], rows=rows, used=used,
                                    counts=counts if p.reads_counts else None)
            logits = jax.lax.cond(jnp.any(used), run, lambda x: x, logits)
        return logits


def _run(p: LogitsProcessor, logits: jax.Array, args: dict[str, jax.Array], rows: Rows, used: jax.Array,
         counts: Callable[[], jax.Array] | None) -> jax.Array:
    """p's logits on the rows that use it, the others' unchanged (a wrong shape fails at trace time)."""
    if counts is not None:
        rows = dataclasses.replace(rows, counts=counts())
    out = p.apply(logits, args, rows)
    if out.shape != logits.shape:
        raise ValueError(f"logits processor {p.name!r} returned shape {out.shape}, not the logits' {logits.shape}")
    return jnp.where(used[:, None], out.astype(jnp.float32), logits)


def checked_processors(processors: object) -> tuple[LogitsProcessor, ...]:
    """The engine's processors as a tuple: LogitsProcessor instances with unique names, or a ValueError."""
    if not isinstance(processors, (list, tuple)):
        raise ValueError(f"logits_processors must be a list of LogitsProcessor, got {type(processors).__name__}")
    for p in processors:
        if not isinstance(p, LogitsProcessor):
            raise ValueError(f"logits_processors must be LogitsProcessor instances, got {p!r:.80}")
    names = [p.name for p in processors]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ValueError(f"logits_processors: two processors are named {duplicate!r}")
    return tuple(processors)


def checked_form(value: object) -> dict[str, dict[str, Any]]:
    """SamplingParams' own check: {processor name: {argument name: value}} (None: {}), or a ValueError."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items()):
        raise ValueError(f"{FIELD} must be a dict {{processor name: {{argument: value}}}}, got {value!r:.80}")
    for name, args in value.items():
        bad = next((k for k in args if not isinstance(k, str)), None)
        if bad is not None:
            raise ValueError(f"{FIELD}[{name!r}]: argument names must be str, got {bad!r}")
    return dict(value)


def checked_args(processors: tuple[LogitsProcessor, ...], given: dict[str, dict[str, Any]],
                 vocab: int) -> dict[str, dict[str, np.ndarray]]:
    """A request's arguments as arrays of each Arg's shape and dtype (left out: the default), or a
    ValueError naming the field: an unregistered processor, an unknown argument, a wrong shape or type."""
    known = {p.name: p for p in processors}
    out = {}
    for name, values in given.items():
        if name not in known:
            raise ValueError(f"{FIELD}: no logits processor {name!r} is registered (registered: {sorted(known)})")
        specs = known[name].args
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise ValueError(f"{FIELD}[{name!r}]: unknown argument(s) {unknown} (its arguments: {sorted(specs)})")
        out[name] = {arg: _array(f"{FIELD}[{name!r}][{arg!r}]", spec, values[arg], vocab) if arg in values
                     else np.full(spec.shape, spec.default, spec.dtype) for arg, spec in specs.items()}
    return out


_KINDS = {"b": "b", "i": "biu", "u": "biu", "f": "biuf"}  # a dtype's kind -> the value kinds it accepts


def _array(field: str, spec: Arg, value: object, vocab: int) -> np.ndarray:
    """value as spec's shape and dtype (a shorter 1-D value padded with the default), or a
    ValueError naming the field."""
    try:
        array = np.asarray(value)
    except ValueError:
        raise ValueError(f"{field}: expected shape {spec.shape} {spec.dtype}, got {value!r:.80}") from None
    dtype = np.dtype(spec.dtype)
    if array.dtype.kind not in _KINDS[dtype.kind] or (array.dtype.kind == "f" and np.isnan(array).any()):
        raise ValueError(f"{field}: expected {spec.dtype} values, got {value!r:.80}")
    if array.ndim == 1 and len(spec.shape) == 1 and array.shape[0] < spec.shape[0]:
        array = np.concatenate([array, np.full((spec.shape[0] - array.shape[0],), spec.default)])
    if array.shape != spec.shape:
        raise ValueError(f"{field}: expected shape {spec.shape}, got {array.shape}")
    if dtype.kind in "iu" and array.size and not np.iinfo(dtype).min <= array.min() <= array.max() <= np.iinfo(dtype).max:
        raise ValueError(f"{field}: values outside {spec.dtype}'s range")
    if spec.token_ids and array.size and not -1 <= array.min() <= array.max() < vocab:
        raise ValueError(f"{field}: token ids must be in [0, {vocab}) (-1: none), got {value!r:.80}")
    return array.astype(dtype)
