"""Run a failed job again, from scratch, up to ``--max-restarts`` times.

The loop has the shape of torchrun's elastic agent
(torch/distributed/elastic/agent/server/api.py: ``_invoke_run`` restarts the
workers while restarts remain, and hands ``TORCHELASTIC_RESTART_COUNT`` to
them), with what ps-lite needs on top: the whole job restarts, scheduler and
servers included (a running ps-lite job cannot take a worker back), each
attempt on a fresh scheduler port (the old job's sockets may linger), after
a back-off that doubles. Resuming is the script's part: ``dist.Checkpointer``.
Free of MXNet.
"""

from __future__ import annotations

import logging
import queue
import signal
from typing import Callable

from ._supervisor import Job

LOGGER = logging.getLogger("parallel_exec.launch")

#: Environment variable with the attempt number (0 for the first), in every child.
RESTART_COUNT_VARIABLE = "PE_RESTART_COUNT"
#: Environment variable with ``--max-restarts``, in every child.
MAX_RESTARTS_VARIABLE = "PE_MAX_RESTARTS"
_MAX_BACKOFF = 30.0


def run_with_restarts(new_job: Callable[[int], Job], max_restarts: int, backoff: float) -> int:
    """Run ``new_job(attempt).run()`` until it succeeds, is interrupted, or ``max_restarts`` restarts are spent.

    Args:
        new_job: builds the job of attempt 0, 1, ... (a fresh plan each time).
        max_restarts: how many times a failed job starts again.
        backoff: seconds before the first restart; doubled for each later one.

    Returns:
        0 once an attempt succeeds; else the status of the last attempt, or
        128 + N when the launcher received signal N.
    """
    # Between attempts the signals land here (each Job handles them while it
    # runs, then puts these handlers back), so one that arrives after a
    # failure, before or during the back-off, stops the launcher cleanly.
    received: "queue.SimpleQueue[int]" = queue.SimpleQueue()
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.getsignal(signum) for signum in handled}
    for signum in handled:
        signal.signal(signum, lambda signum, frame: received.put(signum))  # put is reentrant
    try:
        return _run_attempts(new_job, max_restarts, backoff, received)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_attempts(
    new_job: Callable[[int], Job], max_restarts: int, backoff: float, received: "queue.SimpleQueue[int]"
) -> int:
    attempts = max_restarts + 1
    for attempt in range(attempts):
        job = new_job(attempt)
        status = job.run()
        if status == 0 or job.interrupted:  # a signal to the launcher means stop, not retry
            return status
        failed = f"attempt {attempt + 1} of {attempts} failed: {job.failure}"
        if attempt == max_restarts:
            if max_restarts:
                LOGGER.error("%s; no restarts left", failed)
            return status
        delay = min(backoff * 2**attempt, _MAX_BACKOFF)
        LOGGER.warning("%s; restarting the whole job in %g s", failed, delay)
        try:
            signum = received.get(timeout=delay)
        except queue.Empty:
            continue
        LOGGER.error("not restarting: the launcher received %s", signal.Signals(signum).name)
        return 128 + signum
    raise AssertionError("unreachable: the last attempt returns")
