"""Gluon's lazy initialisation made safe from several threads at once.

Gluon (mxnet 1.9.1, ``python/mxnet/gluon/block.py`` and ``parameter.py``)
initialises a network on its first forward pass, and none of that is
thread-safe. The serial-init gate covers each worker's first task only; a
network first used later (a GAN's second network, an evaluation network, a
block hybridized mid-training) meets workers that run at once. So the
critical sections themselves run under one process-wide lock:

- ``Parameter._finish_deferred_init``: clears ``_deferred_init`` first, then
  sets ``_data``, then ``_grad`` (``_init_impl``). Two threads would both
  initialise, or one would see a half-initialised parameter.
- ``Parameter.data``, ``list_data``, ``grad``, ``list_grad`` while the
  parameter has no data yet or is being initialised: in that window they
  raise "has not been initialized" although another thread is about to
  finish. Waiting for the lock waits for that thread. (The accessors, not
  ``_check_and_get``: they pass it ``self._data`` read before any wait.)
- ``HybridBlock._deferred_infer_shape``: builds the symbolic graph and sets
  every parameter's shape. The graph is built under ``name_scope()``, whose
  scope object stores the previous scope on itself (shared by threads:
  ``'NoneType' object has no attribute '__exit__'``), and concurrent shape
  setting fails with "shape cannot be inferred".
- ``HybridBlock._get_graph`` while ``_cached_graph`` is empty: the same
  ``name_scope()``, and ``_in_format``/``_out_format`` written twice.
- ``HybridBlock._call_cached_op`` while ``_cached_op`` is ``None``:
  ``_build_cache`` appends to ``_cached_op_args``; two builders would leave
  every argument twice.

Each wrapper checks first, without the lock, whether the work is already
done (a parameter with data, a block with its cached op or graph), so
steady-state calls never take it; after taking it, it checks again, so a
thread that waited finds the block ready and does not initialise it again.
The lock is reentrant: building a cache infers shapes, which builds the graph.

Caveat: the first build of a hybridized block calls the user's
``hybrid_forward`` under the lock, which must therefore not wait for another
thread that is itself initialising a network.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

from ._mxnet import mx

# Serialises every lazy-initialisation step of every Gluon block and
# parameter in the process. Reentrant (see the module docstring). Lock order:
# taken inside tasks only, never while holding an executor's or the gate's lock.
_lock = threading.RLock()
_installed = False
_install_lock = threading.Lock()  # guards _installed


def install() -> None:
    """Patch Gluon's lazy-initialisation steps once; later calls do nothing.

    Called when the first ``ContextExecutor`` starts (``Parallel`` makes one).
    Code that never runs Gluon from several threads sees the same behaviour,
    at the cost of one or two attribute checks per parameter access.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        parameter = mx.gluon.Parameter
        hybrid_block = mx.gluon.HybridBlock
        parameter._pe_initializing = False  # True while this package initialises it
        _patch(parameter, "_finish_deferred_init", _finish_deferred_init)
        _patch(parameter, "data", _read_on_context)
        _patch(parameter, "grad", _read_on_context)
        _patch(parameter, "list_data", _read_all)
        _patch(parameter, "list_grad", _read_all)
        _patch(hybrid_block, "_deferred_infer_shape", _deferred_infer_shape)
        _patch(hybrid_block, "_get_graph", _get_graph)
        _patch(hybrid_block, "_call_cached_op", _call_cached_op)
        _installed = True


Method = Callable[..., Any]


def _patch(cls: type, name: str, make_wrapper: Callable[[Method], Method]) -> None:
    """Replace the method ``cls.name`` by ``make_wrapper(original)``."""
    original = getattr(cls, name)
    setattr(cls, name, functools.wraps(original)(make_wrapper(original)))


def _finish_deferred_init(original: Method) -> Method:
    def finish_deferred_init(self: Any) -> None:
        if not self._deferred_init:
            return  # steady state, or already finished by another thread
        with _lock:
            if not self._deferred_init:
                return
            # ``_data`` is set before ``_grad``: readers must wait until both are.
            self._pe_initializing = True
            try:
                original(self)
            finally:
                del self._pe_initializing  # back to the class default, False

    return finish_deferred_init


# The readers keep the originals' signatures (no *args): they are on the
# steady-state path of every forward pass.


def _read_on_context(original: Method) -> Method:
    def read_on_context(self: Any, ctx: Any = None) -> Any:
        if self._data is None or self._pe_initializing:
            with _lock:  # another thread may be initialising this parameter now
                return original(self, ctx)
        return original(self, ctx)

    return read_on_context


def _read_all(original: Method) -> Method:
    def read_all(self: Any) -> Any:
        if self._data is None or self._pe_initializing:
            with _lock:
                return original(self)
        return original(self)

    return read_all


def _deferred_infer_shape(original: Method) -> Method:
    def deferred_infer_shape(self: Any, *args: Any, **kwargs: Any) -> None:
        with _lock:
            if all(not p._deferred_init for p in self.collect_params().values()):
                return  # another thread inferred and initialised while this one waited
            original(self, *args, **kwargs)

    return deferred_infer_shape


def _get_graph(original: Method) -> Method:
    def get_graph(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self._cached_graph:
            return original(self, *args, **kwargs)
        with _lock:
            return original(self, *args, **kwargs)

    return get_graph


def _call_cached_op(original: Method) -> Method:
    def call_cached_op(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self._cached_op is None:
            with _lock:
                if self._cached_op is None:
                    self._build_cache(*args, **kwargs)
        return original(self, *args, **kwargs)

    return call_cached_op
