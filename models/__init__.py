"""Flax NNX models and their loading (`load_model`)."""

from models.config import PRESETS, ModelConfig, RopeScaling, get_preset
from models.loaded_model import LoadedModel, load_model

__all__ = ["PRESETS", "LoadedModel", "ModelConfig", "RopeScaling", "get_preset", "load_model"]
