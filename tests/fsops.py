"""Filesystem steps the btrfs tests share: flushing, and writing whole MiBs durably."""

from __future__ import annotations

import os
from pathlib import Path

from laminae.kernel import _filesystems


def sync_fs(path: Path) -> None:
    """``syncfs`` the filesystem holding directory ``path`` (btrfs counts qgroups at commit)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _filesystems.syncfs(fd)
    finally:
        os.close(fd)


def write_mib(path: Path, count: int) -> None:
    """Write ``count`` MiB to ``path``, each flushed to disk (so a quota sees it at once)."""
    chunk = b"\x5a" * (1 << 20)
    with open(path, "wb") as file:
        for _ in range(count):
            file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
