"""Start-up hooks of the Python processes of a launched worker: fail fast, report the rank.

``python -m parallel_exec.launch`` puts this folder first on each worker's
``PYTHONPATH``, so Python runs this file at start-up, before the user's
script, in the worker and every Python process it starts. It changes no
behaviour of a script that succeeds:

- Unless ``PARALLEL_EXEC_FAIL_FAST`` is ``0`` (``--no-fail-fast``), an
  uncaught exception in any thread prints its traceback and ends the process
  (``install_fail_fast``): a ps-lite worker that raised would otherwise hang
  in MXNet's exit handlers, and the whole job with it.
- When MXNet creates a distributed kvstore in this process, its ps-lite rank
  is written as ``rank N`` to the file descriptor ``PARALLEL_EXEC_REPORT_FD``,
  so the launcher can label the output with it.
- Then the ``sitecustomize`` this file hides on ``sys.path``, if any, runs.

Only the standard library is used here (MXNet and parallel_exec may not be
importable by this interpreter); ``_fail_fast.py`` is loaded by its path.
"""

import importlib.machinery
import importlib.util
import os
import stat
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any, List, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
_KVSTORE_MODULE = "mxnet.kvstore.kvstore"


def _load_by_path(name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None  # a .py file next to this folder
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _install_fail_fast() -> None:
    path = os.path.join(os.path.dirname(_HERE), "_fail_fast.py")
    _load_by_path("_parallel_exec_fail_fast", path).install_fail_fast()


def _report_rank(kvstore: Any, fd: int) -> None:
    """Tell the launcher this worker's ps-lite rank, once."""
    try:
        if not kvstore.type.startswith("dist") or os.environ.get("DMLC_ROLE") != "worker":
            return
        os.write(fd, f"rank {kvstore.rank}\n".encode())
        os.close(fd)
    except OSError:  # the launcher is gone or the descriptor is not ours: labels only
        pass


def _patch_kvstore(module: ModuleType, fd: int) -> None:
    """Make every new ``KVStore`` of ``module`` report its rank."""
    original_init = module.KVStore.__init__
    reported: List[bool] = []

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if not reported:
            reported.append(True)
            _report_rank(self, fd)

    module.KVStore.__init__ = __init__


class _KVStoreFinder:
    """Finds ``mxnet.kvstore.kvstore`` like the path finder, then patches it once it has run."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def find_spec(self, name: str, path: Optional[Sequence[str]], target: Any = None) -> Optional[ModuleSpec]:
        if name != _KVSTORE_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _patch_kvstore(module, self._fd)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]  # this spec's loader only
        return spec


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def _watch_for_kvstore() -> None:
    fd = os.environ.get("PARALLEL_EXEC_REPORT_FD", "")
    # A process started with close_fds may have another file under that number.
    if fd.isdigit() and _is_pipe(int(fd)) and _KVSTORE_MODULE not in sys.modules:
        sys.meta_path.insert(0, _KVStoreFinder(int(fd)))


def _run_hidden_sitecustomize() -> None:
    """Run the ``sitecustomize`` that this one shadows, as Python would have."""
    rest = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


if os.environ.get("PARALLEL_EXEC_FAIL_FAST") == "1":
    _install_fail_fast()
_watch_for_kvstore()
_run_hidden_sitecustomize()
