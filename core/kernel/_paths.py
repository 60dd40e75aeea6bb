"""Path operations the ``os`` module cannot make safe: ``openat2`` and ``renameat2``.

``openat2`` (Linux 5.6+) resolves a path with ``RESOLVE_*`` restrictions, so that ``..`` and
symlinks in a layer or a container's root cannot lead out of it; the archive and bundle code
fall back to resolving by hand where :func:`openat2_available` says no. ``renameat2`` with
``RENAME_NOREPLACE`` publishes a directory without swallowing one that is already there.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from typing import Final

from laminae.kernel._syscalls import AT_FDCWD, libc_function, raise_oserror, syscall

__all__ = [
    "RESOLVE_BENEATH",
    "RESOLVE_IN_ROOT",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "RESOLVE_NO_XDEV",
    "openat2",
    "openat2_available",
    "rename_noreplace",
]

# include/uapi/linux/openat2.h
RESOLVE_NO_XDEV: Final = 0x01
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_NO_SYMLINKS: Final = 0x04
RESOLVE_BENEATH: Final = 0x08
RESOLVE_IN_ROOT: Final = 0x10

# include/uapi/linux/fs.h
_RENAME_NOREPLACE: Final = 0x1


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_sys_openat2 = syscall(
    "openat2", ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_OpenHow), ctypes.c_size_t
)
_renameat2 = libc_function(
    "renameat2",
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
)


def openat2(dirfd: int, path: str | bytes, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """``openat2(2)``: open ``path`` relative to ``dirfd`` with ``RESOLVE_*`` restrictions.

    ``O_CLOEXEC`` is always added, as :func:`os.open` does (PEP 446). ``mode`` is passed only
    with ``O_CREAT``/``O_TMPFILE``; the kernel refuses a mode without them.

    :returns: the new fd.
    :raises OSError: e.g. ``EXDEV`` when ``RESOLVE_BENEATH`` stops an escape, ``ELOOP`` for a
        symlink under ``RESOLVE_NO_SYMLINKS``, ``ENOSYS`` before Linux 5.6.
    """
    creating = flags & (os.O_CREAT | os.O_TMPFILE) != 0
    how = _OpenHow(flags | os.O_CLOEXEC, mode if creating else 0, resolve)
    raw = os.fsencode(path)
    # EAGAIN: a concurrent rename or mount raced the RESOLVE_IN_ROOT/BENEATH ".." check; the
    # kernel asks us to retry (openat2(2)).
    for _ in range(32):
        fd = _sys_openat2(dirfd, raw, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            break
    raise_oserror(err, raw)


@functools.cache
def openat2_available() -> bool:
    """Whether this kernel (and seccomp policy) lets us call ``openat2``. Cached."""
    try:
        fd = openat2(AT_FDCWD, "/", os.O_PATH | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            return False
        raise
    os.close(fd)
    return True


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (``renameat2(RENAME_NOREPLACE)``).

    Plain ``rename`` silently replaces an empty directory, which would swallow a layer.

    :raises OSError: ``EEXIST`` when ``dst`` exists; names both paths.
    """
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
        raise_oserror(ctypes.get_errno(), src, dst)
