"""The research-hook fields of SamplingParams (capture_layers, interventions, return_routed_experts)
and the `Intervention` they hold, checked on construction; checks against the model (layer range,
vector size, a MoE) are `check_against_model`'s, which LLM calls where it checks token ids.

Layer numbers are transformers' `output_hidden_states` numbering (models/hooks.py): 0 the
embeddings, i the residual after decoder layer i, num_layers the final norm's output."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from models.config import ModelConfig

MAX_INTERVENTIONS = 4  # per request: each takes one of the step's edit lanes (models/hooks.py)
MODES = ("add", "replace")


@dataclasses.dataclass(frozen=True, eq=False)
class Intervention:
    """Edit the residual stream after `layer` at positions [start, end) (end None: every later
    position, generated tokens included): "add" adds scale * vector (steering), "replace" sets it
    to scale * vector (activation patching). vector: [D], or [end - start, D], one row per position."""

    layer: int
    vector: np.ndarray
    scale: float = 1.0
    start: int = 0
    end: int | None = None
    mode: str = "add"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", _int("interventions: layer", self.layer))
        object.__setattr__(self, "start", _int("interventions: start", self.start))
        object.__setattr__(self, "scale", _finite("scale", self.scale))
        if self.layer < 0 or self.start < 0:
            raise ValueError(f"interventions: layer and start must be >= 0, got layer={self.layer} start={self.start}")
        if self.end is not None:
            object.__setattr__(self, "end", _int("interventions: end", self.end))
            if self.end <= self.start:
                raise ValueError(f"interventions: end must be > start={self.start}, got {self.end}")
        if self.mode not in MODES:
            raise ValueError(f"interventions: mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "vector", self._checked_vector())

    def _checked_vector(self) -> np.ndarray:
        """The vector as a read-only finite float32 array, [D] or one row per position of [start, end)."""
        try:
            v = np.array(self.vector, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"interventions: vector must be a numeric array, got {self.vector!r:.80}") from None
        if v.ndim not in (1, 2) or v.shape[-1] == 0 or not np.isfinite(v).all():
            raise ValueError(f"interventions: vector must be a finite [D] or [positions, D] array, got shape {v.shape}")
        if v.ndim == 2 and (self.end is None or v.shape[0] != self.end - self.start):
            raise ValueError(f"interventions: a vector of shape {v.shape} needs end - start = {v.shape[0]} "
                             f"(start={self.start}, end={self.end})")
        v.setflags(write=False)
        return v

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """scale * the vector's row at each position [n, D] (positions inside [start, end))."""
        v = self.vector if self.vector.ndim == 1 else self.vector[positions - self.start]
        return self.scale * np.broadcast_to(v, (len(positions), v.shape[-1]))

    def covers(self, positions: np.ndarray) -> np.ndarray:
        """Which of `positions` it edits [n] bool."""
        return (positions >= self.start) & (positions < (self.end if self.end is not None else np.iinfo(np.int64).max))


def checked_fields(capture_layers: object, interventions: object, return_routed_experts: object
                   ) -> tuple[tuple[int, ...], tuple[Intervention, ...], bool]:
    """The three fields normalized (layers sorted, unique), or a ValueError naming the field."""
    if isinstance(capture_layers, (str, bytes)) or not isinstance(capture_layers, (list, tuple, np.ndarray)):
        raise ValueError(f"capture_layers must be a list of layer numbers, got {capture_layers!r:.80}")
    layers = tuple(_int("capture_layers", layer) for layer in capture_layers)
    if any(layer < 0 for layer in layers):
        raise ValueError(f"capture_layers must be >= 0 (0: the embeddings), got {list(layers)}")
    if not isinstance(interventions, (list, tuple)) or not all(isinstance(i, Intervention) for i in interventions):
        raise ValueError(f"interventions must be a list of Intervention, got {interventions!r:.80}")
    if len(interventions) > MAX_INTERVENTIONS:
        raise ValueError(f"interventions: at most {MAX_INTERVENTIONS} per request, got {len(interventions)}")
    if not isinstance(return_routed_experts, (bool, np.bool_)):
        raise ValueError(f"return_routed_experts must be a bool, got {return_routed_experts!r}")
    return tuple(sorted(set(layers))), tuple(interventions), bool(return_routed_experts)


def check_against_model(capture_layers: tuple[int, ...], interventions: tuple[Intervention, ...],
                        return_routed_experts: bool, config: ModelConfig) -> None:
    """Layers within [0, num_layers], vectors of the model's hidden size, routing only on a MoE."""
    top = config.num_layers
    asked = [("capture_layers", c) for c in capture_layers] + [("interventions", i.layer) for i in interventions]
    for field, layer in asked:
        if layer > top:
            raise ValueError(f"{field}: layer {layer} is out of range [0, {top}] ({config.name} has {top} layers)")
    for i in interventions:
        if i.vector.shape[-1] != config.hidden_size:
            raise ValueError(f"interventions: vector has size {i.vector.shape[-1]}, the model's hidden size is "
                             f"{config.hidden_size}")
    if return_routed_experts and not moe_layers(config):
        raise ValueError(f"return_routed_experts: {config.name} is a dense model (no MoE layers)")


def moe_layers(config: ModelConfig) -> tuple[int, ...]:
    """The decoder layers (0-based) holding routed experts, in order."""
    return tuple(layer for layer in range(config.num_layers) if config.is_moe_layer(layer))


def _int(name: str, value: object) -> int:
    """A Python or NumPy int (not a bool) as int, or a ValueError naming the field."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _finite(name: str, value: object) -> float:
    """A finite real number (not a bool) as float, or a ValueError naming the field."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool) \
            or not math.isfinite(float(value)):
        raise ValueError(f"interventions: {name} must be a finite number, got {value!r}")
    return float(value)
