"""The btrfs driver: layers as subvolumes, children as snapshots, quotas through qgroups.

Also the conformance suite's home for it: a loop-mounted btrfs made for each test.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from laminae.driverkit import (
    MNT_DETACH,
    DriverRegistry,
    DriverUnavailable,
    attach_loop,
    detach_loop,
    hookimpl,
    mount,
    umount,
)

from ._driver import BtrfsDriver

__all__ = ["BtrfsDriver", "laminae_conformance_home", "laminae_register_drivers", "loop_btrfs"]

# Sparse: only what a test writes takes disk. Room for the suite's largest test (a quota
# test writes 75 MiB) with btrfs's metadata duplicated beside it.
_IMAGE_SIZE: Final = 2 << 30


@hookimpl
def laminae_register_drivers(register: DriverRegistry) -> None:
    register(BtrfsDriver, priority=20)


@hookimpl
def laminae_conformance_home(
    driver_name: str, base: Path
) -> contextlib.AbstractContextManager[Path] | None:
    """For ``btrfs``: a fresh btrfs filesystem on a loop device under ``base``, and a home
    on it; ``None`` for other drivers."""
    if driver_name != BtrfsDriver.name:
        return None
    return loop_btrfs(base)


@contextlib.contextmanager
def loop_btrfs(base: Path) -> Iterator[Path]:
    """Make a btrfs filesystem in a sparse image under ``base``, mount it at ``base/mnt``
    through a loop device, and yield ``base/mnt/home``.

    On exit it is unmounted (lazily if something still holds it) and the loop device goes
    with it, also when the block failed: nothing survives.

    :raises DriverUnavailable: not root, or ``mkfs.btrfs`` (btrfs-progs) is missing.
    """
    if os.geteuid() != 0:
        raise DriverUnavailable("a loop-mounted btrfs needs root (loop devices, mount)")
    mkfs = shutil.which("mkfs.btrfs")
    if mkfs is None:
        raise DriverUnavailable("mkfs.btrfs is missing: install btrfs-progs")
    image = base / "btrfs.img"
    target = base / "mnt"
    target.mkdir(mode=0o700, exist_ok=True)
    with open(image, "wb") as file:
        file.truncate(_IMAGE_SIZE)
    made = subprocess.run([mkfs, "-q", "-f", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        raise DriverUnavailable(f"mkfs.btrfs {image} failed: {made.stderr.strip()}")
    device = attach_loop(str(image))
    try:
        mount(device, str(target), "btrfs")
    except BaseException:
        detach_loop(device)
        raise
    try:
        home = target / "home"
        home.mkdir(mode=0o700)
        yield home
    finally:
        try:
            umount(str(target))
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            # A process still holds a file in it: detach now, the kernel finishes (and
            # auto-clears the loop device) when the last user goes.
            umount(str(target), MNT_DETACH)
        detach_loop(device)
