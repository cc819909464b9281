"""What a launched process reads to join a multi-process JAX job.

The launchers in ``launch/`` (local.sh, gpu_slurm.sh, tpu_pod.sh) describe the
job to every process through environment variables; this module turns them into
the keyword arguments of ``jax.distributed.initialize``. Entry points call
``distributed_init_kwargs(os.environ)`` (or ``initialize_from_env()``) before any
JAX call touches a device.

Variables, in order of precedence:
- ``EMBEDJAX_COORDINATOR`` (host:port of process 0), ``EMBEDJAX_NUM_PROCESSES``,
  ``EMBEDJAX_PROCESS_ID``: set by local.sh and gpu_slurm.sh. Either all three or
  none; ``EMBEDJAX_NUM_PROCESSES=auto`` alone (tpu_pod.sh) asks JAX to detect the
  cluster itself (TPU VM metadata, SLURM).
- SLURM fallback, when no EMBEDJAX_* variable is set and SLURM started more than
  one task: ``SLURM_NTASKS``, ``SLURM_PROCID`` and the first host of
  ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` with port
  ``EMBEDJAX_COORDINATOR_PORT`` (default 12355).
"""
from __future__ import annotations

import os
import re
from typing import Mapping

__all__ = [
    "COORDINATOR",
    "NUM_PROCESSES",
    "PROCESS_ID",
    "COORDINATOR_PORT",
    "DEFAULT_COORDINATOR_PORT",
    "AUTO",
    "first_host",
    "distributed_init_kwargs",
    "config_overrides",
    "initialize_from_env",
]

COORDINATOR = "EMBEDJAX_COORDINATOR"
NUM_PROCESSES = "EMBEDJAX_NUM_PROCESSES"
PROCESS_ID = "EMBEDJAX_PROCESS_ID"
COORDINATOR_PORT = "EMBEDJAX_COORDINATOR_PORT"
DEFAULT_COORDINATOR_PORT = 12355
AUTO = "auto"

_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


def _int(environ: Mapping[str, str], name: str) -> int:
    raw = environ[name].strip()
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer; got {raw!r}") from None


def _split_top_level(nodelist: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def first_host(nodelist: str) -> str:
    """First host name of a SLURM host list: 'gpu[003-005,9],cpu1' -> 'gpu003'.

    Expands only as far as the first host (the coordinator is process 0, which
    SLURM places on the first node); zero padding of ranges is kept.
    """
    entries = _split_top_level(nodelist or "")
    if not entries:
        raise ValueError("the SLURM node list is empty; is this running inside a SLURM allocation?")
    entry = entries[0]
    while "[" in entry:
        head, _, rest = entry.partition("[")
        inside, closed, tail = rest.partition("]")
        if not closed:
            raise ValueError(f"malformed SLURM node list {nodelist!r}: unclosed '['")
        first = inside.split(",")[0].split("-")[0]
        entry = head + first + tail
    return entry


def distributed_init_kwargs(environ: Mapping[str, str]) -> dict:
    """Keyword arguments for ``jax.distributed.initialize`` read from a launcher's environment.

    Returns:
      {} when the environment describes a single process (do not initialise);
      {"coordinator_address": None, "num_processes": None, "process_id": None} when
        EMBEDJAX_NUM_PROCESSES=auto (JAX detects the cluster: TPU pods, SLURM);
      otherwise {"coordinator_address": "host:port", "num_processes": N, "process_id": i}.
    """
    names = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
    present = [n for n in names if environ.get(n, "").strip()]
    if present == [NUM_PROCESSES] and environ[NUM_PROCESSES].strip().lower() == AUTO:
        return {"coordinator_address": None, "num_processes": None, "process_id": None}
    if present:
        missing = [n for n in names if n not in present]
        if missing:
            raise ValueError(
                f"{', '.join(present)} set but {', '.join(missing)} not: a launcher must set all of "
                f"{', '.join(names)} (or only {NUM_PROCESSES}={AUTO})"
            )
        coordinator = environ[COORDINATOR].strip()
        num_processes = _int(environ, NUM_PROCESSES)
        process_id = _int(environ, PROCESS_ID)
    elif _int_or_none(environ, "SLURM_NTASKS", "SLURM_NPROCS") not in (None, 1):
        num_processes = _int_or_none(environ, "SLURM_NTASKS", "SLURM_NPROCS")
        if not environ.get("SLURM_PROCID", "").strip():
            raise ValueError("SLURM_NTASKS > 1 but SLURM_PROCID is not set: start the processes with srun")
        process_id = _int(environ, "SLURM_PROCID")
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
        port = _int(environ, COORDINATOR_PORT) if environ.get(COORDINATOR_PORT, "").strip() else DEFAULT_COORDINATOR_PORT
        coordinator = f"{first_host(nodelist)}:{port}"
    else:
        return {}

    if not _HOST_PORT.match(coordinator):
        raise ValueError(f"{COORDINATOR} must be host:port (e.g. 10.0.0.1:12355); got {coordinator!r}")
    if not 0 < int(coordinator.rsplit(":", 1)[1]) < 65536:
        raise ValueError(f"the coordinator port must be in 1..65535; got {coordinator!r}")
    if num_processes < 1:
        raise ValueError(f"the number of processes must be >= 1; got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"the process id must be in [0, {num_processes}); got {process_id}")
    if num_processes == 1:
        return {}
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


def _int_or_none(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if environ.get(name, "").strip():
            return _int(environ, name)
    return None


def config_overrides(kwargs: dict) -> dict:
    """The same job as overrides of the training config's ``distributed`` block.

    {} -> {} (single process); auto -> num_processes = -1 (the config's auto-detect
    value); explicit -> coordinator, num_processes, process_id.
    """
    if not kwargs:
        return {}
    if kwargs["num_processes"] is None:
        return {"distributed.num_processes": -1}
    return {
        "distributed.coordinator": kwargs["coordinator_address"],
        "distributed.num_processes": kwargs["num_processes"],
        "distributed.process_id": kwargs["process_id"],
    }


def initialize_from_env(environ: Mapping[str, str] | None = None, cpu_collectives: str | None = "gloo") -> dict:
    """Call ``jax.distributed.initialize`` as the environment says (nothing for one process).

    cpu_collectives picks the cross-process collectives of the CPU backend (several
    CPU processes on one machine need them; other backends ignore the setting).
    Returns the keyword arguments used ({} when nothing was initialised).
    """
    kwargs = distributed_init_kwargs(os.environ if environ is None else environ)
    if kwargs:
        import jax

        if not jax.distributed.is_initialized():
            if cpu_collectives:
                jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
            jax.distributed.initialize(**kwargs)
    return kwargs
