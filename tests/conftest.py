"""Shared fixtures: the real SmolLM2 model is loaded once per test session."""

from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def smollm2():
    from models import load_model
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_reference() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "smollm2_reference.npz"))


@pytest.fixture(scope="session")
def tiny_llama_reference() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "tiny_llama_reference.npz"))
