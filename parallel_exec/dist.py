"""Worker side of a multi-process job on MXNet's parameter-server kvstore.

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
- Every worker starts from rank 0's parameters (``Worker.trainer`` and
  ``Worker.broadcast``).
- ``DistTrainer.step`` takes the batch this worker processed and turns it
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
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import threading
import traceback
from typing import Any, Dict, List, Optional, Tuple

from ._mxnet import mx

LOGGER = logging.getLogger("parallel_exec.dist")

DIST_KVSTORE_TYPES = ("dist_sync", "dist_device_sync", "dist_async")
LOCAL_KVSTORE_TYPES = ("device", "local")
#: Every type ``init_worker`` takes.
KVSTORE_TYPES = LOCAL_KVSTORE_TYPES + DIST_KVSTORE_TYPES + ("horovod",)
ROLES = ("scheduler", "server", "worker")

# Keys of the parameters broadcast by ``Worker.broadcast``: far above the
# indices 0..n-1 that gluon.Trainer uses on the same kvstore, and ints like
# them (ps-lite refuses a mix of int and str keys).
_BROADCAST_KEY_BASE = 1 << 30

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
        rank: ps-lite assigns ranks itself (``Worker.rank``).

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


def _print_and_exit(exc_type: type, exc_value: BaseException, exc_traceback: Any, where: str) -> None:
    sys.stderr.write(f"parallel_exec.dist: uncaught exception in {where}; ending this process so the job stops\n")
    traceback.print_exception(exc_type, exc_value, exc_traceback, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream must not keep the process alive
            pass
    os._exit(1)  # not sys.exit: a ps-lite worker hangs in its exit handlers


def install_fail_fast() -> None:
    """End the process at once on any uncaught exception, in any thread.

    Replaces ``sys.excepthook`` and ``threading.excepthook`` with hooks that
    print the traceback to stderr and call ``os._exit(1)``. A ps-lite
    process that raised would otherwise wait forever (at exit, or for
    peers), and so would every other process of the job. ``SystemExit`` in
    a thread stays silent, as with the default hook.
    """

    def excepthook(exc_type, exc_value, exc_traceback):
        _print_and_exit(exc_type, exc_value, exc_traceback, "the main thread")

    def thread_excepthook(args):
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "a thread"
        _print_and_exit(args.exc_type, args.exc_value, args.exc_traceback, f"thread {name}")

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


class DistTrainer(mx.gluon.Trainer):
    """A ``gluon.Trainer`` whose ``step`` takes this worker's batch size.

    Build it with ``Worker.trainer``. On one machine ``trainer.step(n)``
    divides the summed gradient by the ``n`` samples it came from. With a
    synchronous distributed kvstore the servers sum the gradients of all
    workers, so the divisor must be the global batch; with ``dist_async``
    each worker's push is applied on its own. ``step`` does that
    conversion, so the training loop stays the one-machine loop.
    """

    def __init__(
        self, params: Any, optimizer: Any, optimizer_params: Optional[dict], *, worker: "Worker", **kwargs: Any
    ) -> None:
        kvstore = worker.kvstore if worker.kvstore is not None else worker.kvstore_type
        super().__init__(params, optimizer, optimizer_params, kvstore=kvstore, **kwargs)
        self._batch_multiplier = worker.num_workers if worker.synchronous else 1

    def step(self, batch_size: int, ignore_stale_grad: bool = False) -> None:
        """Update the parameters from the gradients of the last backward.

        Args:
            batch_size: samples this worker processed in this step (as on
                one machine). Must be the same at every step with a
                distributed kvstore.
            ignore_stale_grad: as for ``gluon.Trainer.step``.
        """
        super().step(batch_size * self._batch_multiplier, ignore_stale_grad)

    def update(self, batch_size: int, ignore_stale_grad: bool = False) -> None:
        """As ``gluon.Trainer.update``, with this worker's batch size."""
        super().update(batch_size * self._batch_multiplier, ignore_stale_grad)


class HorovodTrainer(mx.gluon.Trainer):
    """A ``gluon.Trainer`` that sums gradients over this process's contexts and, with Horovod, over all processes.

    Build it with ``Worker.trainer`` after ``init_worker("horovod")``.
    Horovod's own ``DistributedTrainer`` allreduces only the first context's
    gradient, so with several contexts per process they drift apart
    silently. This one adds up the local contexts' gradients first,
    allreduces the sum, and copies it back to every context, so every
    context of every process applies the same update. Like ``DistTrainer``,
    ``step`` takes this worker's batch size.

    Needs Horovod built with MXNet support (``pip install
    parallel_exec[horovod]``; see the README).
    """

    def __init__(self, params: Any, optimizer: Any, optimizer_params: Optional[dict] = None, **kwargs: Any) -> None:
        super().__init__(params, optimizer, optimizer_params, kvstore=None, **kwargs)
        self._hvd = _import_horovod()
        # step(n) divides by n * size: the summed gradient of all workers'
        # samples, as one process would with the global batch.
        self._scale /= self._hvd.size()

    def _allreduce_grads(self) -> None:
        for index, param in enumerate(self._params):
            if param.grad_req == "null":
                continue
            grads = param.list_grad()
            total = grads[0] if len(grads) == 1 else mx.nd.add_n(*(g.as_in_context(grads[0].context) for g in grads))
            self._hvd.allreduce_(total, average=False, name=f"parallel_exec.grad.{index}", priority=-index)
            for grad in grads:
                if grad is not total:
                    total.copyto(grad)


def _import_horovod() -> Any:
    try:
        import horovod.mxnet as hvd
    except ImportError as exc:
        raise ImportError(
            "kvstore 'horovod' needs Horovod built with MXNet support: HOROVOD_WITH_MXNET=1 pip install "
            "--no-build-isolation horovod==0.28.1 (see the README, More than one machine)"
        ) from exc
    return hvd


def _join_horovod() -> "Worker":
    hvd = _import_horovod()
    hvd.init()
    return Worker("horovod", hvd.rank(), hvd.size())


def _horovod_broadcast(keys: List[int], arrays: List[List["mx.nd.NDArray"]]) -> None:
    """Rank 0's first-context values to every context of every process."""
    hvd = _import_horovod()
    for key, data in zip(keys, arrays):
        hvd.broadcast_(data[0], root_rank=0, name=f"parallel_exec.broadcast.{key}")
        for other in data[1:]:
            data[0].copyto(other)


class Worker:
    """This process's place in the job: its kvstore, rank and data share.

    Create it with ``init_worker``. With a local kvstore type (``device``,
    ``local``) it is the only worker: rank 0 of 1, ``shard`` returns the
    data unchanged and ``broadcast`` does nothing.

    Thread-safety: use it from the thread that drives training (the one
    that calls ``trainer.step``); the kvstore is not meant to be shared
    between threads.
    """

    def __init__(self, kvstore_type: str, rank: int = 0, num_workers: int = 1, kvstore: Optional["mx.kv.KVStore"] = None):
        self.kvstore_type = kvstore_type
        self.rank = rank
        self.num_workers = num_workers
        #: The ps-lite ``mx.kv.KVStore``; None for a local type and Horovod.
        self.kvstore = kvstore
        self._next_broadcast_key = _BROADCAST_KEY_BASE

    def __repr__(self) -> str:
        return f"<Worker rank {self.rank} of {self.num_workers}, kvstore {self.kvstore_type}>"

    @property
    def synchronous(self) -> bool:
        """Whether the servers sum all workers' gradients before updating."""
        return self.kvstore_type != "dist_async"

    def shard(self, data: Any) -> Any:
        """This worker's contiguous share of ``data``; all shares are equal.

        The last ``len(data) % num_workers`` samples are dropped, so that
        every worker makes the same number of steps (synchronous ps-lite
        hangs otherwise).

        Args:
            data: anything with ``len`` and slicing (NDArray, numpy array,
                list) or a ``gluon.data.Dataset``.

        Returns:
            The same kind of object, holding samples
            ``[rank * n, (rank + 1) * n)`` with ``n = len(data) // num_workers``.
        """
        share = len(data) // self.num_workers
        dropped = len(data) - share * self.num_workers
        if dropped:
            LOGGER.info(
                "dropping the last %d of %d samples so that %d workers get equal shares",
                dropped,
                len(data),
                self.num_workers,
            )
        start = self.rank * share
        if isinstance(data, mx.gluon.data.Dataset):
            return data.sample(mx.gluon.data.SequentialSampler(share, start))
        return data[start : start + share]

    def broadcast(self, params: Any) -> None:
        """Give every worker rank 0's values of ``params``, on all contexts.

        Every worker must call it, with the same parameters in the same
        order. Each call uses fresh kvstore keys, so the servers keep one
        extra copy of the parameters.

        Args:
            params: a ``ParameterDict`` (``net.collect_params()``), a dict
                or an iterable of ``Parameter``. They must be initialized
                with known shapes.

        Raises:
            ValueError: a parameter is not initialized yet, or its shape is
                still unknown (give ``in_units``/``in_channels``, or run one
                forward pass first).
        """
        # Checked with a local type too, so a script that would fail under
        # the launcher fails on one machine already.
        arrays = [_initialized_data(param) for param in _parameter_list(params)]
        keys = list(range(self._next_broadcast_key, self._next_broadcast_key + len(arrays)))
        self._next_broadcast_key += len(arrays)
        if self.kvstore_type == "horovod":
            _horovod_broadcast(keys, arrays)
        elif self.kvstore is not None:
            # init stores rank 0's value on the servers (the others' are
            # ignored, and every worker waits for it); pull copies it to
            # every context.
            self.kvstore.broadcast(keys, [data[0] for data in arrays], out=arrays)

    def trainer(
        self, params: Any, optimizer: Any, optimizer_params: Optional[dict] = None, **kwargs: Any
    ) -> mx.gluon.Trainer:
        """Broadcast rank 0's parameters, then build a trainer on this kvstore.

        Args:
            params: as for ``gluon.Trainer``; initialized, shapes known.
            optimizer, optimizer_params: as for ``gluon.Trainer``.
            **kwargs: other ``gluon.Trainer`` arguments except ``kvstore``.

        Returns:
            A ``DistTrainer`` (``HorovodTrainer`` for Horovod): ``step``
            takes this worker's batch size.

        Raises:
            TypeError: ``kvstore`` was passed.
            ValueError: as for ``broadcast``.
        """
        if "kvstore" in kwargs:
            raise TypeError("Worker.trainer uses the worker's kvstore; do not pass kvstore=")
        self.broadcast(params)
        if self.kvstore_type == "horovod":
            return HorovodTrainer(params, optimizer, optimizer_params, **kwargs)
        return DistTrainer(params, optimizer, optimizer_params, worker=self, **kwargs)


def _initialized_data(param: "mx.gluon.Parameter") -> List["mx.nd.NDArray"]:
    """The parameter's arrays on every context; ValueError if there are none yet."""
    try:
        return param.list_data()
    except (mx.gluon.parameter.DeferredInitializationError, RuntimeError) as exc:
        raise ValueError(
            f"parameter {param.name} is not initialized yet (shape {param.shape}); call net.initialize(ctx=...) "
            "with every shape known (in_units=, in_channels=) or run one forward pass before broadcasting"
        ) from exc


def _parameter_list(params: Any) -> List["mx.gluon.Parameter"]:
    if isinstance(params, (dict, mx.gluon.ParameterDict)):
        return [params[key] for key in sorted(params.keys())]  # gluon.Trainer's order
    if isinstance(params, mx.gluon.Parameter):
        raise TypeError("params must be a collection of Parameters, got a single Parameter; wrap it in a list")
    params = list(params)
    for param in params:
        if not isinstance(param, mx.gluon.Parameter):
            raise TypeError(f"params must hold gluon Parameters, got {param!r}")
    return params


_worker: Optional[Worker] = None
# Guards _worker: only one kvstore per process.
_worker_lock = threading.Lock()


def init_worker(kvstore: str = "dist_sync", *, fail_fast: bool = True) -> Worker:
    """Join the job as a worker: create the kvstore once, learn the rank.

    Call it before training. With a distributed type, later calls with the
    same type return the same ``Worker`` (ps-lite allows one kvstore per
    process); a local type gives a new single-worker ``Worker`` each time.

    Args:
        kvstore: a distributed type (``dist_sync``, ``dist_device_sync``,
            ``dist_async``), which needs the ``DMLC_*`` environment of a
            ps-lite worker (``python -m parallel_exec.launch`` sets it);
            ``horovod``, under ``horovodrun``; or a local type (``device``,
            ``local``) to run as the only worker.
        fail_fast: with a distributed type, install ``install_fail_fast``.

    Returns:
        The ``Worker``: ``rank``, ``num_workers``, ``kvstore``, ``shard``,
        ``broadcast``, ``trainer``.

    Raises:
        ValueError: an unknown kvstore type.
        ImportError: ``horovod`` without Horovod's MXNet support.
        RuntimeError: a distributed type without the ``DMLC_*``
            environment of a worker, or a second call with another type.
    """
    global _worker
    if kvstore in LOCAL_KVSTORE_TYPES:
        return Worker(kvstore)
    if kvstore not in KVSTORE_TYPES:
        raise ValueError(f"unknown kvstore type {kvstore!r}; expected one of {', '.join(KVSTORE_TYPES)}")
    if kvstore != "horovod":
        _check_worker_environment(kvstore, os.environ)
    with _worker_lock:
        if _worker is not None:
            if _worker.kvstore_type != kvstore:
                raise RuntimeError(
                    f"this process already joined as a {_worker.kvstore_type} worker; it cannot switch to {kvstore}"
                )
            return _worker
        _worker = _join_horovod() if kvstore == "horovod" else _join_ps_lite(kvstore)
        if fail_fast:
            install_fail_fast()
        # Runs before mxnet's own exit hook (registered later, atexit is
        # LIFO). Checked with mxnet 1.9.1: a kvstore still referenced from
        # this module when modules are torn down is never freed, so ps-lite
        # is never finalized and its threads abort the process at exit.
        atexit.register(_leave_job)
    LOGGER.info("joined the job as worker %d of %d (%s)", _worker.rank, _worker.num_workers, kvstore)
    return _worker


def _join_ps_lite(kvstore_type: str) -> Worker:
    kvstore = mx.kv.create(kvstore_type)
    return Worker(kvstore_type, kvstore.rank, kvstore.num_workers, kvstore)


def _leave_job() -> None:
    """Drop this module's reference to the kvstore while MXNet still runs."""
    global _worker
    with _worker_lock:
        _worker = None
    gc.collect()  # a Trainer in a reference cycle may hold it too


def _check_worker_environment(kvstore: str, environ: "os._Environ[str] | Dict[str, str]") -> None:
    """Refuse to create a ps-lite kvstore that would crash or wait forever."""
    role = environ.get("DMLC_ROLE")
    missing = [name for name in _REQUIRED_WORKER_VARIABLES if not environ.get(name)]
    if role != "worker" or missing:
        found = f"DMLC_ROLE={role!r}" + (f", missing {', '.join(missing)}" if missing else "")
        raise RuntimeError(
            f"kvstore {kvstore!r} needs the environment of a ps-lite worker ({found}); start the script with "
            "python -m parallel_exec.launch -n WORKERS -- python script.py ..., or set the variables from "
            "parallel_exec.dist.role_environment(...)"
        )


__all__ = [
    "DIST_KVSTORE_TYPES",
    "DistTrainer",
    "HorovodTrainer",
    "KVSTORE_TYPES",
    "LOCAL_KVSTORE_TYPES",
    "ROLES",
    "Worker",
    "init_worker",
    "install_fail_fast",
    "role_environment",
    "role_of_process",
]
