"""Shared fixtures: the real SmolLM2 model is loaded once per test session."""

from pathlib import Path

import os

import numpy as np
import pytest

# Tests compile from scratch and leave the user's cache alone (test_compilation_cache sets its own).
os.environ.setdefault("JAXSERVE_XLA_CACHE", "off")

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


EIGHT_DEVICES = "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")


def pytest_collection_modifyitems(config, items):
    """Tests marked eight_devices need 8 simulated devices, which jax fixes at start-up: the main
    (1-device) process leaves them out and `test_sharding.test_sharded_suite` runs them in an
    8-device subprocess, which in turn leaves out the launcher."""
    skip_marker = "launches_eight_devices" if EIGHT_DEVICES else "eight_devices"
    kept = [item for item in items if skip_marker not in item.keywords]
    config.hook.pytest_deselected(items=[item for item in items if skip_marker in item.keywords])
    items[:] = kept
    if any("interpret_only" in item.keywords for item in items):
        from pallas_kernels import ops
        if ops.is_sm90_gpu():  # scripts/gpu_checklist.sh: the same tests run the compiled kernels there
            skip = pytest.mark.skip(reason="interpret mode only: on an H100/H200 the compiled kernels are tested")
            for item in items:
                if "interpret_only" in item.keywords:
                    item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops jax's compiled programs after each test module. Every CPU executable holds its own
    memory mappings, and a whole-suite process reached Linux's vm.max_map_count (65,530) and
    segfaulted inside XLA's compiler; modules share no compiled step worth keeping."""
    yield
    import gc

    import jax
    jax.clear_caches()
    gc.collect()
