"""Multi-host start-up: JAX's own multi-controller runtime, initialised from the launcher's environment.

``qlx train`` (and anything else that runs on a pod or a cluster) calls :func:`initialize` before touching devices.
``QLX_DISTRIBUTED`` selects the mode:

- unset or ``auto``: initialise when the environment says this is one of several processes -- a Cloud TPU pod slice
  (``TPU_WORKER_HOSTNAMES`` with more than one host), Slurm (``SLURM_NTASKS`` > 1), Open MPI
  (``OMPI_COMM_WORLD_SIZE`` > 1) or explicit ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``;
  a single process is left alone;
- ``off``: never initialise (single host).

``launch/`` has the scripts that set these variables for TPU pods and GPU clusters.

:func:`to_host` reads a global array on every process (what the RL step does with rollout tokens and log-probs).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def _int_env(name: str, default: int = 1) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def multi_process_environment() -> dict | None:
    """The keyword arguments for ``jax.distributed.initialize`` this environment implies, or None for one process."""
    mode = os.environ.get("QLX_DISTRIBUTED", "auto")
    if mode not in ("auto", "off"):
        raise ValueError(f"QLX_DISTRIBUTED={mode!r}: valid values are 'auto' and 'off'")
    if mode == "off":
        return None
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return {
            "coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
            "num_processes": _int_env("JAX_NUM_PROCESSES"),
            "process_id": _int_env("JAX_PROCESS_ID", 0),
        }
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(tpu_hosts) > 1 or _int_env("SLURM_NTASKS") > 1 or _int_env("OMPI_COMM_WORLD_SIZE") > 1:
        return {}  # JAX detects TPU, Slurm and Open MPI clusters itself
    return None


def initialize() -> bool:
    """Initialise ``jax.distributed`` if this is one of several processes; returns whether it did."""
    kwargs = multi_process_environment()
    if kwargs is None:
        return False
    jax.distributed.initialize(**kwargs)
    return True


def to_host(array) -> np.ndarray:
    """The whole value of ``array`` as a numpy array on this process.

    A plain read when this process holds every shard (one process, or a fully replicated array); otherwise an
    all-gather across processes, so with several processes every one must call it for the same arrays in the same
    order (as every process runs the same program)."""
    if not isinstance(array, jax.Array) or array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
