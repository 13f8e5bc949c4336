"""The one place a request's host constraint is built (LLM at admission): each source of one, all
of them at once (engine/constraints.py AllOf). A new kind of constraint adds its line here."""

from __future__ import annotations

from engine import bad_words, structured_output
from engine.constraints import TokenConstraint, all_of
from engine.request import SamplingParams
from models.loading.tokenizer import Tokenizer


def constraint_for(params: SamplingParams, tokenizer: Tokenizer | None, vocab_size: int) -> TokenConstraint | None:
    """A new constraint for one request (never shared), or None when its params ask for none."""
    return all_of([
        bad_words.constraint(params.bad_words, tokenizer, vocab_size),
        structured_output.constraint(params.structured_outputs, tokenizer, vocab_size),
    ])
