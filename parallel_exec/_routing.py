"""Which worker a task goes to: pure functions (no threads), and the warning
for an NDArray on a context that has no worker.

Routing rule (docs/executor.md, Routing): the first ``mx.nd.NDArray`` in a depth-first,
left-to-right walk of the positional arguments, then of the keyword values,
decides the context; among several workers of that context the one with the
fewest tasks queued or running wins. Otherwise the caller falls back to
round-robin; an NDArray on a context without a worker is logged once per
context and executor (``UnknownContextWarner``), since that is usually a
shard on the wrong device.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Set

from ._mxnet import mx

LOGGER = logging.getLogger("parallel_exec")

_NDArray = mx.nd.NDArray


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
