"""Horovod, the optional replacement for the servers: import it, broadcast with it."""

from __future__ import annotations

from typing import Any, List

from .._mxnet import mx


def import_horovod() -> Any:
    """``horovod.mxnet``, or an ImportError that says how to install it."""
    try:
        import horovod.mxnet as hvd
    except ImportError as exc:
        raise ImportError(
            "kvstore 'horovod' needs Horovod built with MXNet support: HOROVOD_WITH_MXNET=1 pip install "
            "--no-build-isolation horovod==0.28.1 (see docs/multi-machine.md, Horovod)"
        ) from exc
    return hvd


def horovod_broadcast(keys: List[int], arrays: List[List["mx.nd.NDArray"]]) -> None:
    """Rank 0's first-context values to every context of every process."""
    hvd = import_horovod()
    for key, data in zip(keys, arrays):
        hvd.broadcast_(data[0], root_rank=0, name=f"parallel_exec.broadcast.{key}")
        for other in data[1:]:
            data[0].copyto(other)
