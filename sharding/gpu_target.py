"""The GPUs the engine compiles for without one: target specs (GpuTargetConfigProto text in
sharding/gpu_targets/) and the deviceless topology whose `cuda` devices jit compiles for.

Needs the CUDA build of jaxlib (`jax[cuda13]`, `make gpu-check`'s venv) and JAX_PLATFORMS=cpu: XLA,
Mosaic GPU and ptxas then run on a CPU machine with no driver (../shared/PALLAS_GPU.md).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax

SPECS = Path(__file__).parent / "gpu_targets"
TARGETS = ("h100", "h200")


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """One target: its spec text and the facts the compile gate checks against."""

    name: str
    spec: str
    device_kind: str
    memory_bytes: int
    smem_optin_bytes: int
    num_sms: int


def _field(spec: str, name: str) -> str:
    match = re.search(rf"^\s*{name}:\s*\"?([^\"\n]+)\"?\s*$", spec, re.MULTILINE)
    if match is None:
        raise ValueError(f"GPU target spec has no {name!r} field")
    return match.group(1)


def load(name: str) -> GpuTarget:
    """The target called `name` (one of TARGETS); a ValueError names the known ones."""
    if name not in TARGETS:
        raise ValueError(f"unknown GPU target {name!r}; expected one of {TARGETS}")
    spec = (SPECS / f"{name}.txtpb").read_text()
    return GpuTarget(name, spec, _field(spec, "device_description_str"), int(_field(spec, "device_memory_size")),
                     int(_field(spec, "shared_memory_per_block_optin")), int(_field(spec, "core_count")))


def devices(target: GpuTarget, count: int) -> list[jax.Device]:
    """`count` deviceless devices of one host of `target` (compile-only: they run nothing)."""
    from jax.experimental import topologies
    if jax.default_backend() != "cpu":
        raise RuntimeError("deviceless GPU compiling runs with JAX_PLATFORMS=cpu")
    return list(topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                             target_config=target.spec).devices)


def preset_mesh(entry: str, devices: int, expert: int) -> tuple[str, int, int]:
    """(preset, tensor, expert) of a compile-gate entry NAME (on devices / expert x expert GPUs)
    or NAME:TENSORxEXPERT; a ValueError says what is wrong."""
    name, _, mesh = entry.partition(":")
    if not mesh:
        if devices % expert:
            raise ValueError(f"--expert={expert} must divide --devices={devices}")
        return name, devices // expert, expert
    tensor, _, expert_axis = mesh.partition("x")
    if not (tensor.isdigit() and expert_axis.isdigit() and int(tensor) * int(expert_axis) > 0):
        raise ValueError(f"--model entry {entry!r}: the mesh must read TENSORxEXPERT, e.g. {name}:2x4")
    return name, int(tensor), int(expert_axis)
