"""One process of the multi-host test: 4 CPU devices here, 8 over both processes; a sharded
tiny-gpt-oss forward whose gathered logits process 0 saves.

usage: python tests/multihost_worker.py COORDINATOR_PORT PROCESS_ID OUT.npy
"""

import sys

import numpy as np


def main(port: str, process_id: str, out: str) -> None:
    from sharding import init_distributed
    init_distributed(f"localhost:{port}", num_processes=2, process_id=int(process_id), local_device_count=4)
    import jax
    from jax.experimental import multihost_utils

    from models import load_model
    from sharding import make_mesh
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    loaded = load_model("tiny-gpt-oss", mesh=make_mesh(data=2, tensor=2, expert=2))
    logits = loaded.forward(np.arange(64).reshape(4, 16) % 256)
    gathered = multihost_utils.process_allgather(logits, tiled=True)
    if jax.process_index() == 0:
        np.save(out, np.asarray(gathered))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
