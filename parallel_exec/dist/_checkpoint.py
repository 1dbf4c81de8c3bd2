"""Checkpoints that let a restarted job resume where it stopped.

    checkpointer = dist.Checkpointer("ckpt", net, trainer, every=50, rngs=[rng])
    start = checkpointer.restore()            # the newest complete checkpoint, or step 0
    for step in range(start.step, num_steps):
        ...                                   # forward, backward, trainer.step(...)
        checkpointer.maybe_save(step + 1)     # every 50 steps

Guarantees:
- A checkpoint file is complete or absent: it is written to a temporary file
  in the same directory, flushed to disk, then renamed over its final name
  (``os.replace`` is atomic on POSIX). A reader never sees half a file.
- Every file carries its length and a SHA-256 of its contents; ``restore``
  skips (with a warning) any file that does not match, and takes the newest
  one that does.
- In a job with several workers, rank 0 writes the parameters and trainer
  states (the same in every worker of a synchronous job), each worker writes
  its own random state, and ``save`` returns on every worker only once the
  whole checkpoint exists.
- After ``restore`` the parameters, the trainer's states (optimizer state and
  update counts), the step and epoch counters, Python's and NumPy's global
  random state and the generators given in ``rngs`` are what they were when
  the checkpoint was saved; so a run that is stopped and resumed ends with
  the same parameters as one that never stopped.

Assumptions:
- Every worker sees the same directory (one machine, or shared storage), and
  no other job writes to it.
- MXNet cannot read its generators' state back, so at every save and restore
  the Checkpointer reseeds them with a seed drawn from them (saved with the
  checkpoint): MXNet's random stream after a checkpoint is the same whether
  or not the run stopped there.
- Files are pickles: load only checkpoints you wrote.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .._mxnet import mx
from . import _checkpoint_files as _files
from . import _random_state

LOGGER = logging.getLogger("parallel_exec.dist")


class Checkpoint(NamedTuple):
    """What ``Checkpointer.restore`` found: where to continue from.

    ``path`` is None when there was no complete checkpoint; then ``step``
    and ``epoch`` are 0 and ``extra`` is None.
    """

    step: int
    epoch: int
    extra: Any
    path: Optional[Path]


class Checkpointer:
    """Save and restore a training run: parameters, trainer states, counters, random state.

    Args:
        directory: where checkpoints go; created if missing. Every worker of
            a job must see the same directory.
        net: the ``gluon.Block`` whose parameters are saved (by the names
            ``save_parameters`` uses), or a ``ParameterDict``.
        trainer: the ``gluon.Trainer`` whose states are saved, or None. With
            a distributed kvstore it must be built with
            ``update_on_kvstore=False`` (``dist_sync``, ``dist_device_sync``):
            otherwise the optimizer state lives on the servers, out of reach.
        every: ``maybe_save(step)`` saves when ``step`` is a multiple of it.
        keep: how many complete checkpoints to keep (at least 1); older ones
            are deleted after each save. Keep 2 or more so that a damaged
            newest file leaves one to fall back on.
        worker: the ``dist.WorkerProcess`` of this process; by default the one
            ``init_worker`` joined with a distributed kvstore, else this
            process alone.
        rngs: ``numpy.random.Generator``, ``numpy.random.RandomState`` or
            ``random.Random`` objects whose state is saved and restored too.

    Raises:
        ValueError: ``every`` or ``keep`` below 1, or a trainer whose
            optimizer runs on the parameter servers.
        TypeError: ``net`` or an entry of ``rngs`` of the wrong type.

    Thread-safety: call it from the thread that drives training, in every
    worker at the same steps (``save`` waits for the other workers).
    """

    def __init__(
        self,
        directory: "str | os.PathLike[str]",
        net: Any,
        trainer: Optional["mx.gluon.Trainer"] = None,
        *,
        every: int = 1,
        keep: int = 3,
        worker: Any = None,
        rngs: Sequence[Any] = (),
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        _named_parameters(net)  # TypeError now rather than at the first save
        for index, rng in enumerate(rngs):
            if not isinstance(rng, (np.random.Generator, np.random.RandomState, random.Random)):
                raise TypeError(
                    f"rngs[{index}] is not a numpy Generator, RandomState or random.Random: {rng!r}"
                )
        self.directory = Path(directory)
        self.every = every
        self.keep = keep
        self._net = net
        self._trainer = trainer
        self._worker = worker if worker is not None else _joined_worker()
        self._rngs = list(rngs)
        self.rank = self._worker.rank if self._worker is not None else 0
        self.num_workers = self._worker.num_workers if self._worker is not None else 1
        if trainer is not None and self._worker is not None and self._worker.kvstore is not None:
            _check_trainer_states_are_local(trainer, self._worker.kvstore_type)
        self.directory.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"<Checkpointer {str(self.directory)!r} every {self.every}, rank {self.rank} of {self.num_workers}>"

    # -- saving ---------------------------------------------------------------

    def maybe_save(self, step: int, *, epoch: int = 0, extra: Any = None) -> bool:
        """Save if ``step`` is a positive multiple of ``every``; return whether it did.

        Call it after each ``trainer.step``, in every worker, with the number
        of steps done so far.
        """
        if step <= 0 or step % self.every:
            return False
        self.save(step, epoch=epoch, extra=extra)
        return True

    def save(self, step: int, *, epoch: int = 0, extra: Any = None) -> Path:
        """Write the checkpoint of ``step`` now; every worker must call it.

        Args:
            step: steps done so far; ``restore`` returns it as ``step``.
            epoch: an epoch counter to return with it.
            extra: anything picklable to return with it (metrics, history).

        Returns:
            The path of the checkpoint file.

        Raises:
            RuntimeError: this worker cannot see the file rank 0 wrote (the
                directory is not shared).
        """
        if step < 0:
            raise ValueError(f"step must not be negative, got {step}")
        path = self.directory / f"checkpoint-{step:010d}.pe"
        random_state = _random_state.capture(self._rngs)
        if self.rank > 0:
            _files.write_atomically(_files.rank_path(path, self.rank), random_state)
        self._barrier()  # every worker's random state is on disk before the checkpoint counts
        if self.rank == 0:
            state = {
                "step": step,
                "epoch": epoch,
                "extra": extra,
                "num_workers": self.num_workers,
                "params": {name: param.list_data()[0].asnumpy() for name, param in _named_parameters(self._net)},
                "trainer": None if self._trainer is None else _trainer_states(self._trainer),
                "random": random_state,
            }
            _files.write_atomically(path, state)
            self._prune()
            LOGGER.info("saved checkpoint %s (step %d, epoch %d)", path, step, epoch)
        self._barrier()
        if self.rank > 0:
            _files.wait_until_visible(path)
        return path

    def _prune(self) -> None:
        for _, old in _files.main_checkpoints(self.directory)[self.keep :]:
            for stale in [old, *old.parent.glob(old.stem + ".rank*.pe")]:
                try:
                    stale.unlink()
                except FileNotFoundError:
                    pass

    def _barrier(self) -> None:
        if self.num_workers > 1:
            _barrier(self._worker)

    # -- restoring ------------------------------------------------------------

    def restore(self) -> Checkpoint:
        """Load the newest complete checkpoint into the network, trainer and random state.

        Call it in every worker before the first ``trainer.step``. Files that
        are truncated, damaged or unreadable are skipped with a warning.

        Returns:
            The ``Checkpoint`` loaded, or ``Checkpoint(0, 0, None, None)``
            when the directory holds none.

        Raises:
            ValueError: the newest complete checkpoint does not fit the
                network (other parameter names or shapes).
        """
        if self.rank == 0:
            _files.remove_temporary_files(self.directory)
        found = Checkpoint(0, 0, None, None)
        for step, path in _files.main_checkpoints(self.directory):
            try:
                state = _files.read(path)
            except (OSError, ValueError) as exc:
                LOGGER.warning("skipping checkpoint %s: %s", path, exc)
                continue
            self._load(state, path)
            LOGGER.info("resuming from checkpoint %s (step %d, epoch %d)", path, step, state["epoch"])
            found = Checkpoint(state["step"], state["epoch"], state["extra"], path)
            break
        self._barrier()  # no worker writes (saves) before the clean-up above and every read are done
        return found

    def _load(self, state: Dict[str, Any], path: Path) -> None:
        _load_parameters(self._net, state["params"], path)
        if self._trainer is not None and state["trainer"] is not None:
            with _files.scratch_file() as scratch:
                Path(scratch).write_bytes(state["trainer"])
                with warnings.catch_warnings():
                    # mxnet 1.9.1 KVStore.load_optimizer_states never closes the file it reads.
                    warnings.simplefilter("ignore", ResourceWarning)
                    self._trainer.load_states(scratch)
        _random_state.restore(self._own_random_state(path, state), self._rngs)

    def _own_random_state(self, path: Path, state: Dict[str, Any]) -> Dict[str, Any]:
        if self.rank == 0:
            return state["random"]
        try:
            return _files.read(_files.rank_path(path, self.rank))
        except (OSError, ValueError) as exc:
            LOGGER.warning("using rank 0's random state: this worker's own (rank %d) is unusable: %s", self.rank, exc)
            return state["random"]

# -- helpers ------------------------------------------------------------------


def _load_parameters(net: Any, saved: Dict[str, np.ndarray], path: Path) -> None:
    """Check that ``saved`` fits ``net`` (names and shapes), then load it."""
    params = dict(_named_parameters(net))
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit this network: missing {missing or 'nothing'}, "
            f"unexpected {unexpected or 'nothing'}"
        )
    for name, param in params.items():
        if tuple(param.shape) != saved[name].shape:
            raise ValueError(
                f"checkpoint {path} does not fit this network: {name} has shape {saved[name].shape}, "
                f"the network's is {param.shape}"
            )
    for name, param in params.items():
        # set_data also refreshes a local kvstore that holds the weights.
        param.set_data(mx.nd.array(saved[name], dtype=saved[name].dtype))


def _trainer_states(trainer: "mx.gluon.Trainer") -> bytes:
    with _files.scratch_file() as scratch:  # Trainer saves only to a named file
        trainer.save_states(scratch)
        return Path(scratch).read_bytes()



def _named_parameters(net: Any) -> List[Tuple[str, "mx.gluon.Parameter"]]:
    """(name, parameter), sorted; a Block's names are those save_parameters writes."""
    if isinstance(net, mx.gluon.Block):
        # Private, checked with mxnet 1.9.1: the structural names that
        # save_parameters uses, the same in any process (collect_params()
        # names carry a per-process counter like hybridsequential0_).
        named = net._collect_params_with_prefix()
    elif isinstance(net, mx.gluon.ParameterDict):
        named = dict(net.items())
    else:
        raise TypeError(f"net must be a gluon Block or ParameterDict, got {net!r}")
    return sorted(named.items())


def _check_trainer_states_are_local(trainer: "mx.gluon.Trainer", kvstore_type: str) -> None:
    # Private, checked with mxnet 1.9.1: the update_on_kvstore the trainer was built with.
    update_on_kvstore = trainer._kvstore_params.get("update_on_kvstore")
    if kvstore_type.startswith("dist") and update_on_kvstore is not False:
        raise ValueError(
            f"with kvstore {kvstore_type!r} the trainer's optimizer runs on the parameter servers, whose state "
            "cannot be saved; build it with worker.trainer(..., update_on_kvstore=False) (dist_sync and "
            "dist_device_sync; dist_async cannot checkpoint trainer states) or pass trainer=None"
        )


def _joined_worker() -> Any:
    from . import _worker_process

    return _worker_process._worker  # the worker init_worker joined, if any


def _barrier(worker: Any) -> None:
    """Wait until every worker of the job got here."""
    if worker.kvstore_type == "horovod":
        import horovod.mxnet as hvd

        hvd.allreduce(mx.nd.zeros(1), name="parallel_exec.checkpoint.barrier").wait_to_read()
    else:
        worker.kvstore._barrier()  # ps-lite's global barrier of the worker group (mxnet 1.9.1)
