"""The engine's speculation glue: after scheduling, a proposer fills each decode's reserved draft
slots; the verify step runs the target over every decode's last token + drafts (a mixed step with
logits at each verify position); the proposer then sees that batch (a draft model fills its cache).

A speculative decode is always a ragged (mixed) step: multi-step decode calls are skipped for
requests that carry drafts (the scheduler's reserved slots make them more than one token).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from engine import kv_cache
from engine.attention_choice import AttentionChoice
from engine.config import EngineConfig
from engine.runner import MixedBatch, ModelRunner, StepResult, fetch, mixed_batch
from engine.scheduler import ScheduledRequest, SchedulerOutput
from engine.speculative.config import SpeculativeConfig
from engine.speculative.draft_model import DraftModelProposer
from engine.speculative.mtp import MTPProposer
from engine.speculative.ngram import NgramProposer
from engine.speculative.synthetic import SyntheticProposer
from models import LoadedModel, load_model


class Proposer(Protocol):
    """Drafts for scheduled decodes (slots[i] at most for the i-th), and the draft's q [S, K, V] or None."""

    def propose(self, scheduled: list[ScheduledRequest], slots: list[int]) -> tuple[list[list[int]], jax.Array | None]:
        ...

    def observe(self, batch: MixedBatch, scheduled: list[ScheduledRequest], result: StepResult,
                hidden: jax.Array) -> None:
        """The target's verify batch ran, with this result and hidden states [T, D] (a draft model
        computes its own KV for the same tokens; MTP continues from the hidden states)."""

    def warmup(self) -> int:
        """Compile the proposer's shapes; returns how many."""

    def reset_cache(self) -> None:
        """A fresh cache (and no per-request state) after a failed call consumed it; proposers
        without a cache (n-gram) have nothing to reset."""


class Speculator:
    """Owns the proposer; turns a schedule into a verify step and runs it."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer, padding_draft_probs: jax.Array | None = None):
        """padding_draft_probs: a zero q [S, K, V] when the proposer supplies q (a batch's shapes)."""
        self.config = config
        self.proposer = proposer
        self.padding_draft_probs = padding_draft_probs
        self.synthetic_accepts = None if config.acceptance_length is None else float(config.acceptance_length) - 1
        self._draft_probs: jax.Array | None = None

    def attach(self, output: SchedulerOutput) -> SchedulerOutput:
        """`output` with each decode's reserved slots replaced by the proposer's drafts."""
        slots = [s.num_tokens - 1 if not s.request.is_prefilling else 0 for s in output.scheduled]
        if not any(slots):
            self._draft_probs = None
            return output
        drafts, self._draft_probs = self.proposer.propose(output.scheduled, slots)
        scheduled = [ScheduledRequest(s.request, s.start, s.num_tokens - n + len(d), tuple(d))
                     for s, n, d in zip(output.scheduled, slots, drafts)]
        return dataclasses.replace(output, scheduled=scheduled)

    def verify(self, runner: ModelRunner, scheduled: list[ScheduledRequest],
               masks: list[np.ndarray | None] | None = None) -> StepResult:
        """Run the target's verify (mixed) step, let the proposer see it, fetch the results; masks:
        the constrained requests' masks per verified position (engine/constrained_step.py)."""
        q = runner.padding_draft_probs if self._draft_probs is None else self._draft_probs
        batch, _ = mixed_batch(scheduled, runner.config, q, masks=masks,  # one attention shard: scheduled order
                               processors=runner.processors)
        self._draft_probs = None
        outputs = runner.run_mixed_arrays(batch, decode_only=not any(s.request.is_prefilling for s in scheduled))
        result = fetch(outputs)
        self.proposer.observe(batch, scheduled, result, outputs[3])
        return result

    def warmup(self) -> int:
        return self.proposer.warmup()

    def recover(self) -> bool:
        """Reallocate the proposer's cache if a failed call consumed it; True when it did (the
        running requests must recompute to refill it)."""
        cache = getattr(self.proposer, "cache", None)
        if cache is None or kv_cache.is_intact(cache):
            return False
        self.proposer.reset_cache()
        return True


def make_speculator(spec: SpeculativeConfig, target: LoadedModel, config: EngineConfig,
                    attention: AttentionChoice, dtype: str) -> Speculator:
    """The speculator of `spec` for `target`; a bad pairing (a draft of another vocabulary, MTP on a
    model without MTP weights) raises ValueError naming it."""
    if spec.method == "ngram":
        return Speculator(spec, NgramProposer(spec.prompt_lookup_max, spec.prompt_lookup_min))
    if spec.method == "synthetic":
        return Speculator(spec, SyntheticProposer())
    q = jnp.zeros((config.max_num_seqs, spec.num_speculative_tokens, target.config.vocab_size), jnp.float32)
    if spec.method == "mtp":
        return Speculator(spec, MTPProposer(target, config, attention), q)
    draft = spec.model if isinstance(spec.model, LoadedModel) else load_model(spec.model, dtype=dtype)
    return Speculator(spec, DraftModelProposer(draft, target.config, config, attention), q)
