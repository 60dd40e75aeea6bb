"""Loop devices: a file attached as a block device, for filesystems kept in image files.

Attaching goes through ``/dev/loop-control`` and ``LOOP_CONFIGURE`` (Linux 5.8+; older kernels
get ``LOOP_SET_FD`` + ``LOOP_SET_STATUS64``), with ``LO_FLAGS_AUTOCLEAR``, so that a device
goes away with the last unmount of what it holds and a crash never leaks one that nothing
mounts. No ``losetup`` process runs.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Final

from laminae.kernel._syscalls import closing_fd

__all__ = ["attach_loop", "detach_loop", "loop_device_of", "release_loop"]

# include/uapi/linux/loop.h
_LOOP_SET_FD: Final = 0x4C00
_LOOP_CLR_FD: Final = 0x4C01
_LOOP_SET_STATUS64: Final = 0x4C04
_LOOP_GET_STATUS64: Final = 0x4C05
_LOOP_CONFIGURE: Final = 0x4C0A
_LOOP_CTL_GET_FREE: Final = 0x4C82
_LO_FLAGS_READ_ONLY: Final = 1
_LO_FLAGS_AUTOCLEAR: Final = 4
_LO_NAME_SIZE: Final = 64


class _LoopInfo64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * _LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_uint8 * _LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_uint8 * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class _LoopConfig(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


# attach_loop keeps the loop device open: with LO_FLAGS_AUTOCLEAR the kernel detaches a device
# at its last close, so our fd is what keeps it attached until mount() has mounted it; then the
# fd is dropped and the mount alone holds the device, which goes away with the last unmount. A
# crash of this process therefore never leaks a device that nothing mounts.
_held_loops: dict[str, int] = {}
# device -> (st_dev, st_ino) of its image, so that detach_loop never detaches a device that
# auto-cleared and was then taken by somebody else.
_loop_images: dict[str, tuple[int, int]] = {}


def attach_loop(image: str, *, readonly: bool = False) -> str:
    """Attach ``image`` to a free loop device; returns ``/dev/loopN``.

    The device auto-clears: once :func:`~laminae.kernel._mounts.mount` has mounted it, it goes
    away with the last unmount; before that, :func:`detach_loop` (or the end of this process)
    removes it.

    :raises OSError: naming ``image``.
    """
    image_fd = os.open(image, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    try:
        image_stat = os.fstat(image_fd)
        with closing_fd(os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)) as control:
            # Another process can take the device between GET_FREE and our configure (EBUSY);
            # ask again.
            for _ in range(64):
                number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
                device = f"/dev/loop{number}"
                loop_fd = _open_loop_device(device, number)
                try:
                    _configure_loop(loop_fd, image_fd, image, readonly)
                except OSError as exc:
                    os.close(loop_fd)
                    if exc.errno == errno.EBUSY:
                        continue
                    raise
                _held_loops[device] = loop_fd
                _loop_images[device] = (image_stat.st_dev, image_stat.st_ino)
                return device
    finally:
        os.close(image_fd)
    raise OSError(errno.EBUSY, "no free loop device after 64 attempts", image)


def _open_loop_device(device: str, number: int) -> int:
    try:
        return os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        # A /dev without devtmpfs (some containers) lacks the node until someone makes it.
        os.mknod(device, 0o660 | stat.S_IFBLK, os.makedev(7, number))
        return os.open(device, os.O_RDWR | os.O_CLOEXEC)


def _configure_loop(loop_fd: int, image_fd: int, image: str, readonly: bool) -> None:
    flags = _LO_FLAGS_AUTOCLEAR | (_LO_FLAGS_READ_ONLY if readonly else 0)
    info = _LoopInfo64(lo_flags=flags)
    name = os.fsencode(image)[: _LO_NAME_SIZE - 1]
    ctypes.memmove(info.lo_file_name, name, len(name))
    config = _LoopConfig(fd=image_fd, block_size=0, info=info)
    try:
        fcntl.ioctl(loop_fd, _LOOP_CONFIGURE, config)
        return
    except OSError as exc:
        # LOOP_CONFIGURE is Linux 5.8+; older kernels answer EINVAL or ENOTTY.
        if exc.errno not in (errno.EINVAL, errno.ENOTTY):
            raise OSError(exc.errno, exc.strerror, image) from exc
    fcntl.ioctl(loop_fd, _LOOP_SET_FD, image_fd)
    try:
        fcntl.ioctl(loop_fd, _LOOP_SET_STATUS64, info)
    except OSError:
        fcntl.ioctl(loop_fd, _LOOP_CLR_FD, 0)
        raise


def release_loop(device: str) -> None:
    """Drop this process's hold on ``device`` once something has mounted it.

    A no-op for anything that is not a device :func:`attach_loop` attached.
    """
    held = _held_loops.pop(device, None)
    if held is not None:
        os.close(held)


def _loop_backing(fd: int) -> tuple[int, int] | None:
    info = _LoopInfo64()
    try:
        fcntl.ioctl(fd, _LOOP_GET_STATUS64, info)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # not attached
            return None
        raise
    return info.lo_device, info.lo_inode


def detach_loop(device: str) -> None:
    """Detach loop device ``device`` (``LOOP_CLR_FD``).

    If it is still mounted, the kernel detaches it when the last mount goes away. A device
    from :func:`attach_loop` that already went away with its unmount is left alone.

    :raises OSError: ``ENXIO`` when a device this process did not attach is not attached,
        naming ``device``.
    """
    image = _loop_images.pop(device, None)
    held = _held_loops.pop(device, None)
    fd = held if held is not None else os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        if held is None and image is not None and _loop_backing(fd) != image:
            return
        fcntl.ioctl(fd, _LOOP_CLR_FD, 0)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, device) from exc
    finally:
        os.close(fd)


def loop_device_of(image: str | os.PathLike[str]) -> str | None:
    """The loop device ``image`` is attached to (``/dev/loopN``), or ``None``.

    Read from ``/sys/block/loop*/loop/backing_file``, which the kernel fills with the path the
    file had when it was attached, symlinks resolved. Attached means in use: mounted, or held
    by somebody's ``losetup``.
    """
    target = os.path.realpath(image)
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip() == target:
                return f"/dev/{backing.parent.parent.name}"
        except OSError:  # detached between glob and read
            continue
    return None
