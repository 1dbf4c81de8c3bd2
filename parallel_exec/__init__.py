"""Data-parallel MXNet Gluon training on the devices of one machine.

One worker thread per ``mx.Context``, behind the ``concurrent.futures``
interface, plus a drop-in for ``gluonnlp.utils.Parallel``.
"""

from ._compat import Parallel, Parallelizable
from ._executor import BrokenContextExecutor, ContextExecutor
from ._state import current_context
from ._stats import ExecutorStats, WorkerStats
from ._timeline import Timeline

__version__ = "0.1.0"

__all__ = [
    "BrokenContextExecutor",
    "ContextExecutor",
    "ExecutorStats",
    "Parallel",
    "Parallelizable",
    "Timeline",
    "WorkerStats",
    "current_context",
]
