"""Multi-process start-up: `jax.distributed.initialize()` from flags, environment or cluster.

Every process of a job runs the same command. Where the coordinator, the number of
processes and this process's id come from, first found wins:

1. the flags `--coordinator HOST:PORT --num-processes N --process-id I`;
2. the environment `FLAXBERT_COORDINATOR`, `FLAXBERT_NUM_PROCESSES`, `FLAXBERT_PROCESS_ID`
   (what `launch/local.sh` sets), or JAX's own `JAX_COORDINATOR_ADDRESS`,
   `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
3. a cluster JAX detects by itself (a SLURM step with several tasks, an Open MPI job, a
   multi-worker Cloud TPU VM, or `FLAXBERT_DISTRIBUTED=auto` to ask for detection anyway):
   `jax.distributed.initialize()` is then called with no arguments.

Otherwise the run is a single process and nothing is initialised. Must run before JAX
touches a device.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

log = logging.getLogger("flaxbert")

_ENV = {
    "coordinator": ("FLAXBERT_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("FLAXBERT_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("FLAXBERT_PROCESS_ID", "JAX_PROCESS_ID"),
}


class DistributedError(ValueError):
    """Inconsistent multi-process settings; the message names the flag or variable."""


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """How to call `jax.distributed.initialize`: explicit values, or cluster auto-detection."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    detected: str | None = None  # the cluster JAX will read the values from

    @property
    def explicit(self) -> bool:
        return self.coordinator is not None


def detect_cluster(env: Mapping[str, str]) -> str | None:
    """A multi-process cluster environment that `jax.distributed.initialize()` understands."""
    if env.get("FLAXBERT_DISTRIBUTED", "").lower() == "auto":
        return "requested by FLAXBERT_DISTRIBUTED=auto"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
    if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "open mpi"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or (env.get("CLOUD_TPU_TASK_ID") and env.get("TPU_ACCELERATOR_TYPE")):
        return "cloud tpu"
    return None


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> DistributedSpec | None:
    """Flags, then the environment, then a detected cluster; None for a single process."""
    env = os.environ if env is None else env
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    source = {k: f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None}
    for key, names in _ENV.items():
        if given[key] is None:
            name = next((n for n in names if env.get(n)), None)
            if name is not None:
                given[key], source[key] = env[name], name
    if any(v is not None for v in given.values()):
        missing = [
            f"--{k.replace('_', '-')} (or {_ENV[k][0]})" for k, v in given.items() if v is None
        ]
        if missing:
            have = ", ".join(f"{source[k]}={v}" for k, v in given.items() if v is not None)
            raise DistributedError(f"{have} given but not {' and '.join(missing)}")
        try:
            n, i = int(given["num_processes"]), int(given["process_id"])
        except ValueError:
            raise DistributedError(
                f"{source['num_processes']}={given['num_processes']!r} and "
                f"{source['process_id']}={given['process_id']!r} must be integers"
            ) from None
        if n < 1 or not 0 <= i < n:
            raise DistributedError(
                f"{source['process_id']}={i} must be in [0, {source['num_processes']}={n})"
            )
        if ":" not in str(given["coordinator"]):
            raise DistributedError(
                f"{source['coordinator']}={given['coordinator']!r}: expected HOST:PORT"
            )
        return DistributedSpec(str(given["coordinator"]), n, i)
    cluster = detect_cluster(env)
    return DistributedSpec(detected=cluster) if cluster else None


def initialize(spec: DistributedSpec | None) -> None:
    """Starts the multi-process runtime as `spec` says (nothing for a single process)."""
    if spec is None:
        return
    import jax

    # CPU collectives across processes need an implementation; harmless on GPU and TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if spec.explicit:
        if spec.num_processes == 1:
            return
        jax.distributed.initialize(
            spec.coordinator,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            # Explicit values win over a cluster JAX might detect (a launch inside salloc).
            cluster_detection_method="deactivate",
        )
    else:
        jax.distributed.initialize()
    log.info(
        "process %d of %d (%s); %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        spec.detected or f"coordinator {spec.coordinator}",
        jax.local_device_count(),
        jax.device_count(),
    )
