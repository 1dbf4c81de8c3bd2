"""This process's place in a multi-process job: ``init_worker`` and ``WorkerProcess``.

``init_worker`` joins the job once per process (a ps-lite kvstore, or
Horovod) and returns the ``WorkerProcess``: rank, number of workers, the data
share (``shard``), rank 0's parameters everywhere (``broadcast``) and a
trainer on the job's kvstore (``trainer``).

Module state: ``_worker``, the one ``WorkerProcess`` of a distributed job in this
process (ps-lite allows one kvstore per process), guarded by ``_worker_lock``
and dropped at exit while MXNet still runs.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import threading
from typing import Any, List, Optional

from .._mxnet import mx
from ._environment import KVSTORE_TYPES, LOCAL_KVSTORE_TYPES, check_worker_environment
from ._fail_fast import install_fail_fast
from ._horovod import horovod_broadcast, import_horovod
from ._trainers import DistTrainer, HorovodTrainer

LOGGER = logging.getLogger("parallel_exec.dist")

# Keys of the parameters broadcast by ``WorkerProcess.broadcast``: far above the
# indices 0..n-1 that gluon.Trainer uses on the same kvstore, and ints like
# them (ps-lite refuses a mix of int and str keys).
_BROADCAST_KEY_BASE = 1 << 30


class WorkerProcess:
    """This process's place in the job as one of its worker processes: kvstore, rank, data share.

    A ps-lite (or Horovod) worker is a process; an executor's workers are
    threads. Hence the name.

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
        return f"<WorkerProcess rank {self.rank} of {self.num_workers}, kvstore {self.kvstore_type}>"

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
            horovod_broadcast(keys, arrays)
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
            raise TypeError("WorkerProcess.trainer uses the worker's kvstore; do not pass kvstore=")
        self.broadcast(params)
        if self.kvstore_type == "horovod":
            return HorovodTrainer(params, optimizer, optimizer_params, **kwargs)
        return DistTrainer(params, optimizer, optimizer_params, worker=self, **kwargs)


# The earlier name, still importable from parallel_exec.dist.
Worker = WorkerProcess


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


_worker: Optional[WorkerProcess] = None
# Guards _worker: only one kvstore per process.
_worker_lock = threading.Lock()


def init_worker(kvstore: str = "dist_sync", *, fail_fast: bool = True) -> WorkerProcess:
    """Join the job as a worker: create the kvstore once, learn the rank.

    Call it before training. With a distributed type, later calls with the
    same type return the same ``WorkerProcess`` (ps-lite allows one kvstore per
    process); a local type gives a new single-worker ``WorkerProcess`` each time.

    Args:
        kvstore: a distributed type (``dist_sync``, ``dist_device_sync``,
            ``dist_async``), which needs the ``DMLC_*`` environment of a
            ps-lite worker (``python -m parallel_exec.launch`` sets it);
            ``horovod``, under ``horovodrun``; or a local type (``device``,
            ``local``) to run as the only worker.
        fail_fast: with a distributed type, install ``install_fail_fast``.

    Returns:
        The ``WorkerProcess``: ``rank``, ``num_workers``, ``kvstore``, ``shard``,
        ``broadcast``, ``trainer``.

    Raises:
        ValueError: an unknown kvstore type.
        ImportError: ``horovod`` without Horovod's MXNet support.
        RuntimeError: a distributed type without the ``DMLC_*``
            environment of a worker, or a second call with another type.
    """
    global _worker
    if kvstore in LOCAL_KVSTORE_TYPES:
        return WorkerProcess(kvstore)
    if kvstore not in KVSTORE_TYPES:
        raise ValueError(f"unknown kvstore type {kvstore!r}; expected one of {', '.join(KVSTORE_TYPES)}")
    if kvstore != "horovod":
        check_worker_environment(kvstore, os.environ)
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


def _join_horovod() -> WorkerProcess:
    hvd = import_horovod()
    hvd.init()
    return WorkerProcess("horovod", hvd.rank(), hvd.size())


def _join_ps_lite(kvstore_type: str) -> WorkerProcess:
    kvstore = mx.kv.create(kvstore_type)
    return WorkerProcess(kvstore_type, kvstore.rank, kvstore.num_workers, kvstore)


def _leave_job() -> None:
    """Drop this module's reference to the kvstore while MXNet still runs."""
    global _worker
    with _worker_lock:
        _worker = None
    gc.collect()  # a Trainer in a reference cycle may hold it too
