"""MXNet C functions called with the GIL held: the hot path's only C calls.

``ctypes.CDLL`` (MXNet's ``_LIB``) releases the GIL around every call, so each
call is a chance for a waiting thread to take the GIL: a hand-over per call,
paid several times per task. A ``ctypes.PyDLL`` handle of the same library
keeps the GIL instead. That is safe only for functions that never block and
never call back into Python (a held call that waits inside MXNet while an
engine thread needs the GIL, for a Python ``CustomOp``, would deadlock), so
this module lists every such function, each only reading or writing a
``thread_local`` of MXNet's ``Imperative`` singleton or an NDArray's fixed
context. Every one returns MXNet's status code (0: success).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Tuple

from ._mxnet import mx

# The same shared library as mx.base._LIB (dlopen returns the loaded one).
_lib = ctypes.PyDLL(mx.base._LIB._name)
is_recording = _lib.MXAutogradIsRecording  # (bool *curr)
is_training = _lib.MXAutogradIsTraining  # (bool *curr)
is_np_shape = _lib.MXIsNumpyShape  # (int *curr)
set_recording = _lib.MXAutogradSetIsRecording  # (int value, int *prev)
set_training = _lib.MXAutogradSetIsTraining  # (int value, int *prev)
set_np_shape = _lib.MXSetIsNumpyShape  # (int value, int *prev); 1 = on for this thread, 0 = off
get_context = _lib.MXNDArrayGetContext  # (NDArrayHandle, int *dev_type, int *dev_id); no wait on the array
for _function in (is_recording, is_training, is_np_shape, set_recording, set_training, set_np_shape, get_context):
    _function.restype = ctypes.c_int


class Buffers(threading.local):
    """Out-parameters for the calls, one set per thread: the GIL is kept
    during a call, but another thread may run between two calls."""

    def __init__(self) -> None:
        self.recording = ctypes.c_bool()
        self.training = ctypes.c_bool()
        self.np_shape = ctypes.c_int()
        self.prev = ctypes.c_int()  # the setters' previous value, unused
        self.dev_type = ctypes.c_int()
        self.dev_id = ctypes.c_int()
        self.recording_ref = ctypes.pointer(self.recording)
        self.training_ref = ctypes.pointer(self.training)
        self.np_shape_ref = ctypes.pointer(self.np_shape)
        self.prev_ref = ctypes.pointer(self.prev)
        self.dev_type_ref = ctypes.pointer(self.dev_type)
        self.dev_id_ref = ctypes.pointer(self.dev_id)


buffers = Buffers()


def raise_last_error() -> None:
    """Raise ``MXNetError`` with this thread's last MXNet error (after a nonzero status)."""
    mx.base.check_call(-1)


def device_of(ndarray: "mx.nd.NDArray") -> Tuple[int, int]:
    """``(device_typeid, device_id)`` of ``ndarray``'s context, without building an ``mx.Context``.

    ``ndarray.context`` costs ~2 us and a GIL release; this ~0.5 us.
    """
    b = buffers
    if get_context(ndarray.handle, b.dev_type_ref, b.dev_id_ref):
        raise_last_error()
    return b.dev_type.value, b.dev_id.value
