"""Device meshes with the axes ("data", "tensor", "expert"), and multi-host start-up.

On CPU, simulate N devices with XLA_FLAGS=--xla_force_host_platform_device_count=N (set before
jax is imported). Multi-host: every process calls `init_distributed` first, then `make_mesh`
sees the devices of all processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "tensor", "expert")


def make_mesh(data: int = 1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, tensor, expert) mesh over `devices` (default: all devices of all processes).

    The axes are Auto: jit propagates shardings from the inputs (GSPMD). "expert" is the
    fastest-varying axis, so an expert group sits on neighbouring devices (one host first).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "tensor": tensor, "expert": expert}
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"mesh axis {name!r} must be >= 1, got {size}")
    if data * tensor * expert != len(devices):
        raise ValueError(f"mesh data={data} x tensor={tensor} x expert={expert} = {data * tensor * expert} "
                         f"devices, but {len(devices)} are available")
    grid = np.array(devices, dtype=object).reshape(data, tensor, expert)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_mesh(spec: str | None) -> Mesh | None:
    """A mesh from a flag like "expert=8" or "tensor=2,expert=4" (unnamed axes 1); None for None/"".
    On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N must give the devices first."""
    if not spec:
        return None
    sizes = {}
    for part in spec.split(","):
        name, _, size = part.partition("=")
        if name.strip() not in MESH_AXES or not size.strip().isdigit():
            raise ValueError(f"mesh {spec!r}: expected axis=size entries over {MESH_AXES}, e.g. 'tensor=2,expert=4'")
        sizes[name.strip()] = int(size)
    return make_mesh(**sizes)


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, local_device_count: int | None = None) -> None:
    """`jax.distributed.initialize` from arguments or the environment.

    Environment fallbacks: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID.
    On CPU the collectives go through gloo (the default CPU backend has no cross-process
    collectives); `local_device_count` simulates that many CPU devices in this process. Call it
    before anything touches a device.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError("multi-host needs a coordinator address, a process count and a process id "
                         "(arguments, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects only the CPU backend
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)
