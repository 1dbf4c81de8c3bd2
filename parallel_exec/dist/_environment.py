"""The ``DMLC_*`` environment of a ps-lite role: compute it and check it.

Pure and free of MXNet, so the launcher and any other supervisor can use it
without importing MXNet (which turns a process into its role on import).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

DIST_KVSTORE_TYPES = ("dist_sync", "dist_device_sync", "dist_async")
LOCAL_KVSTORE_TYPES = ("device", "local")
#: Every type ``init_worker`` takes.
KVSTORE_TYPES = LOCAL_KVSTORE_TYPES + DIST_KVSTORE_TYPES + ("horovod",)
ROLES = ("scheduler", "server", "worker")

_REQUIRED_WORKER_VARIABLES = ("DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_SERVER", "DMLC_NUM_WORKER")


def role_environment(
    role: str,
    *,
    num_workers: int,
    num_servers: int,
    scheduler_host: str,
    scheduler_port: int,
    node_host: Optional[str] = None,
    unix_sockets: bool = False,
) -> Dict[str, str]:
    """The ``DMLC_*`` variables that make a process one role of a ps-lite job.

    Pure: reads no environment and starts nothing. Add the result to the
    environment of the process (the scheduler and servers only need to
    ``import mxnet`` with it; workers run the training script).

    Args:
        role: ``"scheduler"``, ``"server"`` or ``"worker"``.
        num_workers: worker processes in the whole job.
        num_servers: server processes in the whole job (at least 1).
        scheduler_host: address of the scheduler; the scheduler binds to it.
        scheduler_port: port of the scheduler.
        node_host: address this process binds to and announces. Defaults
            to ``scheduler_host`` (right when everything runs on one
            machine); without it ps-lite would pick the first non-loopback
            interface.
        unix_sockets: use Unix sockets instead of TCP (``DMLC_LOCAL=1``);
            only when every process runs on this machine.

    Returns:
        A new dict of variable names to values.

    Raises:
        ValueError: an unknown role, a count below 1 or a port out of range.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    if num_servers < 1:
        raise ValueError(f"num_servers must be at least 1 (ps-lite needs a server), got {num_servers}")
    if not 0 < scheduler_port < 65536:
        raise ValueError(f"scheduler_port must be in 1..65535, got {scheduler_port}")
    return {
        "DMLC_ROLE": role,
        "DMLC_PS_ROOT_URI": scheduler_host,
        "DMLC_PS_ROOT_PORT": str(scheduler_port),
        "DMLC_NUM_WORKER": str(num_workers),
        "DMLC_NUM_SERVER": str(num_servers),
        "DMLC_NODE_HOST": node_host or scheduler_host,
        "DMLC_LOCAL": "1" if unix_sockets else "0",
    }


def role_of_process(index: int, *, num_workers: int, num_servers: int) -> Tuple[str, int]:
    """Map a process index from a cluster launcher to a ps-lite role.

    Index 0 is the scheduler, the next ``num_servers`` are servers, the
    rest workers. Use it with ``SLURM_PROCID``, ``OMPI_COMM_WORLD_RANK``,
    torchrun's ``RANK`` or a StatefulSet ordinal.

    Returns:
        ``(role, index_within_role)``. A worker's index is not its kvstore
        rank: ps-lite assigns ranks itself (``WorkerProcess.rank``).

    Raises:
        ValueError: ``index`` is outside ``0 .. num_servers + num_workers``.
    """
    total = 1 + num_servers + num_workers
    if not 0 <= index < total:
        raise ValueError(
            f"process index {index} is outside 0..{total - 1} "
            f"(1 scheduler, {num_servers} servers, {num_workers} workers)"
        )
    if index == 0:
        return "scheduler", 0
    if index <= num_servers:
        return "server", index - 1
    return "worker", index - 1 - num_servers


def check_worker_environment(kvstore: str, environ: Mapping[str, str]) -> None:
    """Refuse to create a ps-lite kvstore that would crash or wait forever.

    Raises:
        RuntimeError: ``environ`` is not a ps-lite worker's; the message
            says how to start one.
    """
    role = environ.get("DMLC_ROLE")
    missing = [name for name in _REQUIRED_WORKER_VARIABLES if not environ.get(name)]
    if role != "worker" or missing:
        found = f"DMLC_ROLE={role!r}" + (f", missing {', '.join(missing)}" if missing else "")
        raise RuntimeError(
            f"kvstore {kvstore!r} needs the environment of a ps-lite worker ({found}); start the script with "
            "python -m parallel_exec.launch -n WORKERS -- python script.py ..., or set the variables from "
            "parallel_exec.dist.role_environment(...)"
        )
