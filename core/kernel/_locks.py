"""Locks between processes: the store lock, and claims on work in progress.

``flock`` throughout: the kernel drops a process's locks when it dies, which is what lets
the next process tell a live writer's incomplete layer from a crashed one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import final

__all__ = ["StoreLock", "claim", "is_claimed"]


@final
class StoreLock:
    """The store lock: ``flock`` on one file, re-entrant within a process.

    ``flock`` rather than POSIX ``fcntl`` record locks: record locks belong to the process
    and vanish when *any* descriptor of the file is closed (containers/storage keeps an extra
    in-process mutex for that reason); ``flock`` locks belong to the open file description.
    """

    __slots__ = ("_depth", "_fd", "_mutex")

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._mutex = threading.RLock()
        self._depth = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._mutex:
            if self._depth == 0:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


@contextlib.contextmanager
def claim(lock_path: Path) -> Iterator[None]:
    """Hold ``lock_path`` for the block: "this is mine and in progress" to other processes.

    Used for incomplete layers and temporary mounts. The kernel drops the ``flock`` when the
    holder dies, so :func:`is_claimed` tells a live writer's work from a crashed one's.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        os.close(fd)


def is_claimed(lock_path: Path) -> bool:
    """Whether a live process holds ``lock_path`` (see :func:`claim`)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
