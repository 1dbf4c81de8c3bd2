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
  nothing for ``--timeout`` seconds, and SIGINT/SIGTERM/SIGHUP to the launcher.
- The job is stopped by signalling each child's process group (each child
  gets its own session): SIGTERM, then SIGKILL after ``--grace`` seconds.
  No child outlives the launcher, unless the launcher itself is SIGKILLed.
- Exit status: 0 when every worker started here exited 0; 1 when a child
  failed or the job stalled, naming the child and how; 128 + N on signal N;
  2 on bad arguments.
- Nothing binds to an address other than loopback unless ``--host`` or
  ``--scheduler`` says so.

Several machines: run the launcher on each, with ``--local-workers`` and
``--local-servers`` saying what runs there; the first one runs the scheduler
(``--host`` its address, ``--port`` fixed), the others join it with
``--scheduler HOST:PORT`` and ``--host`` their own address.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .dist import role_environment

LOGGER = logging.getLogger("parallel_exec.launch")

DEFAULT_PROGRESS_TIMEOUT = 600.0
DEFAULT_GRACE = 5.0
# How long scheduler and servers get to exit on their own once every worker
# has finished (they exit when the job finalizes, within a second here).
_FINALIZE_WAIT = 30.0
# How long a child's exit waits for the rest of its output; bounded because
# a grandchild may hold the pipe open.
_OUTPUT_DRAIN_SECONDS = 5.0
_SERVER_COMMAND = [sys.executable, "-c", "import mxnet"]
_LINE_END = re.compile(rb"[\r\n]")  # \r too: progress bars redraw with it
# (role, index within the role here, command, environment) of one child.
_Planned = Tuple[str, int, List[str], Dict[str, str]]


class _Child:
    """One process of the job, with the threads that watch it."""

    def __init__(self, role: str, index: int, proc: "subprocess.Popen[bytes]") -> None:
        self.role = role
        self.label = "scheduler" if role == "scheduler" else f"{role} {index}"
        self.proc = proc
        self.exited = threading.Event()  # set once its exit and output are reported


def _read_output(child: _Child, events: "queue.SimpleQueue") -> None:
    """Post the child's output as ("output", child, lines) events until EOF."""
    stream = child.proc.stdout
    pending = b""
    while True:
        chunk = stream.read1(65536)
        if not chunk:
            break
        *lines, pending = _LINE_END.split(pending + chunk)
        # Posted even without a complete line: any output counts as progress.
        events.put(("output", child, [line.decode(errors="replace") for line in lines if line]))
    if pending:
        events.put(("output", child, [pending.decode(errors="replace")]))


def _wait_for_exit(child: _Child, reader: threading.Thread, events: "queue.SimpleQueue") -> None:
    """Post ("exit", child, returncode) after the child's last output."""
    returncode = child.proc.wait()
    reader.join(_OUTPUT_DRAIN_SECONDS)  # so a traceback is printed before the failure
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


def _signal_group(child: _Child, signum: int) -> None:
    """Signal the child's whole process group (its pid: it leads a session)."""
    if child.exited.is_set():
        return
    try:
        os.killpg(child.proc.pid, signum)
    except (ProcessLookupError, PermissionError):  # already gone
        pass


class _Job:
    """The children of one launch and the loop that supervises them.

    All events (output, exits, signals) arrive on one queue, consumed by the
    thread that calls ``run``; the reader and waiter threads only post.
    """

    def __init__(self, plan: Sequence[_Planned], progress_timeout: float, grace: float) -> None:
        self._plan = plan
        self._progress_timeout = progress_timeout
        self._grace = grace
        self._events: "queue.SimpleQueue" = queue.SimpleQueue()
        self._children: List[_Child] = []

    def run(self) -> int:
        """Start every child, supervise, stop the rest; return the exit status."""
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal closed
        previous = {signum: signal.getsignal(signum) for signum in handled}
        for signum in handled:
            # SimpleQueue.put is reentrant, so a handler may call it.
            signal.signal(signum, lambda signum, frame: self._events.put(("signal", None, signum)))
        try:
            failure, status = self._start()
            if failure is None:
                failure, status = self._supervise()
            if failure is None:
                self._stop(first_wait=_FINALIZE_WAIT)
                LOGGER.info("job finished: every worker exited 0")
            else:
                LOGGER.error("stopping the job: %s", failure)
                self._stop(first_wait=0.0)
                LOGGER.error("job failed: %s", failure)
            return status
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _start(self) -> Tuple[Optional[str], int]:
        for role, index, command, env in self._plan:
            try:
                proc = subprocess.Popen(
                    command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    # Its own process group: ended as a whole, spared the terminal's Ctrl-C.
                    start_new_session=True,
                )
            except OSError as exc:
                label = "scheduler" if role == "scheduler" else f"{role} {index}"
                return f"cannot start {label} ({' '.join(command)}): {exc}", 1
            child = _Child(role, index, proc)
            self._children.append(child)
            LOGGER.info("started %s (pid %d)", child.label, proc.pid)
            reader = _start_thread(_read_output, child, self._events, name=f"read[{child.label}]")
            _start_thread(_wait_for_exit, child, reader, self._events, name=f"wait[{child.label}]")
        return None, 0

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
                return f"the launcher received {signal.Signals(payload).name}", 128 + payload
            if kind == "output":
                self._print(child, payload)
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
            elif kind == "exit" and payload != 0:
                LOGGER.info("%s (pid %d) %s", child.label, child.proc.pid, _describe_exit(payload))
            # A second signal while stopping changes nothing: SIGKILL follows anyway.

    @staticmethod
    def _print(child: _Child, lines: List[str]) -> None:
        if lines:
            sys.stdout.write("".join(f"[{child.label}] {line}\n" for line in lines))
            sys.stdout.flush()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def _free_port(host: str) -> int:
    """A port that nothing listens on right now (the scheduler binds it next)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m parallel_exec.launch",
        description="Run a ps-lite (MXNet distributed kvstore) job: scheduler, servers and workers, "
        "supervised: the first failure stops every process.",
        epilog="example: python -m parallel_exec.launch -n 2 -- python examples/train_digits.py --kvstore dist_sync",
    )
    add = parser.add_argument
    add("-n", "--num-workers", type=int, required=True, help="worker processes in the whole job")
    add("-s", "--num-servers", type=int, default=1, help="server processes in the whole job (default 1)")
    add(
        "--timeout",
        type=float,
        default=DEFAULT_PROGRESS_TIMEOUT,
        help="stop the job when no worker printed anything for this many seconds; 0 disables (default %(default)g)",
    )
    add("--grace", type=float, default=DEFAULT_GRACE, help="seconds from SIGTERM to SIGKILL (default %(default)g)")
    add("--host", default="127.0.0.1", help="address of this machine that the job binds to (default %(default)s)")
    add("--port", type=int, default=0, help="scheduler port (default: a free one)")
    add("--scheduler", metavar="HOST:PORT", help="join the scheduler another launcher runs instead of starting one")
    add("--local-workers", type=int, help="workers to start on this machine (default: all)")
    add("--local-servers", type=int, help="servers to start on this machine (default: all)")
    add("--ipc", action="store_true", help="Unix sockets instead of TCP (DMLC_LOCAL=1); whole job on this machine only")
    return parser


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The launcher's options and, after ``--``, the workers' command; exit 2 if bad."""
    parser = _build_parser()
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])  # first, so that --help works
    args.command = argv[split + 1 :]
    if not args.command:
        parser.error("missing the command to run: put it after --, e.g. -- python train.py")
    if args.num_workers < 1:
        parser.error(f"-n/--num-workers must be at least 1, got {args.num_workers}")
    if args.num_servers < 1:
        parser.error(f"-s/--num-servers must be at least 1 (ps-lite needs a server), got {args.num_servers}")
    if args.timeout < 0 or args.grace < 0:
        parser.error("--timeout and --grace must not be negative")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    _check_placement(parser, args)
    return args


def _check_placement(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check and complete what runs on this machine and where the scheduler is."""
    args.local_workers = args.num_workers if args.local_workers is None else args.local_workers
    args.local_servers = args.num_servers if args.local_servers is None else args.local_servers
    if not 0 <= args.local_workers <= args.num_workers:
        parser.error(f"--local-workers must be in 0..{args.num_workers}, got {args.local_workers}")
    if not 0 <= args.local_servers <= args.num_servers:
        parser.error(f"--local-servers must be in 0..{args.num_servers}, got {args.local_servers}")
    if args.scheduler is not None:
        host, _, port = args.scheduler.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            parser.error(f"--scheduler must be HOST:PORT, got {args.scheduler!r}")
        args.scheduler = (host, int(port))
        if not _is_loopback(host) and _is_loopback(args.host):
            parser.error("joining a scheduler on another machine needs --host set to this machine's address")
        if args.local_workers + args.local_servers == 0:
            parser.error("nothing to start here: --local-workers and --local-servers are both 0")
    everything_here = (args.local_workers, args.local_servers) == (args.num_workers, args.num_servers)
    whole_job_here = args.scheduler is None and everything_here
    if args.ipc and not whole_job_here:
        parser.error("--ipc needs the whole job on this machine")


def _plan(args: argparse.Namespace) -> List[_Planned]:
    """(role, index, command, environment) of every process to start here."""
    if args.scheduler is None:
        scheduler_host, scheduler_port = args.host, args.port or _free_port(args.host)
    else:
        scheduler_host, scheduler_port = args.scheduler
    base = dict(os.environ, PYTHONUNBUFFERED="1")  # children write to a pipe: no block buffering
    roles = [("server", i) for i in range(args.local_servers)] + [("worker", i) for i in range(args.local_workers)]
    if args.scheduler is None:
        roles.insert(0, ("scheduler", 0))
    plan = []
    for role, index in roles:
        env = dict(base)
        env.update(role_environment(
            role, num_workers=args.num_workers, num_servers=args.num_servers, scheduler_host=scheduler_host,
            scheduler_port=scheduler_port, node_host=args.host, unix_sockets=args.ipc,
        ))  # fmt: skip
        plan.append((role, index, list(args.command) if role == "worker" else list(_SERVER_COMMAND), env))
    LOGGER.info(
        "job: scheduler %s:%d, %d of %d servers and %d of %d workers here",
        scheduler_host, scheduler_port, args.local_servers, args.num_servers, args.local_workers, args.num_workers,
    )  # fmt: skip
    return plan


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m parallel_exec.launch`` and ``parallel-exec-launch``.

    Returns:
        The exit status (see the module docstring).
    """
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[launcher] %(message)s")
    return _Job(_plan(args), args.timeout, args.grace).run()


if __name__ == "__main__":
    sys.exit(main())
