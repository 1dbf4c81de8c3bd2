"""Data-parallel MXNet Gluon training on the devices of one machine.

One worker thread per ``mx.Context``, behind the ``concurrent.futures``
interface, plus a drop-in for ``gluonnlp.utils.Parallel``.

The names below are imported on first use (a module ``__getattr__``, as
``concurrent.futures`` does), so ``python -m parallel_exec.launch`` and
``parallel_exec.dist.role_environment`` run without importing MXNet.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:  # the eager imports, for type checkers and IDEs
    from ._executor import BrokenContextExecutor, ContextExecutor
    from ._gluonnlp_shim import Parallel, Parallelizable
    from ._pool import release_idle_threads
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
    "release_idle_threads",
]

# Public name -> the private module that defines it.
_LAZY = {
    "BrokenContextExecutor": "._executor",
    "ContextExecutor": "._executor",
    "ExecutorStats": "._stats",
    "Parallel": "._gluonnlp_shim",
    "Parallelizable": "._gluonnlp_shim",
    "Timeline": "._timeline",
    "WorkerStats": "._stats",
    "current_context": "._state",
    "release_idle_threads": "._pool",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> _typing.List[str]:
    # The public names, loaded or not, and the submodules imported so far.
    return sorted(set(__all__) | {"__version__"} | {name for name in globals() if not name.startswith("_")})
