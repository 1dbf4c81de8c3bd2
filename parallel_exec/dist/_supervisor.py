"""Start the processes of a ps-lite job and end them together.

``Job`` starts each planned child in its own session, streams its output
prefixed by its label, and stops every child (SIGTERM to its process group,
then SIGKILL) on the first failure, a stall, a signal, or once every worker
has finished. Free of MXNet.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

from ._parent_death import parent_death_hook

LOGGER = logging.getLogger("parallel_exec.launch")

# How long scheduler and servers get to exit on their own once every worker
# has finished (they exit when the job finalizes, within a second here).
_FINALIZE_WAIT = 30.0
# How long a child's exit waits for the rest of its output; bounded because
# a grandchild may hold the pipe open.
_OUTPUT_DRAIN_SECONDS = 5.0
# A line redrawn in place (a progress bar, with \r) is printed in its last
# state when it ends, and meanwhile at most once per this many seconds.
REDRAW_INTERVAL = 10.0
# (role, index within the role here, command, environment) of one child.
Planned = Tuple[str, int, List[str], Dict[str, str]]


class _Child:
    """One process of the job, with the threads that watch it."""

    def __init__(self, role: str, index: int, proc: "subprocess.Popen[bytes]") -> None:
        self.role = role
        self.index = index
        self.proc = proc
        self.rank: Optional[int] = None  # a worker's ps-lite rank, once it reported it
        self.exited = threading.Event()  # set once its exit and output are reported

    @property
    def label(self) -> str:
        if self.role == "scheduler":
            return "scheduler"
        rank = "" if self.rank is None else f", rank {self.rank}"
        return f"{self.role} {self.index}{rank}"


def _last_drawn(line: bytes) -> bytes:
    """What a terminal shows of a line redrawn with carriage returns."""
    drawn = [part for part in line.split(b"\r") if part]
    return drawn[-1] if drawn else b""


def _read_output(child: _Child, events: "queue.SimpleQueue", redraw_interval: float = REDRAW_INTERVAL) -> None:
    """Post the child's output as ("output", child, lines) events until EOF.

    A line redrawn with ``\r`` is posted once, in its last state; while it is
    being redrawn, its current state at most every ``redraw_interval`` s.
    """
    stream = cast(io.BufferedReader, child.proc.stdout)  # Popen(stdout=PIPE): buffered binary
    pending = b""
    shown_at = time.monotonic()
    while True:
        chunk = stream.read1(65536)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        pending = _last_drawn(pending)
        shown = [_last_drawn(line) for line in lines]
        if pending and not lines and time.monotonic() - shown_at >= redraw_interval:
            shown.append(pending)  # a progress bar: a snapshot now and then
        if shown:
            shown_at = time.monotonic()
        # Posted even without a line to show: any output counts as progress.
        events.put(("output", child, [line.decode(errors="replace") for line in shown if line]))
    if pending:
        events.put(("output", child, [pending.decode(errors="replace")]))


def _read_reports(child: _Child, fd: int, events: "queue.SimpleQueue") -> None:
    """Post ("rank", child, rank) when the worker's start-up hook reports it (see ``_site``)."""
    with open(fd, "rb") as reports:
        for line in reports:
            words = line.split()
            if len(words) == 2 and words[0] == b"rank" and words[1].isdigit():
                events.put(("rank", child, int(words[1])))


def _wait_for_exit(child: _Child, readers: Sequence[threading.Thread], events: "queue.SimpleQueue") -> None:
    """Post ("exit", child, returncode) after the child's last output and report."""
    returncode = child.proc.wait()
    deadline = time.monotonic() + _OUTPUT_DRAIN_SECONDS
    for reader in readers:  # so a traceback is printed, and the rank known, before the failure
        reader.join(max(0.0, deadline - time.monotonic()))
    child.exited.set()
    events.put(("exit", child, returncode))


def _start_thread(target: Callable[..., None], *args: Any, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _discard_stdout() -> None:
    """Point fd 1 at /dev/null, so that later writes and the exit flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout has no descriptor: nothing to flush at exit
        pass


def _signal_group(child: _Child, signum: int) -> None:
    """Signal the child's whole process group (its pid: it leads a session)."""
    if child.exited.is_set():
        return
    try:
        os.killpg(child.proc.pid, signum)
    except (ProcessLookupError, PermissionError):  # already gone
        pass


class Job:
    """The children of one launch and the loop that supervises them.

    All events (output, exits, signals) arrive on one queue, consumed by the
    thread that calls ``run``; the reader and waiter threads only post.
    """

    def __init__(self, plan: Sequence[Planned], progress_timeout: float, grace: float) -> None:
        self._plan = plan
        self._progress_timeout = progress_timeout
        self._grace = grace
        self._events: "queue.SimpleQueue" = queue.SimpleQueue()
        self._children: List[_Child] = []
        #: Why the job failed, once ``run`` returned non-zero.
        self.failure: Optional[str] = None
        #: Whether it stopped because the launcher received a signal.
        self.interrupted = False
        self._output_error: Optional[str] = None  # why printing to stdout failed

    def run(self) -> int:
        """Start every child, supervise, stop the rest; return the exit status."""
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal closed
        previous = {signum: signal.getsignal(signum) for signum in handled}
        for signum in handled:
            # SimpleQueue.put is reentrant, so a handler may call it.
            signal.signal(signum, lambda signum, frame: self._events.put(("signal", None, signum)))
        try:
            try:
                failure, status = self._start()
                if failure is None:
                    failure, status = self._supervise()
            except BaseException:  # a bug here must not orphan the job
                LOGGER.exception("the launcher failed; stopping the job")
                self._stop(first_wait=0.0)
                raise
            self.failure = failure
            if failure is None:
                self._finish()
            else:
                LOGGER.error("stopping the job: %s", failure)
                self._stop(first_wait=0.0)
                LOGGER.error("job failed: %s", failure)
            return status
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _start(self) -> Tuple[Optional[str], int]:
        # Called from run(), so from the main thread, which lives as long as
        # the launcher: the kernel's parent for the parent-death signal.
        die_with_launcher = parent_death_hook()
        for role, index, command, env in self._plan:
            try:
                child = self._spawn(role, index, command, env, die_with_launcher)
            except (OSError, subprocess.SubprocessError) as exc:
                label = "scheduler" if role == "scheduler" else f"{role} {index}"
                return f"cannot start {label} ({' '.join(command)}): {exc}", 1
            self._children.append(child)
            LOGGER.info("started %s (pid %d)", child.label, child.proc.pid)
        return None, 0

    def _spawn(
        self, role: str, index: int, command: List[str], env: Dict[str, str], preexec: Optional[Callable[[], None]]
    ) -> _Child:
        """Start one child and the threads that watch it."""
        # A worker's start-up hook reports its ps-lite rank on this pipe.
        report_read, report_write = os.pipe() if role == "worker" else (-1, -1)
        if role == "worker":
            env = dict(env, PARALLEL_EXEC_REPORT_FD=str(report_write))
        try:
            proc = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # Its own process group: ended as a whole, spared the terminal's Ctrl-C.
                start_new_session=True,
                preexec_fn=preexec,  # even a SIGKILLed launcher takes its children along
                pass_fds=(report_write,) if role == "worker" else (),
            )
        except (OSError, subprocess.SubprocessError):
            if role == "worker":
                os.close(report_read)
            raise
        finally:
            if role == "worker":
                os.close(report_write)  # the child has its copy
        child = _Child(role, index, proc)
        name = child.label
        readers = [_start_thread(_read_output, child, self._events, name=f"read[{name}]")]
        if role == "worker":
            readers.append(_start_thread(_read_reports, child, report_read, self._events, name=f"reports[{name}]"))
        _start_thread(_wait_for_exit, child, readers, self._events, name=f"wait[{name}]")
        return child

    def _supervise(self) -> Tuple[Optional[str], int]:
        """Wait until every worker finished (None) or the job must stop (why)."""
        waiting_for = {c for c in self._children if c.role == "worker"} or set(self._children)
        timeout = self._progress_timeout if any(c.role == "worker" for c in self._children) else 0
        deadline = time.monotonic() + timeout if timeout else None
        while waiting_for:
            try:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                kind, child, payload = self._events.get(timeout=wait)
            except queue.Empty:
                stalled = f"no output from any worker for {timeout:g} s; the job looks stalled (raise --timeout if it is slow)"
                return stalled, 1
            if kind == "signal":
                self.interrupted = True
                return f"the launcher received {signal.Signals(payload).name}", 128 + payload
            if kind == "rank":
                LOGGER.info("%s (pid %d) joined the kvstore as rank %d", child.label, child.proc.pid, payload)
                child.rank = payload
            elif kind == "output":
                if not self._print(child, payload):
                    self.interrupted = True  # nobody reads the output: a restart would not help
                    return f"the launcher's output is closed ({self._output_error})", 1
                if deadline is not None and child.role == "worker":
                    deadline = time.monotonic() + timeout
            elif payload != 0:
                return f"{child.label} (pid {child.proc.pid}) {_describe_exit(payload)}", 1
            else:
                LOGGER.info("%s (pid %d) finished", child.label, child.proc.pid)
                waiting_for.discard(child)
        return None, 0

    def _stop(self, first_wait: float) -> None:
        """End every child still running: wait, SIGTERM, wait, SIGKILL."""
        self._wait_for_children(first_wait)
        for signum, wait in ((signal.SIGTERM, self._grace), (signal.SIGKILL, _OUTPUT_DRAIN_SECONDS + 5.0)):
            running = [c for c in self._children if not c.exited.is_set()]
            if not running:
                return
            names = ", ".join(f"{c.label} (pid {c.proc.pid})" for c in running)
            LOGGER.info("sending %s to %s", signal.Signals(signum).name, names)
            for child in running:
                _signal_group(child, signum)
            self._wait_for_children(wait)
        for child in self._children:
            if not child.exited.is_set():
                LOGGER.critical("%s (pid %d) is still running after SIGKILL", child.label, child.proc.pid)

    def _finish(self) -> None:
        """End a job whose workers all exited 0."""
        workers = [c for c in self._children if c.role == "worker"]
        joined = not workers or any(c.rank is not None for c in workers)
        # Without a worker that joined, scheduler and servers wait for one forever.
        self._stop(first_wait=_FINALIZE_WAIT if joined else 0.0)
        LOGGER.info("job finished: every worker exited 0")
        if not joined:
            LOGGER.warning(
                "no worker joined a distributed kvstore, so each trained on its own: did the script get "
                "a distributed kvstore type (e.g. --kvstore dist_sync)?"
            )

    def _wait_for_children(self, seconds: float) -> None:
        """Print output until every child has exited or ``seconds`` passed."""
        deadline = time.monotonic() + seconds
        while not all(c.exited.is_set() for c in self._children):
            try:
                kind, child, payload = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if kind == "output":
                self._print(child, payload)
            elif kind == "rank":
                child.rank = payload
            elif kind == "exit" and payload != 0:
                LOGGER.info("%s (pid %d) %s", child.label, child.proc.pid, _describe_exit(payload))
            # A second signal while stopping changes nothing: SIGKILL follows anyway.

    def _print(self, child: _Child, lines: List[str]) -> bool:
        """Print a child's lines, prefixed; False once the launcher's stdout failed."""
        if self._output_error is not None:
            return False
        if not lines:
            return True
        try:
            sys.stdout.write("".join(f"[{child.label}] {line}\n" for line in lines))
            sys.stdout.flush()
        except (OSError, ValueError) as exc:  # e.g. `| head -1` exited: BrokenPipeError
            self._output_error = type(exc).__name__
            _discard_stdout()
            return False
        return True
