"""libc and raw system calls through ctypes: the plumbing every kernel module shares.

This package is the one place in laminae that speaks ctypes (docs/architecture.md). Python 3.11
lacks ``os.openat2``, ``os.unshare``, ``fcntl.FICLONE`` and the whole new mount API (``fsopen``
... ``mount_setattr``), and ``os.statvfs`` has no ``f_type``; the modules beside this one wrap
them with explicit ``argtypes``/``restype``, built with :func:`libc_function` and
:func:`syscall`.

Failures are raised as :class:`OSError` with the errno, its message and the path involved
(:func:`raise_oserror`); callers translate them at their boundary
(:func:`laminae._exceptions.map_os_errors`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
from collections.abc import Callable, Iterator
from typing import Any, Final, NoReturn

__all__ = [
    "AT_FDCWD",
    "MACHINE",
    "closing_fd",
    "encode",
    "libc",
    "libc_function",
    "raise_oserror",
    "syscall",
]

AT_FDCWD: Final = -100
"""The ``dirfd`` that makes an ``*at`` call resolve a relative path from the working dir."""

MACHINE: Final = platform.machine()

# The syscalls glibc 2.36 does not wrap everywhere (openat2 not at all). The new mount API and
# openat2 were added after the asm-generic unification (Linux 5.1+), so the numbers agree on
# both architectures; they are still keyed by machine so that a port is a deliberate act.
_SYSCALLS: Final[dict[str, dict[str, int]]] = {
    "x86_64": {
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "openat2": 437,
        "mount_setattr": 442,
    },
    "aarch64": {
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "openat2": 437,
        "mount_setattr": 442,
    },
}

libc = ctypes.CDLL(None, use_errno=True)


def raise_oserror(
    err: int, path: str | bytes | None = None, path2: str | None = None, detail: str = ""
) -> NoReturn:
    """Raise ``OSError(err)`` naming ``path`` (and ``path2``), with ``detail`` appended."""
    message = os.strerror(err)
    if detail:
        message = f"{message} ({detail})"
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if path2 is None:
        raise OSError(err, message, path)
    raise OSError(err, message, path, None, path2)


def libc_function(name: str, restype: Any, *argtypes: Any) -> Any:
    """The libc function ``name`` with its result and argument types declared."""
    function = getattr(libc, name)
    function.restype = restype
    function.argtypes = argtypes
    return function


def syscall(name: str, *argtypes: Any) -> Callable[..., int]:
    """Wrap raw ``syscall(2)`` for ``name`` with its own argument types.

    ``libc["syscall"]`` makes a fresh function pointer each time (attribute access would share
    one), so every syscall keeps its own ``argtypes``. The number is looked up at call time so
    that an unknown machine fails on use, with ENOSYS, and callers' fallbacks still apply.
    """
    function = libc["syscall"]
    function.restype = ctypes.c_long
    function.argtypes = (ctypes.c_long, *argtypes)
    number = _SYSCALLS.get(MACHINE, {}).get(name)

    def call(*args: Any) -> int:
        if number is None:
            raise OSError(
                errno.ENOSYS,
                f"laminae has no syscall numbers for {name!r} on machine {MACHINE!r} "
                f"(known: {', '.join(sorted(_SYSCALLS))})",
            )
        result: int = function(number, *args)
        return result

    return call


def encode(value: str | bytes | None) -> bytes | None:
    """``value`` as the bytes a C string argument takes; ``None`` stays ``NULL``."""
    return None if value is None else os.fsencode(value)


@contextlib.contextmanager
def closing_fd(fd: int) -> Iterator[int]:
    """Close ``fd`` when the block ends, however it ends."""
    try:
        yield fd
    finally:
        os.close(fd)
