"""Bad words, vLLM's semantics: each word is tokenized as written (leading spaces stripped) and with
one leading space, the second kept only when it starts with another token and has as many (a word
in mid-text). A one-token word is never sampled (its logit is -inf in the request's device bias
row, engine/penalties.py); a longer word's last token is refused whenever the generated tokens end
with its other tokens (`BadWordsConstraint`, a host constraint: engine/constraints.py)."""

from __future__ import annotations

import numpy as np

from engine.constraints import TokenConstraint, disallow
from models.loading.tokenizer import Tokenizer


def token_sequences(words: tuple[str, ...], tokenizer: Tokenizer | None, vocab_size: int) -> list[tuple[int, ...]]:
    """Every bad word's token sequences (those with an id outside the vocabulary left out: they
    cannot be generated)."""
    if not words:
        return []
    if tokenizer is None:
        raise ValueError("bad_words need the model's tokenizer, and this model has none")
    sequences = []
    for word in words:
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        sequences.append(plain)
        if spaced and plain and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    return [s for s in sequences if s and max(s) < vocab_size]


def banned_tokens(words: tuple[str, ...], tokenizer: Tokenizer | None, vocab_size: int) -> tuple[int, ...]:
    """The one-token bad words' ids: never sampled."""
    return tuple(sorted({s[0] for s in token_sequences(words, tokenizer, vocab_size) if len(s) == 1}))


def constraint(words: tuple[str, ...], tokenizer: Tokenizer | None, vocab_size: int) -> BadWordsConstraint | None:
    """The host constraint of the words of several tokens (None when there are none)."""
    longer = [s for s in token_sequences(words, tokenizer, vocab_size) if len(s) > 1]
    return BadWordsConstraint(longer) if longer else None


class BadWordsConstraint(TokenConstraint):
    """Refuses a bad word's last token right after its other tokens; remembers the output so far."""

    def __init__(self, sequences: list[tuple[int, ...]]):
        self._sequences = sequences
        self._output: list[int] = []

    def fill_mask(self, words: np.ndarray) -> None:
        """Clear the last token of every bad word whose other tokens end the output."""
        for s in self._sequences:
            head = len(s) - 1
            if len(self._output) >= head and tuple(self._output[-head:]) == s[:-1]:
                disallow(words, s[-1])

    def accept(self, token: int) -> None:
        """Append `token` to the output."""
        self._output.append(token)

    def rollback(self, num_tokens: int) -> None:
        """Drop the last `num_tokens` tokens of the output."""
        del self._output[len(self._output) - num_tokens:]
