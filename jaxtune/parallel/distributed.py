"""Multi-host start-up: `jax.distributed.initialize` when the environment (or the config) says
there are several processes. One command per host, the same config everywhere.

Where the process group comes from, first match wins:
1. explicit: config keys `coordinator_address` / `num_processes` / `process_id`, or the variables
   JAXTUNE_COORDINATOR (host:port of process 0), JAXTUNE_NUM_PROCESSES, JAXTUNE_PROCESS_ID;
2. a cluster JAX detects itself: SLURM (SLURM_JOB_ID with SLURM_NTASKS > 1), Cloud TPU pod slices
   (TPU_WORKER_HOSTNAMES with more than one host), Open MPI (OMPI_COMM_WORLD_SIZE > 1);
3. otherwise one process, nothing to start.

On CPU the collectives between processes go through gloo (set before initialising).
"""

from __future__ import annotations

import os

from jaxtune.errors import JaxtuneError
from jaxtune.logging import info

_started = False


def _explicit(cfg) -> dict | None:
    env = os.environ
    address = getattr(cfg, "coordinator_address", None) or env.get("JAXTUNE_COORDINATOR")
    count = getattr(cfg, "num_processes", None) or env.get("JAXTUNE_NUM_PROCESSES")
    index = getattr(cfg, "process_id", None)
    index = env.get("JAXTUNE_PROCESS_ID") if index is None else index
    given = {"coordinator address (coordinator_address / JAXTUNE_COORDINATOR)": address,
             "process count (num_processes / JAXTUNE_NUM_PROCESSES)": count,
             "process id (process_id / JAXTUNE_PROCESS_ID)": index}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise JaxtuneError(f"multi-host start-up needs all three settings; missing the {', '.join(missing)}")
    try:
        count, index = int(count), int(index)
    except ValueError:
        raise JaxtuneError(f"num_processes ({count}) and process_id ({index}) must be integers") from None
    if not 0 <= index < count:
        raise JaxtuneError(f"process_id {index} is not in [0, {count})")
    return {"coordinator_address": str(address), "num_processes": count, "process_id": index}


def _cluster() -> str | None:
    env = os.environ
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "a TPU pod slice"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


def initialize(cfg=None) -> bool:
    """Start jax.distributed if this is one of several processes; True if it did (or had)."""
    global _started
    if _started:
        return True
    explicit = _explicit(cfg)
    cluster = None if explicit else _cluster()
    if explicit is None and cluster is None:
        return False
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only the CPU backend reads it
    if explicit is not None:
        if explicit["num_processes"] == 1:
            return False
        jax.distributed.initialize(**explicit)
    else:
        jax.distributed.initialize()
    _started = True
    info(f"jax.distributed: process {jax.process_index()} of {jax.process_count()} "
         f"({'explicit settings' if explicit else cluster}); {jax.local_device_count()} local of "
         f"{jax.device_count()} devices")
    return True

