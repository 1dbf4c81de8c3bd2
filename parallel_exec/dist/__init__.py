"""The multi-process side: one process per worker, MXNet's distributed kvstore between them.

Each process of the job drives its own devices through its own
``ContextExecutor``; the processes synchronise through MXNet's distributed
kvstore (ps-lite: ``dist_sync``, ``dist_device_sync``, ``dist_async``). A
ps-lite job is one scheduler, some servers and some workers, each a process
told its role by ``DMLC_*`` environment variables. ``python -m
parallel_exec.launch`` starts and supervises all of them on one machine;
``role_environment`` gives any other launcher (mpirun, Slurm, Kubernetes)
the variables for a role. With ``horovod`` (optional, under ``horovodrun``)
Horovod's allreduce replaces the servers.

In the training script::

    worker = dist.init_worker(args.kvstore)   # "device" runs as one process
    trainer = worker.trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    for data, label in batches:               # the same global batches everywhere
        data, label = worker.shard(data), worker.shard(label)  # this worker's share
        ...                                   # forward and backward, as on one machine
        trainer.step(data.shape[0])           # this worker's batch, as on one machine

Guarantees:
- Every worker starts from rank 0's parameters (``WorkerProcess.trainer`` and
  ``WorkerProcess.broadcast``).
- The trainer's ``step`` takes the batch this worker processed and turns it
  into what the servers need: the global batch for the synchronous types
  (the servers sum all workers' gradients), the worker's own for
  ``dist_async`` (each push is applied on its own).
- With ``fail_fast`` an uncaught exception, in the main thread or any other,
  prints its traceback and ends the process at once: ps-lite never notices
  a failed worker, and a worker that raised would otherwise hang at exit.

Assumptions (ps-lite, mxnet 1.9.1):
- One distributed kvstore per process; ``init_worker`` creates it once.
- Synchronous types need every worker to make the same number of
  ``step`` calls with the same batch size: equal shards, last partial
  batch discarded. Unequal step counts hang the job.

Modules, one job each (MXNet is imported only by the worker side, on first
use of its names, so the launcher runs without it):

- ``_environment``: the ``DMLC_*`` variables of a role, computed and checked.
- ``_fail_fast``: end the process on an uncaught exception in any thread.
- ``_worker_process``: ``init_worker`` and ``WorkerProcess``, this process's place in the job.
- ``_trainers``: the trainers ``WorkerProcess.trainer`` builds.
- ``_checkpoint``: ``Checkpointer``, saving and restoring a run so a restart resumes;
  ``_checkpoint_files`` (atomic, checked files) and ``_random_state`` serve it.
- ``_horovod``: importing Horovod and broadcasting through it.
- ``_launcher``: the ``python -m parallel_exec.launch`` command line.
- ``_supervisor``: starting the job's processes and ending them together.
- ``_restarts``: running the job again after a failure (``--max-restarts``).
- ``_parent_death``: children that die with the launcher.
- ``_site/sitecustomize.py``: run at start-up by every Python process of a
  launched worker: fail fast, report the ps-lite rank to the launcher.
"""

import importlib as _importlib
import typing as _typing

# The constants are importable as before, though not in __all__.
from ._environment import DIST_KVSTORE_TYPES as DIST_KVSTORE_TYPES
from ._environment import KVSTORE_TYPES as KVSTORE_TYPES
from ._environment import LOCAL_KVSTORE_TYPES as LOCAL_KVSTORE_TYPES
from ._environment import ROLES as ROLES
from ._environment import role_environment, role_of_process
from ._fail_fast import install_fail_fast

if _typing.TYPE_CHECKING:
    from ._checkpoint import Checkpoint, Checkpointer
    from ._trainers import DistTrainer, HorovodTrainer
    from ._worker_process import Worker, WorkerProcess, init_worker

__all__ = [
    "Checkpoint",
    "Checkpointer",
    "WorkerProcess",
    "init_worker",
    "install_fail_fast",
    "role_environment",
    "role_of_process",
]

# Names that need MXNet -> the module that defines them. The trainers are
# importable, though not in __all__: WorkerProcess.trainer builds them.
_LAZY = {
    "Checkpoint": "._checkpoint",
    "Checkpointer": "._checkpoint",
    "DistTrainer": "._trainers",
    "HorovodTrainer": "._trainers",
    "WorkerProcess": "._worker_process",
    "init_worker": "._worker_process",
    # Its earlier name; "worker" alone also means an executor's thread.
    "Worker": "._worker_process",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> _typing.List[str]:
    return sorted(set(__all__) | set(_LAZY) | {name for name in globals() if not name.startswith("_")})
