"""The one executor that turns :class:`MountSpec` descriptions into mounts, and undoes them.

Drivers describe; this module mounts. Keeping every mount in one place is what lets the store
count them, find them again in ``/proc/self/mountinfo`` after a crash, and unmount them.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from laminae._exceptions import InvalidArgument, map_os_errors
from laminae.driverkit._contract import MountSpec
from laminae.kernel._loop import attach_loop, detach_loop
from laminae.kernel._mountinfo import mount_points
from laminae.kernel._mounts import (
    MNT_DETACH,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    bind_mount,
    mount,
    mount_overlay,
    umount,
)

__all__ = ["mount_all", "mounted", "unmount_all"]

_FLAGS = {
    "ro": MS_RDONLY,
    "rw": 0,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
}


def _split_options(options: Sequence[str]) -> tuple[int, list[str]]:
    flags = 0
    data = []
    for option in options:
        if option in _FLAGS:
            flags |= _FLAGS[option]
        elif option not in ("bind", "rbind", "loop"):
            data.append(option)
    return flags, data


def _mount_one(spec: MountSpec, target: Path) -> None:
    where = target / spec.target.lstrip("/") if spec.target else target
    if spec.type == "bind":
        bind_mount(
            spec.source, str(where), readonly=spec.readonly, recursive="rbind" in spec.options
        )
    elif spec.type == "overlay":
        if not spec.lowerdirs:
            raise InvalidArgument(f"overlay mount spec for {where}: no lowerdirs")
        # mount_overlay takes ro, nosuid, nodev and noexec itself (as mount attributes), so
        # they go through as they are; only the bind markers mean nothing to overlayfs.
        data = [o for o in spec.options if o not in ("rw", "bind", "rbind", "loop")]
        if spec.readonly and "ro" not in data:
            data.append("ro")
        mount_overlay(
            str(where), spec.lowerdirs, upperdir=spec.upperdir, workdir=spec.workdir, options=data
        )
    elif "loop" in spec.options:
        flags, data = _split_options(spec.options)
        device = attach_loop(spec.source, readonly=bool(flags & MS_RDONLY))
        try:
            mount(device, str(where), spec.type, flags, ",".join(data) or None)
        except BaseException:
            # The loop device is autoclear, but only once something has mounted it.
            detach_loop(device)
            raise
    else:
        flags, data = _split_options(spec.options)
        mount(spec.source, str(where), spec.type, flags, ",".join(data) or None)


def mount_all(specs: Sequence[MountSpec], target: Path) -> None:
    """Perform ``specs`` at ``target`` in order; on failure, undo what was mounted.

    :raises InvalidArgument: an empty or malformed spec list.
    :raises LaminaeError: the kernel refused a mount (the message carries its reason).
    """
    if not specs:
        raise InvalidArgument(f"no mounts to perform at {target}")
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    done = 0
    try:
        for spec in specs:
            with map_os_errors(f"mount {spec.type} {spec.source} at {target}"):
                _mount_one(spec, target)
            done += 1
    except BaseException:
        if done:
            unmount_all(target)
        raise


def unmount_all(target: Path, *, remove_dir: bool = True) -> None:
    """Unmount everything at and below ``target``, deepest first, then remove the directory.

    Lazy (``MNT_DETACH``) so a reader that still holds a file open does not keep the store
    from moving on; the kernel frees the mount when the last user goes (moby PR #33638).
    """
    prefix = str(target)
    points = [p for p in mount_points() if p == prefix or p.startswith(prefix + "/")]
    for point in sorted(points, key=len, reverse=True):
        with map_os_errors(f"unmount {point}"):
            try:
                umount(point, MNT_DETACH)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOENT):  # already gone
                    raise
    if remove_dir:
        # map_os_errors outside: it would turn the FileNotFoundError into NotFound first.
        with map_os_errors(f"remove mount point {target}"), contextlib.suppress(FileNotFoundError):
            os.rmdir(target)


@contextlib.contextmanager
def mounted(specs: Sequence[MountSpec], target: Path) -> Iterator[Path]:
    """Mount ``specs`` at ``target`` for the duration of the block."""
    mount_all(specs, target)
    try:
        yield target
    finally:
        unmount_all(target)
