"""Per-thread state a task carries: the worker's context and MXNet's flags.

MXNet keeps the default context (``Context._default_ctx``, a
``threading.local``), the autograd recording/training flags and the NumPy
shape flag (C++ ``thread_local``) and the NumPy array flag (a Python
``threading.local``) per thread, so a worker thread starts with none of the
caller's. This module moves them across: ``capture_flags`` in the submitting
thread, ``apply_flags`` and ``restore_flags`` around the task in the worker.

Reading or setting a C flag is a call into MXNet's C library, and these
calls were the largest per-task cost of a worker: through ``mx.autograd``
each one builds ctypes objects and releases the GIL, which a waiting thread
can take, so four calls could cost four GIL hand-overs. Here they go through
``_held``, which keeps the GIL: these functions only read or write a
``thread_local`` of MXNet's ``Imperative`` singleton, never block and never
call back into Python, so holding the GIL across them cannot deadlock
(benchmarks/RESULTS.md has the measurements).

The worker sets every C flag after each task. Before a task it sets them
too, unless it knows what they are: after a task that returned and whose
future ran no done-callback on the worker's thread, nothing else ran there
since they were put back (a done-callback or an initializer may leave flags
behind, a failed task may not have had them put back). A caller that is not
recording, the usual case, then costs three MXNet calls a task instead of
six (benchmarks/RESULTS.md). The same knowledge spares the check of the
default context before the task (``keep_default_context``).
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple, Optional

from . import _held
from ._mxnet import mx

_local = threading.local()


def current_context() -> Optional["mx.Context"]:
    """Return the context of the ``ContextExecutor`` worker running this code.

    Returns:
        The worker's ``mx.Context`` inside a task or an initializer, ``None``
        in any thread that is not a ``ContextExecutor`` worker.
    """
    return getattr(_local, "context", None)


_default_context = mx.Context._default_ctx  # MXNet's default context, a threading.local


def keep_default_context(pinned: "mx.Context") -> None:
    """Make ``pinned`` this thread's default context again, if a task left another.

    Called after each task, and before it unless nothing else ran on the
    thread since the last one, instead of ``with pinned:`` (0.7 us a task):
    it undoes whatever ``with ctx:`` a task or a done-callback left entered. ``pinned``
    must be the worker's own copy, since a task's ``with
    mx.current_context():`` stores ``_old_ctx`` on it.
    """
    if _default_context.__dict__.get("value") is not pinned:
        _default_context.value = pinned


def set_worker_context(context: "mx.Context", pinned: "mx.Context") -> None:
    """Pin this thread to ``context`` for the executor it starts serving.

    Sets what ``current_context`` returns, and MXNet's default context to
    ``pinned``, the worker's private copy of ``context`` (``keep_default_context``),
    so code between tasks (done-callbacks) sees the worker's context too.
    """
    _local.context = context
    mx.Context._default_ctx.value = pinned


class TaskFlags(NamedTuple):
    """MXNet's per-thread flags a task runs with."""

    recording: bool  # autograd.is_recording()
    training: bool  # autograd.is_training()
    np_shape: bool  # npx.is_np_shape()
    np_array: bool  # npx.is_np_array()


# mx.util.is_np_array() reads this thread-local's ``value``, a _NumpyArrayScope.
_NumpyArrayScope: Any = mx.util._NumpyArrayScope
_np_array_local = _NumpyArrayScope._current


_new_tuple = tuple.__new__


def _np_array_scope() -> Any:
    # Not getattr(local, "value", None): a missing attribute (the usual case)
    # raises and catches AttributeError inside, ~1 us; the dict lookup, 0.07.
    return _np_array_local.__dict__.get("value")


def capture_flags() -> TaskFlags:
    """Read the calling thread's flags (called by ``submit`` and ``map``)."""
    b = _held.buffers
    if _held.is_recording(b.recording_ref) | _held.is_training(b.training_ref) | _held.is_np_shape(b.np_shape_ref):
        _held.raise_last_error()
    scope = _np_array_scope()
    # tuple.__new__ instead of TaskFlags(...): a NamedTuple's __new__ costs 0.3 us.
    return _new_tuple(TaskFlags, (b.recording.value, b.training.value, b.np_shape.value != 0,
                                  scope is not None and scope._is_np_array))


def _set_c_flags(flags: TaskFlags) -> None:
    prev = _held.buffers.prev_ref
    failed = _held.set_recording(flags.recording, prev) | _held.set_training(flags.training, prev)
    if failed | _held.set_np_shape(flags.np_shape, prev):
        _held.raise_last_error()


def apply_flags(flags: TaskFlags, current: Optional[TaskFlags] = None) -> Any:
    """Put the submitter's ``flags`` in force in this worker thread.

    Args:
        flags: the submitter's flags.
        current: the C flags this thread is known to have now, if it is
            known; MXNet is not called when they are ``flags`` already.

    Returns what ``restore_flags`` needs: the thread's NumPy-array scope.
    """
    if flags != current:
        _set_c_flags(flags)
    scope = _np_array_scope()
    if flags.np_array != (scope is not None and scope._is_np_array):
        _np_array_local.value = _NumpyArrayScope(flags.np_array)
    return scope


def restore_flags(own: TaskFlags, scope: Any) -> None:
    """Put the worker's ``own`` flags and NumPy-array ``scope`` back, whatever the task left."""
    _set_c_flags(own)
    if _np_array_scope() is not scope:
        if scope is None:
            del _np_array_local.value
        else:
            _np_array_local.value = scope


_OFF = TaskFlags(False, False, False, False)

# MXNet's Python per-thread state: the default context, automatic names
# (``dense0_``...), attribute and Gluon block scopes, the NumPy-array flag.
_MXNET_LOCALS = (
    mx.Context._default_ctx,
    mx.name.NameManager._current,
    mx.attribute.AttrScope._current,
    mx.gluon.block._BlockScope._current,
    _np_array_local,
)


def reset_thread_state() -> None:
    """Give this thread MXNet's per-thread state as a new thread has it.

    Called by a pooled worker thread between two executors, so nothing a
    task of one left behind (a ``with ctx:`` never exited, flags, a name
    counter) reaches the next: its C flags off, its Python thread-locals
    (MXNet's and ``current_context``'s) empty. MXNet's C++ per-thread caches
    are not reachable from here and are what the pool exists to keep.
    """
    _set_c_flags(_OFF)
    for local in _MXNET_LOCALS + (_local,):
        local.__dict__.clear()
