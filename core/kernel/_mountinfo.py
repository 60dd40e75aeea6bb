"""The mount table as the kernel shows it: ``/proc/<pid>/mountinfo``, parsed.

What is mounted where, read back rather than remembered: the store finds its mounts again here
after a crash, and a driver finds the filesystem a path lives on.
"""

from __future__ import annotations

import os
import re
from typing import Final

import attrs

__all__ = ["MountInfo", "is_mountpoint", "mount_points", "mountinfo", "parse_mountinfo"]


@attrs.frozen
class MountInfo:
    """One line of ``/proc/<pid>/mountinfo`` (proc(5)), with octal escapes decoded.

    :param mount_id: unique id of the mount.
    :param parent_id: id of the parent mount.
    :param root: the path inside the filesystem that is mounted (``/`` unless a bind).
    :param mount_point: where it is mounted, relative to the process's root.
    :param options: per-mount options (``rw,nosuid,relatime``).
    :param fs_type: ``ext4``, ``overlay``, ``btrfs`` ...
    :param source: the device or the name given at mount time.
    :param super_options: per-superblock options (``lowerdir=...``).
    """

    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    options: str
    fs_type: str
    source: str
    super_options: str


_OCTAL_ESCAPE: Final = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo (fs/proc_namespace.c);
    # decoding bytes first keeps names that are not UTF-8 intact via surrogateescape.
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_mountinfo(text: bytes) -> list[MountInfo]:
    """Parse the bytes of a ``mountinfo`` file."""
    result = []
    for line in text.splitlines():
        if not line:
            continue
        fields = line.split(b" ")
        try:
            separator = fields.index(b"-", 6)
            result.append(
                MountInfo(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    options=_unescape(fields[5]),
                    fs_type=_unescape(fields[separator + 1]),
                    source=_unescape(fields[separator + 2]),
                    super_options=_unescape(b" ".join(fields[separator + 3 :])),
                )
            )
        except (ValueError, IndexError) as exc:
            raise ValueError(f"malformed mountinfo line: {line!r}") from exc
    return result


def mountinfo(pid: int | str = "self") -> list[MountInfo]:
    """The mounts visible to process ``pid``, in the kernel's order (parents first)."""
    with open(f"/proc/{pid}/mountinfo", "rb") as file:
        return parse_mountinfo(file.read())


def mount_points(pid: int | str = "self") -> set[str]:
    """The mount points visible to process ``pid``."""
    return {entry.mount_point for entry in mountinfo(pid)}


def is_mountpoint(path: str) -> bool:
    """Whether ``path`` (symlinks resolved) is a mount point; bind mounts of one filesystem
    onto itself count, unlike :func:`os.path.ismount`."""
    return os.path.realpath(path) in mount_points()
