"""Structured outputs: a request's output held to a JSON schema, a regex, a list of choices or a
grammar, through llguidance.

`StructuredOutputs` says what the output must match (it rides in SamplingParams). A
`GrammarCompiler` per model tokenizer builds the llguidance tokenizer once and compiles each spec
once (an LRU of matchers in their start state, copied per request). `GrammarConstraint` is one
request's matcher as the engine's `TokenConstraint`: the packed mask of the tokens that may come
next, then the token kept.
"""

from __future__ import annotations

import dataclasses
import functools
import json as jsonlib
import threading
import weakref

import llguidance
import numpy as np

from engine.constraints import ConstraintError, TokenConstraint, mask_words
from models.loading.tokenizer import Tokenizer

CACHE_SIZE = 256  # compiled grammars kept per tokenizer
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)  # errors without the grammar and parser state


@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    """What the output must match: exactly one of json, regex, choice or grammar (vLLM's
    StructuredOutputsParams). Validated (not compiled) on construction, hashable: the compile
    cache's key."""

    json: str | dict | bool | None = None  # a JSON schema (dict or JSON text; held as JSON text) or True: any object
    regex: str | None = None  # the whole output matches it (Rust regex syntax)
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # a context-free grammar: llguidance's Lark, or GBNF (llama.cpp's)
    disable_any_whitespace: bool = False  # JSON: no whitespace between tokens (default: any, as vLLM)

    def __post_init__(self) -> None:
        """Refuse anything but one kind of a valid type, and normalize it (a schema dict to JSON text)."""
        given = [name for name in _KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of {', '.join(_KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        if not isinstance(self.disable_any_whitespace, (bool, np.bool_)):
            raise ValueError(f"disable_any_whitespace must be a bool, got {self.disable_any_whitespace!r}")
        object.__setattr__(self, "disable_any_whitespace", bool(self.disable_any_whitespace))
        object.__setattr__(self, given[0], _CHECKS[given[0]](getattr(self, given[0])))

    @property
    def kind(self) -> str:
        """Which of json, regex, choice or grammar this spec sets."""
        return next(name for name in _KINDS if getattr(self, name) is not None)


def _checked_json(value: object) -> str | bool:
    """True (any JSON object) or the schema as compact JSON text (a dict is not hashable)."""
    if value is True:
        return True
    if isinstance(value, str):
        try:
            value = jsonlib.loads(value)
        except ValueError as e:
            raise ValueError(f"json: the schema is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"json must be a JSON schema object or True, got {value!r:.80}")
    try:
        return jsonlib.dumps(value, separators=(",", ":"))  # key order kept: it orders the output's properties
    except (TypeError, ValueError) as e:
        raise ValueError(f"json: the schema is not JSON-serializable: {e}") from None


def _checked_text(name: str, value: object) -> str:
    """A non-empty str (a regex or a grammar)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty str, got {value!r:.80}")
    return value


def _checked_choice(value: object) -> tuple[str, ...]:
    """A non-empty list of str as a tuple."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"choice must be a non-empty list of str, got {value!r:.80}")
    bad = next((c for c in value if not isinstance(c, str)), None)
    if bad is not None:
        raise ValueError(f"choice must hold str only, got {bad!r:.80}")
    return tuple(value)


_KINDS = ("json", "regex", "choice", "grammar")
_CHECKS = {"json": _checked_json, "regex": functools.partial(_checked_text, "regex"), "choice": _checked_choice,
           "grammar": functools.partial(_checked_text, "grammar")}


def _grammar(spec: StructuredOutputs) -> str:
    """The spec as an llguidance grammar (serialized, not yet checked against a tokenizer)."""
    if spec.json is not None:
        schema = '{"type":"object"}' if spec.json is True else spec.json
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": not spec.disable_any_whitespace})  # the schema's x-guidance wins
    if spec.regex is not None:
        return llguidance.grammar_from("regex", spec.regex)
    if spec.choice is not None:
        return llguidance.grammar_from("choice", list(spec.choice))
    return llguidance.grammar_from("grammar", spec.grammar)  # Lark as is, GBNF converted


class GrammarCompiler:
    """One model tokenizer's llguidance tokenizer and its compiled grammars (an LRU keyed by spec)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = CACHE_SIZE):
        """vocab_size: the model's (its logits' width), which may exceed the tokenizer's."""
        eos = list(tokenizer.eos_token_ids) or None
        self.ll_tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(),
                                                   n_vocab=max(vocab_size, tokenizer.vocab_size), eos_token=eos)
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(self.ll_tokenizer.eos_tokens)
        self.compile = functools.lru_cache(maxsize=cache_size)(self._compile)

    def _compile(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        """A matcher in its start state for `spec` (never advanced: requests get copies), or a
        ValueError naming what llguidance refused."""
        try:
            grammar = _grammar(spec)
        except ValueError as e:
            raise ValueError(f"invalid {spec.kind}: {e}") from None
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=_LIMITS)
        if matcher.is_error():
            raise ValueError(f"invalid {spec.kind}: {_without_state(matcher.get_error())}")
        return matcher

    def constraint(self, spec: StructuredOutputs) -> GrammarConstraint:
        """A fresh constraint for one request (the compiled grammar from the cache)."""
        return GrammarConstraint(self.compile(spec).deep_copy(), self.eos_token_ids, self.vocab_size,
                                 mask_words(self.ll_tokenizer.vocab_size))


def _without_state(error: str) -> str:
    """llguidance's error without the trailing state dump."""
    return error.split("\n<", 1)[0].strip()


_COMPILERS: weakref.WeakKeyDictionary[Tokenizer, dict[int, GrammarCompiler]] = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def compiler_for(tokenizer: Tokenizer | None, vocab_size: int) -> GrammarCompiler:
    """The tokenizer's compiler, built once (the server's worker threads and the engine share it)."""
    if tokenizer is None:
        raise ValueError("structured outputs need the model's tokenizer, and this model has none")
    with _COMPILERS_LOCK:
        by_vocab = _COMPILERS.setdefault(tokenizer, {})
        if vocab_size not in by_vocab:
            by_vocab[vocab_size] = GrammarCompiler(tokenizer, vocab_size)
        return by_vocab[vocab_size]


def compile_spec(spec: StructuredOutputs | None, tokenizer: Tokenizer | None, vocab_size: int) -> None:
    """Compile `spec` (if any) into the cache now, before the request is admitted (the server does
    it off its event loop): ValueError if llguidance refuses it."""
    if spec is not None:
        compiler_for(tokenizer, vocab_size).compile(spec)


def constraint(spec: StructuredOutputs | None, tokenizer: Tokenizer | None,
               vocab_size: int) -> GrammarConstraint | None:
    """One request's constraint for `spec` (None without one): ValueError if llguidance refuses it."""
    return None if spec is None else compiler_for(tokenizer, vocab_size).constraint(spec)


class GrammarConstraint(TokenConstraint):
    """One request's llguidance matcher as a TokenConstraint. Once the grammar is complete and no
    more text may follow (the matcher stopped) only an EOS token is allowed."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: frozenset[int], vocab_size: int,
                 ll_words: int):
        """vocab_size: the model's; ll_words: the words of llguidance's mask (its vocabulary may be larger)."""
        self._matcher = matcher
        self._eos = eos_token_ids
        self._vocab_size = vocab_size
        self._scratch = np.empty(ll_words, np.int32)
        self._eos_after_stop = 0  # EOS kept after the matcher stopped: llguidance does not record them

    def fill_mask(self, words: np.ndarray) -> None:
        """Clear the bits of tokens the grammar does not allow next; ConstraintError if none is left."""
        self._matcher.unsafe_compute_mask_ptr(self._scratch.ctypes.data, self._scratch.nbytes)
        if self._matcher.is_error():  # llguidance then allows EOS alone, which would hide the failure
            raise ConstraintError(f"grammar failed: {_without_state(self._matcher.get_error())}")
        n = min(len(words), len(self._scratch))
        words[:n] &= self._scratch[:n].view(np.uint32)
        words[n:] = 0
        if not _any_allowed(words, self._vocab_size):
            raise ConstraintError("the grammar allows no token of the model's vocabulary next")

    def accept(self, token: int) -> None:
        """Advance past `token`; ConstraintError (the matcher unchanged) if the grammar refuses it."""
        if token in self._eos and self._matcher.is_stopped():
            self._eos_after_stop += 1
            return
        if self._matcher.try_consume_tokens([token]) != 1:
            raise ConstraintError(f"token {token} does not match the grammar")

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepts (EOS kept after the stop first: they came last)."""
        unrecorded = min(num_tokens, self._eos_after_stop)
        self._eos_after_stop -= unrecorded
        if num_tokens > unrecorded and not self._matcher.rollback(num_tokens - unrecorded):
            raise ConstraintError(f"cannot roll the grammar back {num_tokens} tokens: "
                                  f"{_without_state(self._matcher.get_error())}")

    def is_finished(self) -> bool:
        """Whether the grammar is complete and only EOS may follow."""
        return self._matcher.is_stopped() and not self._matcher.is_error()


def _any_allowed(words: np.ndarray, vocab_size: int) -> bool:
    """Whether any of tokens [0, vocab_size) has its bit set (padding bits past it do not count)."""
    full, rest = divmod(vocab_size, 32)
    return bool(words[:full].any()) or bool(rest and int(words[full]) & ((1 << rest) - 1))
