"""The command line of ``python -m parallel_exec.launch``: options, checks, the plan of processes.

Parses the options and the workers' command, decides which roles run on this
machine with which ``DMLC_*`` environment, and hands that plan to
``Job``. Free of MXNet: the scheduler and servers import it themselves.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import logging
import os
import socket
import sys
from typing import Dict, List, Optional, Sequence

from ._environment import role_environment
from ._restarts import MAX_RESTARTS_VARIABLE, RESTART_COUNT_VARIABLE, run_with_restarts
from ._supervisor import Job, Planned

LOGGER = logging.getLogger("parallel_exec.launch")

DEFAULT_PROGRESS_TIMEOUT = 600.0
DEFAULT_GRACE = 5.0
DEFAULT_RESTART_BACKOFF = 1.0
# The scheduler and servers: MXNet turns the process into its role on import.
_SERVER_COMMAND = [sys.executable, "-c", "import mxnet"]
# Put first on each worker's PYTHONPATH: its sitecustomize installs fail-fast
# and reports the ps-lite rank in every Python process of the worker.
_SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_site")
_EXAMPLE = "python -m parallel_exec.launch -n 2 -- python train.py --kvstore dist_sync"


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
        epilog="The workers run COMMAND, given after --. "
        "Example: python -m parallel_exec.launch -n 2 -- python examples/train_digits.py --kvstore dist_sync",
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
    add(
        "--max-restarts",
        type=int,
        default=0,
        metavar="K",
        help="when the job fails, stop it and start the whole job again, up to K times, on a fresh port; "
        f"the script finds the attempt (0, 1, ...) in ${RESTART_COUNT_VARIABLE} (default %(default)s)",
    )
    add(
        "--restart-backoff",
        type=float,
        default=DEFAULT_RESTART_BACKOFF,
        metavar="SECONDS",
        help="wait before the first restart, doubled for each later one (default %(default)g)",
    )
    add(
        "--no-fail-fast",
        dest="fail_fast",
        action="store_false",
        help="do not end a Python worker at its first uncaught exception in any thread (then a worker that "
        "raised may hang until --timeout)",
    )
    # argparse's usage line knows only the options; the command follows --.
    parser.usage = parser.format_usage().replace("usage: ", "", 1).rstrip() + " -- COMMAND [ARG ...]"
    return parser


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The launcher's options and, after ``--``, the workers' command; exit 2 if bad."""
    parser = _build_parser()
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, stray = parser.parse_known_args(argv[:split])  # first, so that --help works
    if stray:
        parser.error(
            f"unrecognized arguments: {' '.join(stray)}; did you forget `--` before the workers' command? "
            f"e.g. {_EXAMPLE}"
        )
    args.command = argv[split + 1 :]
    if not args.command:
        parser.error(f"missing the command to run: put it after --, e.g. {_EXAMPLE}")
    if args.num_workers < 1:
        parser.error(f"-n/--num-workers must be at least 1, got {args.num_workers}")
    if args.num_servers < 1:
        parser.error(f"-s/--num-servers must be at least 1 (ps-lite needs a server), got {args.num_servers}")
    if args.timeout < 0 or args.grace < 0 or args.restart_backoff < 0:
        parser.error("--timeout, --grace and --restart-backoff must not be negative")
    if args.max_restarts < 0:
        parser.error(f"--max-restarts must not be negative, got {args.max_restarts}")
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
    if args.max_restarts and not whole_job_here:
        # Launchers on other machines would restart their parts unaware of each other.
        parser.error("--max-restarts needs the whole job under this launcher (no --scheduler, --local-*)")


def _plan(args: argparse.Namespace, attempt: int = 0) -> List[Planned]:
    """(role, index, command, environment) of every process to start here, for attempt 0, 1, ..."""
    if args.scheduler is None:
        scheduler_host, scheduler_port = args.host, args.port or _free_port(args.host)
    else:
        scheduler_host, scheduler_port = args.scheduler
    base = dict(os.environ, PYTHONUNBUFFERED="1")  # children write to a pipe: no block buffering
    base.update({RESTART_COUNT_VARIABLE: str(attempt), MAX_RESTARTS_VARIABLE: str(args.max_restarts)})
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
        if role == "worker":
            env.update(_worker_site_environment(env, args.fail_fast))
        plan.append((role, index, list(args.command) if role == "worker" else list(_SERVER_COMMAND), env))
    LOGGER.info(
        "job: scheduler %s:%d, %d of %d servers and %d of %d workers here",
        scheduler_host, scheduler_port, args.local_servers, args.num_servers, args.local_workers, args.num_workers,
    )  # fmt: skip
    return plan


def _worker_site_environment(env: Dict[str, str], fail_fast: bool) -> Dict[str, str]:
    """The variables that make a Python worker run ``_site/sitecustomize.py`` first."""
    user_path = env.get("PYTHONPATH")
    return {
        # An empty entry would add the current directory: only append a real one.
        "PYTHONPATH": _SITE_DIR + (os.pathsep + user_path if user_path else ""),
        "PARALLEL_EXEC_FAIL_FAST": "1" if fail_fast else "0",
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m parallel_exec.launch`` and ``parallel-exec-launch``.

    Returns:
        The exit status (see ``parallel_exec.launch``).
    """
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[launcher] %(message)s")
    if isinstance(sys.stdout, io.TextIOWrapper):
        # Workers' output may hold characters this stdout cannot encode (a
        # progress bar's blocks under PYTHONIOENCODING=ascii): escape them.
        sys.stdout.reconfigure(errors="backslashreplace")
    return run_with_restarts(
        lambda attempt: Job(_plan(args, attempt), args.timeout, args.grace), args.max_restarts, args.restart_backoff
    )

