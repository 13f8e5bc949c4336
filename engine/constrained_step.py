"""A step's host-constraint masks (engine/constraints.py): for each constrained request that samples
in the step, its packed mask at every position the step samples: one, or for a speculative decode
1 + d, its drafts walked through the constraint (mask, accept, mask...), cut at the first one it
refuses, then rolled back (output_processor accepts the tokens kept). A constraint that raises, or
allows no token, fails its own request (after the step, whose rows and draft probabilities it
keeps in place: its sample is discarded); the others go on."""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.constraints import ConstraintError, TokenConstraint, allow_all, any_allowed, is_allowed
from engine.request import Request
from engine.scheduler import ScheduledRequest, SchedulerOutput


@dataclasses.dataclass(frozen=True)
class ConstrainedStep:
    """The step to run (drafts cut), per scheduled request its masks [positions, W] or None (None
    for all when no request is constrained), and the requests whose constraint failed, to finish."""

    output: SchedulerOutput
    masks: list[np.ndarray | None] | None
    failed: list[tuple[Request, str]]


def constrain(output: SchedulerOutput, vocab_size: int) -> ConstrainedStep:
    """The masks of `output`'s constrained requests."""
    if not any(s.request.constraint is not None and s.samples for s in output.scheduled):
        return ConstrainedStep(output, None, [])
    scheduled, masks, failed = [], [], []
    for s in output.scheduled:
        m = None
        if s.request.constraint is not None and s.samples:
            try:
                s, m = _walk(s, vocab_size)
            except Exception as e:  # noqa: BLE001 (a constraint's failure is its request's alone)
                failed.append((s.request, f"{type(e).__name__}: {e}"))
        scheduled.append(s)
        masks.append(m)
    return ConstrainedStep(dataclasses.replace(output, scheduled=scheduled),
                           masks if any(m is not None for m in masks) else None, failed)


def _walk(s: ScheduledRequest, vocab_size: int) -> tuple[ScheduledRequest, np.ndarray]:
    """`s` with its drafts cut before the first one its constraint refuses (or after which it
    allows nothing), and its masks [1 + drafts kept, W]; the constraint left as it was."""
    constraint, request = s.request.constraint, s.request
    if constraint.is_finished() and len(request.output_token_ids) < request.params.min_tokens:
        raise ConstraintError(f"the constraint is complete after {len(request.output_token_ids)} tokens, "
                              f"before min_tokens={request.params.min_tokens}: only an end of sequence may follow")
    masks = [_mask(constraint, vocab_size)]
    accepted = 0
    try:
        for draft in s.drafts:
            if not is_allowed(masks[-1], draft):
                break
            constraint.accept(draft)
            accepted += 1
            masks.append(_mask(constraint, vocab_size))
    except ConstraintError:
        pass  # a draft leads nowhere: the drafts with a mask after them are kept
    finally:
        constraint.rollback(accepted)
    cut = len(s.drafts) - (len(masks) - 1)
    return dataclasses.replace(s, num_tokens=s.num_tokens - cut, drafts=s.drafts[:len(masks) - 1]), np.stack(masks)


def _mask(constraint: TokenConstraint, vocab_size: int) -> np.ndarray:
    """The constraint's mask [W] of the next token; ConstraintError when it allows none."""
    words = allow_all(1, vocab_size)[0]
    constraint.fill_mask(words)
    if not any_allowed(words, vocab_size):
        raise ConstraintError("the constraint allows no token next")
    return words
