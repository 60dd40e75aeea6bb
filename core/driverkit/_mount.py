"""The one executor that turns :class:`MountSpec` descriptions into mounts, and undoes them.

Drivers describe; this module mounts. Keeping every mount in one place is what lets the store
count them, find them again in ``/proc/self/mountinfo`` after a crash, and unmount them.

It is also the one place that makes every mount ``nodev`` (containers-storage's default
``mountopt``): a layer's device nodes come from whoever built the image, and through a mount
without ``nodev`` a node with a host device's numbers would open that device. A spec that
carries the ``dev`` option opts out, for the rare caller that means device nodes to work.
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
    AT_RECURSIVE,
    MNT_DETACH,
    MOUNT_ATTR_NODEV,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REMOUNT,
    bind_mount,
    mount,
    mount_overlay,
    mount_setattr,
    umount,
)
from laminae.kernel._syscalls import AT_FDCWD

__all__ = ["mount_all", "mounted", "unmount_all", "wants_nodev"]

_FLAGS = {
    "ro": MS_RDONLY,
    "rw": 0,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
}


# Options only this module reads: the bind markers, and "dev", the opt-out from nodev.
_MARKERS = ("bind", "rbind", "loop", "dev")


def wants_nodev(spec: MountSpec) -> bool:
    """Whether the executor mounts ``spec`` ``nodev``: always, unless it carries ``dev``."""
    return "dev" not in spec.options


def _split_options(spec: MountSpec) -> tuple[int, list[str]]:
    flags = MS_NODEV if wants_nodev(spec) else 0
    data = []
    for option in spec.options:
        if option in _FLAGS:
            flags |= _FLAGS[option]
        elif option not in _MARKERS:
            data.append(option)
    return flags, data


def _bind(spec: MountSpec, where: Path) -> None:
    recursive = "rbind" in spec.options
    bind_mount(spec.source, str(where), readonly=spec.readonly, recursive=recursive)
    if not wants_nodev(spec):
        return
    # bind_mount takes only the read-only attribute; nodev goes on before anyone is told of
    # the mount point, and on every submount of an rbind too.
    try:
        try:
            flags = AT_RECURSIVE if recursive else 0
            mount_setattr(AT_FDCWD, str(where), flags, attr_set=MOUNT_ATTR_NODEV)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            # Linux < 5.12: a remount sets the flags of the top mount only, and must repeat
            # the read-only flag or it would clear it.
            ro = MS_RDONLY if spec.readonly else 0
            mount("none", str(where), None, MS_REMOUNT | MS_BIND | MS_NODEV | ro)
    except BaseException:
        # Never leave a mount without nodev where one with it was asked for.
        umount(str(where), MNT_DETACH)
        raise


def _mount_one(spec: MountSpec, target: Path) -> None:
    where = target / spec.target.lstrip("/") if spec.target else target
    if spec.type == "bind":
        _bind(spec, where)
    elif spec.type == "overlay":
        if not spec.lowerdirs:
            raise InvalidArgument(f"overlay mount spec for {where}: no lowerdirs")
        # mount_overlay takes ro, nosuid, nodev and noexec itself (as mount attributes), so
        # they go through as they are; only the markers mean nothing to overlayfs.
        data = [o for o in spec.options if o != "rw" and o not in _MARKERS]
        if spec.readonly and "ro" not in data:
            data.append("ro")
        if wants_nodev(spec) and "nodev" not in data:
            data.append("nodev")
        mount_overlay(
            str(where), spec.lowerdirs, upperdir=spec.upperdir, workdir=spec.workdir, options=data
        )
    elif "loop" in spec.options:
        flags, data = _split_options(spec)
        device = attach_loop(spec.source, readonly=bool(flags & MS_RDONLY))
        try:
            mount(device, str(where), spec.type, flags, ",".join(data) or None)
        except BaseException:
            # The loop device is autoclear, but only once something has mounted it.
            detach_loop(device)
            raise
    else:
        flags, data = _split_options(spec)
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
