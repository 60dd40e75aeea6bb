"""Which filesystem a path is on (``statfs`` and magic numbers), and flushing one (``syncfs``).

Drivers ask :func:`statfs_type` whether their home is on a filesystem they can use (btrfs
needs btrfs, overlay refuses overlayfs and NFS); the store names the filesystem in its info.
``os.statvfs`` has no ``f_type``, hence the ctypes call.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

from laminae.kernel._syscalls import libc_function, raise_oserror

__all__ = [
    "BTRFS_SUPER_MAGIC",
    "EXT4_SUPER_MAGIC",
    "NFS_SUPER_MAGIC",
    "OVERLAYFS_SUPER_MAGIC",
    "TMPFS_MAGIC",
    "statfs_type",
    "syncfs",
]

# include/uapi/linux/magic.h
OVERLAYFS_SUPER_MAGIC: Final = 0x794C7630
BTRFS_SUPER_MAGIC: Final = 0x9123683E
TMPFS_MAGIC: Final = 0x01021994
EXT4_SUPER_MAGIC: Final = 0xEF53
"""ext2, ext3 and ext4 share it; it is also the ``s_magic`` of their on-disk superblock."""
NFS_SUPER_MAGIC: Final = 0x6969

# struct statfs is 120 bytes on 64-bit Linux with f_type (a long) first; a larger buffer costs
# nothing and keeps us clear of the kernel writing past a short one.
_STATFS_SIZE: Final = 256

_statfs = libc_function("statfs", ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_syncfs = libc_function("syncfs", ctypes.c_int, ctypes.c_int)


def statfs_type(path: str) -> int:
    """The filesystem magic of ``path`` (``f_type``), e.g. :data:`BTRFS_SUPER_MAGIC`.

    :raises OSError: naming ``path``, e.g. ``ENOENT``.
    """
    buffer = ctypes.create_string_buffer(_STATFS_SIZE)
    if _statfs(os.fsencode(path), buffer) != 0:
        raise_oserror(ctypes.get_errno(), path)
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def syncfs(fd: int) -> None:
    """Flush the filesystem holding ``fd`` to disk: ``syncfs(2)``."""
    if _syncfs(fd) != 0:
        raise_oserror(ctypes.get_errno())
