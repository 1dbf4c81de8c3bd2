"""End a process at once on an uncaught exception in any thread.

A ps-lite process that raised would otherwise wait forever (at exit, or for
peers), and so would every other process of the job. Free of MXNet: the
launcher installs it into every Python worker before the user's script runs.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from typing import Any


def _print_and_exit(exc_type: type, exc_value: BaseException, exc_traceback: Any, where: str) -> None:
    sys.stderr.write(f"parallel_exec.dist: uncaught exception in {where}; ending this process so the job stops\n")
    traceback.print_exception(exc_type, exc_value, exc_traceback, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream must not keep the process alive
            pass
    os._exit(1)  # not sys.exit: a ps-lite worker hangs in its exit handlers


def install_fail_fast() -> None:
    """End the process at once on any uncaught exception, in any thread.

    Replaces ``sys.excepthook`` and ``threading.excepthook`` with hooks that
    print the traceback to stderr and call ``os._exit(1)``. A ps-lite
    process that raised would otherwise wait forever (at exit, or for
    peers), and so would every other process of the job. ``SystemExit`` in
    a thread stays silent, as with the default hook.
    """

    def excepthook(exc_type: type, exc_value: BaseException, exc_traceback: Any) -> None:
        _print_and_exit(exc_type, exc_value, exc_traceback, "the main thread")

    def thread_excepthook(args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "a thread"
        _print_and_exit(args.exc_type, args.exc_value, args.exc_traceback, f"thread {name}")

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
