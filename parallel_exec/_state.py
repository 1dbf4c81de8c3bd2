"""Per-thread state a task carries: the worker's context and autograd flags.

MXNet keeps the default context (``Context._default_ctx``, a
``threading.local``) and the autograd recording/training flags (C++
``thread_local``) per thread, so a worker thread starts with none of the
caller's. This module moves them across: ``capture_autograd`` in the
submitting thread, ``apply_autograd`` and ``restore_autograd`` around the
task in the worker. Each flag read or set is a call into MXNet's C library,
the largest per-task cost of a worker, so a worker sets only what differs
from its own flags.
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Optional

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


def apply_autograd(state: AutogradState, own: AutogradState) -> None:
    """Put the submitter's ``state`` in force in a worker whose flags are ``own``."""
    if state.recording != own.recording:
        mx.autograd.set_recording(state.recording)
    if state.training != own.training:
        mx.autograd.set_training(state.training)


def restore_autograd(own: AutogradState) -> None:
    """Put the worker's ``own`` flags back, whatever the task left in force."""
    mx.autograd.set_recording(own.recording)
    mx.autograd.set_training(own.training)
