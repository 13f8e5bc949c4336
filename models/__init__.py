"""Flax NNX models and their loading (`load_model`)."""

from models.config import MLAConfig, ModelConfig, MoEConfig, MTPConfig, RopeScaling
from models.loaded_model import LoadedModel, load_model
from models.param_counts import ParamCounts, param_counts
from models.registry import PRESETS, get_preset

__all__ = ["PRESETS", "LoadedModel", "MLAConfig", "ModelConfig", "MoEConfig", "MTPConfig", "ParamCounts",
           "RopeScaling", "get_preset", "load_model", "param_counts"]
