"""Per-thread state a task carries: the worker's context and autograd flags.

MXNet keeps the default context (``Context._default_ctx``, a
``threading.local``) and the autograd recording/training flags (C++
``thread_local``) per thread, so a worker thread starts with none of the
caller's. This module moves them across: ``capture_autograd`` in the
submitting thread, ``autograd_applied`` around the task in the worker.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, NamedTuple, Optional

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


class AutogradState(NamedTuple):
    """The two per-thread autograd flags of ``mx.autograd``."""

    recording: bool
    training: bool


def capture_autograd() -> AutogradState:
    """Read the calling thread's autograd flags (called by ``submit``)."""
    return AutogradState(mx.autograd.is_recording(), mx.autograd.is_training())


@contextlib.contextmanager
def autograd_applied(state: AutogradState) -> Iterator[None]:
    """Put ``state`` in force in this thread, then restore what was there.

    The setters return the previous value, so the restore is exact even if the
    task changes the flags itself and does not undo that.
    """
    prev_recording = mx.autograd.set_recording(state.recording)
    prev_training = mx.autograd.set_training(state.training)
    try:
        yield
    finally:
        mx.autograd.set_recording(prev_recording)
        mx.autograd.set_training(prev_training)
