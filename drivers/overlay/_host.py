"""What the running kernel and process offer overlay: ``lowerdir+``, a user namespace, a page.

Each fact is read once per process: the driver's capabilities are a class attribute, so they
are decided when the class is defined, from these facts.
"""

from __future__ import annotations

import errno
import functools
import os
import re
from typing import Final

from laminae.driverkit import FSCONFIG_SET_STRING, fsconfig, fsopen

__all__ = [
    "KERNEL_MAX_LOWERS",
    "PAGE_SIZE",
    "in_user_namespace",
    "kernel_release",
    "lowerdir_append_supported",
]

KERNEL_MAX_LOWERS: Final = 500
"""overlayfs's ``OVL_MAX_STACK``: lower layers in one mount, the upper not counted."""

PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
"""``mount(2)`` copies at most one page of option data, its NUL included."""

# The initial user namespace maps every id onto itself: "0 0 4294967295" (user_namespaces(7)).
_INITIAL_MAP: Final = ("0", "0", "4294967295")


@functools.cache
def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the initial one.

    There, overlayfs must be mounted with ``userxattr``: ``trusted.*`` needs
    ``CAP_SYS_ADMIN`` in the initial namespace, so whiteout and opaque flags live in
    ``user.overlay.*``, and device nodes other than whiteouts cannot be made.
    """
    try:
        with open("/proc/self/uid_map") as file:
            lines = file.read().split("\n")
    except FileNotFoundError:  # no /proc: assume the plain case
        return False
    return [tuple(line.split()) for line in lines if line.strip()] != [_INITIAL_MAP]


def kernel_release() -> tuple[int, int]:
    """``(major, minor)`` of the running kernel, from ``uname -r``."""
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if match is None:
        return (0, 0)
    return int(match.group(1)), int(match.group(2))


@functools.cache
def lowerdir_append_supported() -> bool:
    """Whether overlayfs takes ``lowerdir+`` (Linux 6.8+), which lifts the page limit.

    Asked of the kernel when this process may open an overlay context: ``fsconfig`` of one
    ``lowerdir+`` answers EINVAL ("Unknown parameter") where it is missing. Nothing is
    mounted. Without the privilege to ask (EPERM), the kernel release decides.
    """
    try:
        fs_fd = fsopen("overlay")
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.ENODEV):
            return False
        return kernel_release() >= (6, 8)
    try:
        fsconfig(fs_fd, FSCONFIG_SET_STRING, "lowerdir+", "/")
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        return kernel_release() >= (6, 8)
    finally:
        os.close(fs_fd)
    return True
