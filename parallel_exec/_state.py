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
a ``ctypes.PyDLL`` handle of the same library, which keeps the GIL: the five
functions used only read or write a ``thread_local`` of MXNet's
``Imperative`` singleton, never block and never call back into Python, so
holding the GIL across them cannot deadlock. (benchmarks/RESULTS.md has the
measurements.)

The worker sets every C flag before and after each task instead of
remembering what it last set: a done-callback or an initializer runs on the
worker's thread too and may leave other flags behind (a setter costs what a
read costs, so trusting nothing is free).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, NamedTuple, Optional

from ._mxnet import mx

_local = threading.local()


def current_context() -> Optional["mx.Context"]:
    """Return the context of the ``ContextExecutor`` worker running this code.

    Returns:
        The worker's ``mx.Context`` inside a task or an initializer, ``None``
        in any thread that is not a ``ContextExecutor`` worker.
    """
    return getattr(_local, "context", None)


def set_worker_context(context: "mx.Context") -> None:
    """Record ``context`` as this thread's worker context (worker start-up only)."""
    _local.context = context


class TaskFlags(NamedTuple):
    """MXNet's per-thread flags a task runs with."""

    recording: bool  # autograd.is_recording()
    training: bool  # autograd.is_training()
    np_shape: bool  # npx.is_np_shape()
    np_array: bool  # npx.is_np_array()


# The same shared library as mx.base._LIB (dlopen returns the loaded one),
# called with the GIL held.
_held = ctypes.PyDLL(mx.base._LIB._name)
_is_recording = _held.MXAutogradIsRecording  # (bool *curr)
_is_training = _held.MXAutogradIsTraining  # (bool *curr)
_is_np_shape = _held.MXIsNumpyShape  # (int *curr)
_set_recording = _held.MXAutogradSetIsRecording  # (int value, int *prev)
_set_training = _held.MXAutogradSetIsTraining  # (int value, int *prev)
_set_np_shape = _held.MXSetIsNumpyShape  # (int value, int *prev); 1 = on for this thread, 0 = off
for _function in (_is_recording, _is_training, _is_np_shape, _set_recording, _set_training, _set_np_shape):
    _function.restype = ctypes.c_int

# mx.util.is_np_array() reads this thread-local's ``value``, a _NumpyArrayScope.
_NumpyArrayScope: Any = mx.util._NumpyArrayScope
_np_array_local = _NumpyArrayScope._current


class _Buffers(threading.local):
    """Out-parameters for the C calls, one set per thread (the GIL is kept
    during a call, but another thread may run between two calls)."""

    def __init__(self) -> None:
        self.recording = ctypes.c_bool()
        self.training = ctypes.c_bool()
        self.np_shape = ctypes.c_int()
        self.prev = ctypes.c_int()  # the setters' previous value, unused
        self.recording_ref = ctypes.pointer(self.recording)
        self.training_ref = ctypes.pointer(self.training)
        self.np_shape_ref = ctypes.pointer(self.np_shape)
        self.prev_ref = ctypes.pointer(self.prev)


_buffers = _Buffers()


def _raise_last_error() -> None:
    mx.base.check_call(-1)  # raises MXNetError with MXNet's last error message


_new_tuple = tuple.__new__


def _np_array_scope() -> Any:
    return getattr(_np_array_local, "value", None)


def capture_flags() -> TaskFlags:
    """Read the calling thread's flags (called by ``submit`` and ``map``)."""
    b = _buffers
    if _is_recording(b.recording_ref) | _is_training(b.training_ref) | _is_np_shape(b.np_shape_ref):
        _raise_last_error()
    scope = getattr(_np_array_local, "value", None)
    # tuple.__new__ instead of TaskFlags(...): a NamedTuple's __new__ costs 0.3 us.
    return _new_tuple(TaskFlags, (b.recording.value, b.training.value, b.np_shape.value != 0,
                                  scope is not None and scope._is_np_array))


def _set_c_flags(flags: TaskFlags) -> None:
    prev = _buffers.prev_ref
    failed = _set_recording(flags.recording, prev) | _set_training(flags.training, prev)
    if failed | _set_np_shape(flags.np_shape, prev):
        _raise_last_error()


def apply_flags(flags: TaskFlags) -> Any:
    """Put the submitter's ``flags`` in force in this worker thread.

    Returns what ``restore_flags`` needs: the thread's NumPy-array scope.
    """
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
