"""Which worker a task goes to: the executor's routing tables (``Router``),
the validation of its ``contexts``, and the warning for an NDArray on a
context that has no worker. No threads of its own.

Routing rule (docs/executor.md, Routing): the first ``mx.nd.NDArray`` in a depth-first,
left-to-right walk of the positional arguments, then of the keyword values,
decides the context; among several workers of that context the one with the
fewest tasks queued or running wins. Otherwise workers take turns
(round-robin); an NDArray on a context without a worker is logged once per
context and executor (``UnknownContextWarner``), since that is usually a
shard on the wrong device.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Any, Dict, Generic, Iterator, List, Mapping, Optional, Protocol, Sequence, Set, Tuple, TypeVar

from ._held import device_of
from ._mxnet import mx

LOGGER = logging.getLogger("parallel_exec")

_NDArray = mx.nd.NDArray


def check_contexts(contexts: Any) -> Tuple["mx.Context", ...]:
    """Validate the ``contexts`` argument; return it as a tuple."""
    if isinstance(contexts, mx.Context):
        raise TypeError(f"contexts must be a sequence of mx.Context, got a single Context; write [{contexts!r}]")
    if isinstance(contexts, (str, bytes)):
        raise TypeError(f"contexts must be a sequence of mx.Context, got a string: {contexts!r}")
    try:
        result = tuple(contexts)
    except TypeError:
        got = f"{type(contexts).__name__}: {contexts!r}"
        raise TypeError(f"contexts must be a sequence of mx.Context, got {got}") from None
    if not result:
        raise ValueError(
            "contexts is empty: give at least one mx.Context, e.g. [mx.cpu(0)]; a list built from "
            "mx.context.num_gpus() is empty where MXNet sees no GPU"
        )
    for i, context in enumerate(result):
        if not isinstance(context, mx.Context):
            raise TypeError(f"contexts[{i}] is not an mx.Context: {context!r}")
    gpus = [(i, c) for i, c in enumerate(result) if c.device_type == "gpu"]
    if gpus:
        # Caught here rather than at the first task, where a CPU-only build
        # says only "Operator ... is not implemented for GPU".
        visible = mx.context.num_gpus()
        for i, context in gpus:
            if context.device_id >= visible:
                seen = "no GPU" if visible == 0 else f"only {visible} GPU(s), gpu(0) to gpu({visible - 1})"
                raise ValueError(
                    f"contexts[{i}] is {context}, but MXNet sees {seen} (a CPU-only mxnet build, no CUDA "
                    "driver, or CUDA_VISIBLE_DEVICES hides it); use CPU contexts such as "
                    "[mx.cpu(0), mx.cpu(1)], or install the mxnet build for your CUDA (e.g. mxnet-cu112)"
                )
    return result


def find_first_ndarray(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional["mx.nd.NDArray"]:
    """Return the first NDArray in ``args`` then ``kwargs`` values, or ``None``.

    Descends into lists, tuples (namedtuples included) and dict values. The
    walk uses an explicit stack, so deep nesting cannot hit the recursion
    limit, and skips containers it has already entered, so a structure that
    contains itself cannot loop forever.

    Args:
        args: the positional arguments of a task.
        kwargs: the keyword arguments of a task, walked in call order.

    Returns:
        The first NDArray found, or ``None`` if there is none.
    """
    # Fast path for the common call ``submit(fn, shard, ...)``.
    if args and isinstance(args[0], _NDArray):
        return args[0]
    # The stack holds iterators; the top one is walked first. kwargs go at
    # the bottom because they come after every positional argument.
    stack: List[Iterator[Any]] = [iter(kwargs.values()), iter(args)]
    entered = set()
    while stack:
        for item in stack[-1]:
            if isinstance(item, _NDArray):
                return item
            if isinstance(item, (list, tuple, dict)) and id(item) not in entered:
                entered.add(id(item))
                stack.append(iter(item.values() if isinstance(item, dict) else item))
                break
        else:
            stack.pop()
    return None


def pick_least_loaded(loads: Sequence[int]) -> int:
    """Return the position of the smallest load, the first one on ties.

    Args:
        loads: a snapshot of the tasks queued or running on each candidate
            worker, non-empty.
    """
    best = 0
    for position in range(1, len(loads)):
        if loads[position] < loads[best]:
            best = position
    return best


class UnknownContextWarner:
    """Logs a warning the first time a task's NDArray is on a context without a worker.

    Such a task still runs (round-robin, docs/executor.md), but on another device's
    thread, which is rarely what the caller meant; once per context and
    executor keeps a training loop's log readable.

    Args:
        contexts: the executor's contexts, named in the message.
    """

    def __init__(self, contexts: Sequence["mx.Context"]) -> None:
        self._contexts = list(contexts)
        self._warned: Set["mx.Context"] = set()
        # Guards _warned on this rare path only, so two threads that meet the
        # same context at once log it once. Taken with no other lock held.
        self._lock = threading.Lock()

    def warn_once(self, context: "mx.Context") -> None:
        """Log the warning for ``context`` unless it was logged already."""
        with self._lock:
            if context in self._warned:
                return
            self._warned.add(context)
        LOGGER.warning(
            "a task's first NDArray is on %s, which has no worker in this executor (its contexts are %s); "
            "the task runs round-robin on another context's worker. Put the data on one of these contexts "
            "(split_and_load(data, ex.contexts)) or use submit_to(context, ...).",
            context, self._contexts,
        )


class Worker(Protocol):
    """What routing reads of a worker (``_worker.WorkerSlot``)."""

    context: "mx.Context"

    @property
    def load(self) -> int: ...


W = TypeVar("W", bound=Worker)


class Router(Generic[W]):
    """An executor's routing tables: which workers serve which context, and whose turn it is.

    Fixed after construction, but for the round-robin turn, which ``pick``
    advances under the executor's lock.

    Args:
        workers: the executor's workers, in the order of its contexts.
    """

    def __init__(self, workers: Sequence[W]) -> None:
        self.contexts = tuple(worker.context for worker in workers)
        self._by_context: Dict["mx.Context", List[W]] = {}
        for worker in workers:
            self._by_context.setdefault(worker.context, []).append(worker)
        # The same lists by (device_typeid, device_id): routing reads an NDArray's
        # device with one GIL-keeping call instead of building its mx.Context.
        self._by_device: Dict[Tuple[int, int], List[W]] = {
            (c.device_typeid, c.device_id): listed for c, listed in self._by_context.items()
        }
        self._round_robin = itertools.cycle(workers)
        self._warner = UnknownContextWarner(self.contexts)

    def candidates_for(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[List[W]]:
        """The workers of the first NDArray's context; ``None`` for round-robin."""
        ndarray = find_first_ndarray(args, kwargs)
        if ndarray is None:
            return None
        candidates = self._by_device.get(device_of(ndarray))
        if candidates is None:
            self._warner.warn_once(ndarray.context)
        return candidates

    def workers_of(self, context: Any) -> List[W]:
        """The workers pinned to ``context``.

        Raises:
            TypeError: ``context`` is not an ``mx.Context``.
            ValueError: no worker is pinned to it.
        """
        if not isinstance(context, mx.Context):
            raise TypeError(f"context must be an mx.Context, got {context!r}")
        candidates = self._by_context.get(context)
        if candidates is None:
            raise ValueError(f"no worker is pinned to {context}; this executor's contexts are {list(self.contexts)}")
        return candidates

    def pick(self, candidates: Optional[List[W]]) -> W:
        """The worker to run a task (called under the executor's lock)."""
        if candidates is None:
            return next(self._round_robin)
        if len(candidates) == 1:
            return candidates[0]
        return candidates[pick_least_loaded([worker.load for worker in candidates])]
