"""Orbax checkpoints of converted params: config + tokenizer as JSON beside an orbax params tree.

Restoring skips dequantization and layout conversion, so it is faster than loading the source.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import orbax.checkpoint as ocp
from flax import nnx

from models.config import ModelConfig
from models.loading.tokenizer import Tokenizer

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def is_orbax_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).exists() and (path / PARAMS_DIR).exists()


def save(directory: Path, config: ModelConfig, model: nnx.Module, tokenizer: Tokenizer | None) -> None:
    """Write `directory/{model_config.json, params/, tokenizer.json, tokenizer_meta.json}`."""
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=1))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / PARAMS_DIR, nnx.state(model, nnx.Param), force=True)
    if tokenizer is not None:
        tokenizer.save(directory)


def load_config(directory: Path) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))


def restore(directory: Path, abstract_model: nnx.Module) -> nnx.Module:
    """Restore params into `abstract_model` (from nnx.eval_shape); orbax casts to its dtypes."""
    graphdef, abstract_state = nnx.split(abstract_model)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(directory.absolute() / PARAMS_DIR, abstract_state)
    return nnx.merge(graphdef, state)


def load_tokenizer(directory: Path) -> Tokenizer | None:
    return Tokenizer.load(directory) if (directory / "tokenizer_meta.json").exists() else None
