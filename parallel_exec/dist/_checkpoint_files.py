"""Checkpoint files: written atomically, checked when read.

A file is a header (magic, payload length, SHA-256 of the payload) and a
pickle. It is written to a temporary name in the same directory, flushed to
disk and renamed over its final name, so a reader sees all of it or nothing;
``read`` raises ``ValueError`` for a file that is truncated or damaged
anyway (a disk error, a copy cut short). Free of MXNet.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
import time
from pathlib import Path
from typing import Any, List, Tuple

_MAGIC = b"parallel_exec checkpoint 1\n"
_HEADER = len(_MAGIC) + 8 + 32  # magic, payload length, SHA-256 of the payload
_MAIN_NAME = re.compile(r"checkpoint-(\d{10})\.pe")
_TEMP_PREFIX = ".tmp-checkpoint-"
# How long a worker waits to see the file rank 0 wrote (after a barrier, so
# only a shared filesystem's delay is waited for).
_VISIBLE_TIMEOUT = 60.0


def rank_path(path: Path, rank: int) -> Path:
    """The file of a worker's own random state, beside the checkpoint ``path``."""
    return path.with_name(f"{path.stem}.rank{rank}.pe")


def main_checkpoints(directory: Path) -> List[Tuple[int, Path]]:
    """(step, path) of every checkpoint file, newest first (complete or not)."""
    found = []
    for path in directory.iterdir():
        match = _MAIN_NAME.fullmatch(path.name)
        if match:
            found.append((int(match[1]), path))
    return sorted(found, reverse=True)


def write_atomically(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` so that readers see all of it or nothing."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    header = _MAGIC + len(payload).to_bytes(8, "big") + hashlib.sha256(payload).digest()
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(header)
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the name points to it
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)  # the rename itself survives a crash


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read(path: Path) -> Any:
    """The object in a checkpoint file; ValueError if the file is damaged."""
    data = path.read_bytes()
    if len(data) < _HEADER or not data.startswith(_MAGIC):
        raise ValueError(f"not a complete checkpoint file ({len(data)} bytes, header missing)")
    length = int.from_bytes(data[len(_MAGIC) : len(_MAGIC) + 8], "big")
    digest, payload = data[len(_MAGIC) + 8 : _HEADER], data[_HEADER:]
    if len(payload) != length:
        raise ValueError(f"truncated: {len(payload)} of {length} bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("damaged: its checksum does not match")
    return pickle.loads(payload)


def remove_temporary_files(directory: Path) -> None:
    """Delete what a writer killed mid-write left.

    Called by rank 0 in ``restore``, while no worker writes: they write only
    in ``save``, and ``restore`` ends with a barrier.
    """
    for leftover in directory.glob(_TEMP_PREFIX + "*"):
        try:
            leftover.unlink()
        except FileNotFoundError:
            pass


class scratch_file:
    """A private temporary file name, removed afterwards (Trainer reads and writes by name).

    Not in the checkpoint directory: rank 0's start-up clean-up of that
    directory would race with another worker's scratch file.
    """

    def __init__(self) -> None:
        fd, self._name = tempfile.mkstemp(prefix="parallel_exec-trainer-states-")
        os.close(fd)

    def __enter__(self) -> str:
        return self._name

    def __exit__(self, *exc_info: Any) -> None:
        try:
            os.unlink(self._name)
        except FileNotFoundError:
            pass


def wait_until_visible(path: Path) -> None:
    """Wait for rank 0's file after the barrier; only a shared filesystem can delay it."""
    deadline = time.monotonic() + _VISIBLE_TIMEOUT
    delay = 0.01
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rank 0 saved {path}, but this worker cannot see it after {_VISIBLE_TIMEOUT:g} s: "
                "every worker needs the same checkpoint directory (shared storage on several machines)"
            )
        time.sleep(delay)  # no event tells when a remote write becomes visible
        delay = min(delay * 2, 1.0)
