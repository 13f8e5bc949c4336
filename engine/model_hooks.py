"""The engine side of the research hooks (models/hooks.py): a mixed step's edit lanes from its
requests' interventions, the outputs it fetches, and each request's captured rows after the step.

A step in which no request asks for a hook runs the plain step (MixedBatch.hooks None); a step in
which one does runs the hooked variant (one more compiled program per shape), which reads every
layer's residual and (on a MoE) the routing of every token; only what its requests asked for comes
back to the host. Hooked requests decode one token per call (engine/scheduler.py), so the hooks
live in the mixed step only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.expert_counts import ExpertCounts
from engine.hook_params import MAX_INTERVENTIONS, moe_layers
from engine.scheduler import ScheduledRequest
from models.config import ModelConfig
from models.hooks import ModelHooks


def build(scheduled: Sequence[ScheduledRequest], starts: np.ndarray, num_tokens: int, hidden_size: int,
          always: bool = False) -> ModelHooks | None:
    """The step's edit lanes ([K, T] layer, keep; [K, T, D] delta; request i's flat tokens from
    starts[i], its j-th intervention in lane j), or None when no request asks for a hook (and not
    `always`: the engine counts experts on every step)."""
    if not always and not any(s.request.params.hooked for s in scheduled):
        return None
    layer = np.full((MAX_INTERVENTIONS, num_tokens), -1, np.int32)
    keep = np.ones((MAX_INTERVENTIONS, num_tokens), np.float32)
    delta = np.zeros((MAX_INTERVENTIONS, num_tokens, hidden_size), np.float32)
    for s, start in zip(scheduled, starts):
        positions = np.arange(s.start, s.end)
        for lane, intervention in enumerate(s.request.params.interventions):
            hit = intervention.covers(positions)
            flat = start + np.flatnonzero(hit)
            layer[lane, flat] = intervention.layer
            keep[lane, flat] = 1.0 if intervention.mode == "add" else 0.0
            delta[lane, flat] = intervention.rows(positions[hit])
    return ModelHooks(layer, keep, delta)


def asked_outputs(scheduled: Sequence[ScheduledRequest], count_experts: bool) -> set[str]:
    """The hook outputs a step fetches: hidden states when a request captures, routed experts when
    one asks for them or the engine counts experts."""
    params = [s.request.params for s in scheduled]
    asked = {"hidden_states"} if any(p.capture_layers for p in params) else set()
    if count_experts or any(p.return_routed_experts for p in params):
        asked.add("routed_experts")
    return asked


def keep_asked(outputs: tuple, asked: set[str]) -> tuple:
    """A mixed step's (tokens, logprobs, extras) with only the asked hook outputs in extras["hooks"]
    (the rest stays on the device and is dropped: the host transfer is what was asked)."""
    tokens, logprobs, extras, *rest = outputs
    if "hooks" not in extras:
        return outputs
    read = {name: x for name, x in extras["hooks"].items() if name in asked}
    extras = {k: v for k, v in extras.items() if k != "hooks"} | ({"hooks": read} if read else {})
    return (tokens, logprobs, extras, *rest)


def record(s: ScheduledRequest, offset: int, hooks: dict[str, np.ndarray]) -> None:
    """Add to `s.request`'s record the rows of the positions this step computed for it (after the
    output processor advanced it), its flat tokens from `offset` in the gathered arrays; a sibling
    of n > 1 first takes the prompt rows its first sequence computed for it."""
    request, rec = s.request, s.request.hook_record
    n = min(s.num_tokens, request.num_computed - s.start)
    if rec is None or n <= 0:
        return
    if s.start > rec.rows and request.parent is not None and request.parent.hook_record is not None:
        rec.inherit(request.parent.hook_record, s.start)
    span = slice(offset, offset + n)
    hidden = hooks["hidden_states"][span][:, list(rec.layers)] if rec.layers else None
    rec.extend(s.start, hidden, hooks["routed_experts"][span].copy() if rec.routed else None)


def expert_counter(config: ModelConfig, count_experts: bool) -> ExpertCounts | None:
    """The engine's expert counts for a MoE model (None for a dense one, where count_experts, the
    engine counting on every step, is a ValueError)."""
    layers = moe_layers(config)
    if count_experts and not layers:
        raise ValueError(f"count_experts: {config.name} is a dense model (no MoE layers)")
    return ExpertCounts(len(layers), config.moe.num_experts) if layers else None


def count(counter: ExpertCounts | None, read: dict[str, np.ndarray] | None, num_tokens: int) -> None:
    """Add a gathered step's routing (`read`: StepResult.hooks) of its `num_tokens` real tokens to
    `counter`, when it was fetched."""
    if counter is not None and read is not None and "routed_experts" in read:
        counter.add(read["routed_experts"][:num_tokens])
