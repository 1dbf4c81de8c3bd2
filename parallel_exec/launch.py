"""Start a ps-lite job on this machine and supervise it.

    python -m parallel_exec.launch -n 2 -s 1 -- python train.py --kvstore dist_sync

starts one scheduler, the servers and the workers of an MXNet
distributed-kvstore job as child processes bound to 127.0.0.1 on a free
port, prints their output prefixed by role and index, and ends the job as a
whole. Workers run the command; the scheduler and servers run this Python
with ``-c "import mxnet"`` (MXNet turns the process into its role on import).

Guarantees:
- The first child that exits with a non-zero status, or that is killed,
  stops the job: ps-lite never notices a dead peer, so without this every
  other process would wait forever. So does a job whose workers print
  nothing for ``--timeout`` seconds, SIGINT/SIGTERM/SIGHUP to the launcher,
  and the launcher's own stdout failing (``| head -1``).
- Every Python process of a worker ends at its first uncaught exception, in
  any thread, after printing the traceback (``--no-fail-fast`` turns it off):
  ``dist/_site/sitecustomize.py``, first on the workers' ``PYTHONPATH``, does
  it and reports the worker's ps-lite rank, which then labels its output.
- The job is stopped by signalling each child's process group (each child
  gets its own session): SIGTERM, then SIGKILL after ``--grace`` seconds.
- No child outlives the launcher, even one killed by SIGKILL: on Linux each
  child gets SIGKILL from the kernel when the launcher dies (the launcher's
  own children: a worker command that forks the real program without
  ``exec`` leaves that one out).
- With ``--max-restarts K`` a job that failed (not one the launcher was
  signalled to stop) is stopped as above and started again, whole and on a
  fresh port, up to K times after a back-off that doubles
  (``--restart-backoff``); every child finds the attempt (0, 1, ...) in
  ``PE_RESTART_COUNT`` and K in ``PE_MAX_RESTARTS``, and the launcher says
  which attempt failed and why. Resuming is the script's part
  (``dist.Checkpointer``).
- Exit status: 0 when every worker started here exited 0 (in some attempt);
  else that of the last attempt: 1 when a child failed, the job stalled or
  the launcher's output closed, naming the child and how; 128 + N on signal N; 2 on bad arguments.
- Nothing binds to an address other than loopback unless ``--host`` or
  ``--scheduler`` says so.

Several machines: run the launcher on each, with ``--local-workers`` and
``--local-servers`` saying what runs there; the first one runs the scheduler
(``--host`` its address, ``--port`` fixed), the others join it with
``--scheduler HOST:PORT`` and ``--host`` their own address.
"""

from __future__ import annotations

import sys

from .dist._launcher import DEFAULT_GRACE, DEFAULT_PROGRESS_TIMEOUT, main

__all__ = ["DEFAULT_GRACE", "DEFAULT_PROGRESS_TIMEOUT", "main"]

if __name__ == "__main__":
    sys.exit(main())
