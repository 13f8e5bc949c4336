"""Host-side token constraints: per-request state that decides which token may come next.

A grammar (structured outputs, engine/structured_output.py) or a multi-token bad word is a
`TokenConstraint`. Before a step samples a constrained request's row, the engine asks its
constraint for the allowed tokens as a packed bitmask (bit t % 32 of word t // 32 set: token t may
come next), ships the batch's masks to the device and the sampler sends every cleared bit's logit
to -inf. After the step the engine `accept`s each kept token in order. A constrained request
decodes one token per call (its next mask depends on the token just drawn); others keep their speed.

With speculative decoding a draft is walked through the constraint (mask, accept, mask, ...) to
build one mask per verified position, cut at the first draft the constraint refuses, and rolled
back before the verified tokens are accepted.
"""

from __future__ import annotations

import abc

import numpy as np


def mask_words(vocab_size: int) -> int:
    """uint32 words in one row of a packed token bitmask over `vocab_size` tokens."""
    return (vocab_size + 31) // 32


def allow_all(rows: int, vocab_size: int) -> np.ndarray:
    """A packed bitmask [rows, words] allowing every token (padding bits past the vocabulary set too)."""
    return np.full((rows, mask_words(vocab_size)), 0xFFFFFFFF, np.uint32)


def is_allowed(words: np.ndarray, token: int) -> bool:
    """Whether bit `token` of a packed bitmask row is set."""
    return bool((int(words[token // 32]) >> (token % 32)) & 1)


def disallow(words: np.ndarray, token: int) -> None:
    """Clear bit `token` of a packed bitmask row."""
    words[token // 32] &= np.uint32(~(1 << (token % 32)) & 0xFFFFFFFF)


def any_allowed(words: np.ndarray, vocab_size: int) -> bool:
    """Whether any of tokens [0, vocab_size) has its bit set (padding bits past it do not count)."""
    full, rest = divmod(vocab_size, 32)
    return bool(words[:full].any()) or bool(rest and int(words[full]) & ((1 << rest) - 1))


class ConstraintError(ValueError):
    """A constraint can go no further (no token allowed, or a token it refused was accepted):
    its request ends with finish_reason "error", the others go on."""


class TokenConstraint(abc.ABC):
    """Per-request host state restricting the next token; one instance per request (never shared)."""

    @abc.abstractmethod
    def fill_mask(self, words: np.ndarray) -> None:
        """Clear in `words` (uint32 [mask_words(V)], all ones on entry) the bits of tokens not allowed
        next. Raises ConstraintError if no token at all may follow."""

    @abc.abstractmethod
    def accept(self, token: int) -> None:
        """Advance past `token`, which was drawn under this constraint's last mask."""

    @abc.abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepts (speculative drafts walked to build their masks)."""

    def is_finished(self) -> bool:
        """Whether the constraint is complete and only an end of sequence may follow (a grammar
        accepted a whole JSON value). Default: never."""
        return False


class AllOf(TokenConstraint):
    """Several constraints on one request at once: a token may come next when every one allows it."""

    def __init__(self, constraints: list[TokenConstraint]):
        self.constraints = constraints

    def fill_mask(self, words: np.ndarray) -> None:
        """Each constraint clears the bits it refuses."""
        for c in self.constraints:
            c.fill_mask(words)

    def accept(self, token: int) -> None:
        """Every constraint advances past `token`."""
        for c in self.constraints:
            c.accept(token)

    def rollback(self, num_tokens: int) -> None:
        """Every constraint undoes its last `num_tokens` accepts."""
        for c in self.constraints:
            c.rollback(num_tokens)

    def is_finished(self) -> bool:
        """Finished once any one is (only an end of sequence may follow it)."""
        return any(c.is_finished() for c in self.constraints)


def all_of(constraints: list[TokenConstraint | None]) -> TokenConstraint | None:
    """The given constraints (Nones left out) as one: None, the only one, or their AllOf."""
    present = [c for c in constraints if c is not None]
    return None if not present else present[0] if len(present) == 1 else AllOf(present)
