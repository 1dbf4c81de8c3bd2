"""Children that never outlive the launcher, even a launcher killed by SIGKILL.

The supervisor ends its children itself whenever it runs (a failure, a stall,
SIGINT, SIGTERM). It cannot when it is killed outright (SIGKILL from the OOM
killer or a cluster scheduler): ps-lite's scheduler, servers and workers would
then wait forever for each other, holding their ports and devices. So each
child asks the kernel, between fork and exec, to send it SIGKILL when the
launcher dies (Linux ``prctl(PR_SET_PDEATHSIG)``, kept across exec), the same
for every role.

Guarantees / assumptions:
- Linux only; elsewhere ``parent_death_hook`` returns None and a SIGKILLed
  launcher leaves its children running.
- The kernel's "parent" is the thread that forked: start children from a
  thread that lives as long as the launcher (the supervisor uses the main
  thread).
- The race: the launcher may die after fork and before prctl, when no signal
  will come any more. The child then finds another parent (a reaper) and
  kills itself.
- Only the launcher's own children: a worker command that starts the real
  program as its child (a shell script without ``exec``) leaves that one out.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Callable, Optional

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def parent_death_hook() -> Optional[Callable[[], None]]:
    """A ``Popen(preexec_fn=...)`` that makes the child die with this process; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no C library to ask
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    launcher = os.getpid()
    kill = int(signal.SIGKILL)

    def die_with_launcher() -> None:
        # Runs in the child between fork and exec, where another thread's
        # lock may be held forever: so no imports, no logging, no locks;
        # prctl was looked up before the fork.
        if prctl(_PR_SET_PDEATHSIG, kill, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != launcher:  # the launcher died before prctl: no signal will come
            os.kill(os.getpid(), kill)

    return die_with_launcher
