"""Gluon trainers whose ``step`` takes this worker's batch, as on one machine.

Built by ``WorkerProcess.trainer``, never directly: ``DistTrainer`` on a ps-lite
kvstore, ``HorovodTrainer`` under Horovod.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from .._mxnet import mx
from ._horovod import import_horovod

if TYPE_CHECKING:
    from ._worker_process import WorkerProcess


class DistTrainer(mx.gluon.Trainer):
    """A ``gluon.Trainer`` whose ``step`` takes this worker's batch size.

    Build it with ``WorkerProcess.trainer``. On one machine ``trainer.step(n)``
    divides the summed gradient by the ``n`` samples it came from. With a
    synchronous distributed kvstore the servers sum the gradients of all
    workers, so the divisor must be the global batch; with ``dist_async``
    each worker's push is applied on its own. ``step`` does that
    conversion, so the training loop stays the one-machine loop.
    """

    def __init__(
        self, params: Any, optimizer: Any, optimizer_params: Optional[dict], *, worker: "WorkerProcess", **kwargs: Any
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

    def _init_params(self) -> None:
        """Gluon's kvstore initialisation, finished before the first gradient is pushed.

        It broadcasts rank 0's weights through key ``i`` (init, then an async
        pull). With ``update_on_kvstore=False`` the gradients go through the
        same key, so a pull served after the workers' first push returned
        their gradient sum as the weights (mxnet 1.9.1; seen in 1 run of 5,
        the loss jumping 100-fold after the first step). Waiting here for
        the pulled weights keeps this worker's first push after its pull.
        """
        super()._init_params()
        if self._kvstore is not None and not self._update_on_kvstore:
            for param in self._params:
                for data in param.list_data():
                    data.wait_to_read()


class HorovodTrainer(mx.gluon.Trainer):
    """A ``gluon.Trainer`` that sums gradients over this process's contexts and, with Horovod, over all processes.

    Build it with ``WorkerProcess.trainer`` after ``init_worker("horovod")``.
    Horovod's own ``DistributedTrainer`` allreduces only the first context's
    gradient, so with several contexts per process they drift apart
    silently. This one adds up the local contexts' gradients first,
    allreduces the sum, and copies it back to every context, so every
    context of every process applies the same update. Like ``DistTrainer``,
    ``step`` takes this worker's batch size.

    Needs Horovod built with MXNet support (``pip install
    parallel_exec[horovod]``; see docs/multi-machine.md, Horovod).
    """

    def __init__(self, params: Any, optimizer: Any, optimizer_params: Optional[dict] = None, **kwargs: Any) -> None:
        super().__init__(params, optimizer, optimizer_params, kvstore=None, **kwargs)
        self._hvd = import_horovod()
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
