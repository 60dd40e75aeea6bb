"""Mounts: ``mount(2)``, the new mount API, overlayfs and bind mounts, mount namespaces.

The new mount API (``fsopen`` ... ``mount_setattr``, Linux 5.2+) is what laminae mounts with
where the kernel has it: one ``lowerdir+`` per overlay lower (Linux 6.8+) lifts the page limit
on the option string, and ``open_tree`` + ``mount_setattr`` make a bind read-only all the way
down. Each function falls back to classic ``mount(2)`` on kernels without it.

Filesystem-context errors from the new mount API (the ``e overlayfs: ...`` lines the kernel
logs on the ``fsopen`` descriptor) are appended to the :class:`OSError` message, because they
are the only place that says *which* option the kernel refused.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Sequence
from typing import Final, NoReturn

import attrs

from laminae.kernel._loop import release_loop
from laminae.kernel._syscalls import (
    AT_FDCWD,
    closing_fd,
    encode,
    libc_function,
    raise_oserror,
    syscall,
)

__all__ = [
    "AT_EMPTY_PATH",
    "AT_RECURSIVE",
    "CLONE_NEWNS",
    "FSCONFIG_CMD_CREATE",
    "FSCONFIG_SET_FD",
    "FSCONFIG_SET_FLAG",
    "FSCONFIG_SET_STRING",
    "FSMOUNT_CLOEXEC",
    "FSOPEN_CLOEXEC",
    "MNT_DETACH",
    "MNT_FORCE",
    "MOUNT_ATTR_NOATIME",
    "MOUNT_ATTR_NODEV",
    "MOUNT_ATTR_NODIRATIME",
    "MOUNT_ATTR_NOEXEC",
    "MOUNT_ATTR_NOSUID",
    "MOUNT_ATTR_RDONLY",
    "MOUNT_ATTR_STRICTATIME",
    "MOVE_MOUNT_F_EMPTY_PATH",
    "MS_BIND",
    "MS_NOATIME",
    "MS_NODEV",
    "MS_NODIRATIME",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_RELATIME",
    "MS_REMOUNT",
    "MS_STRICTATIME",
    "OPEN_TREE_CLOEXEC",
    "OPEN_TREE_CLONE",
    "bind_mount",
    "fsconfig",
    "fsmount",
    "fsopen",
    "mount",
    "mount_overlay",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "umount",
    "unshare",
]

# --- constants (include/uapi/linux/mount.h, fs.h, fcntl.h, sched.h) --------------------------

MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REMOUNT: Final = 0x20
MS_NOATIME: Final = 0x400
MS_NODIRATIME: Final = 0x800
MS_BIND: Final = 0x1000
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 0x40000
MS_RELATIME: Final = 0x200000
MS_STRICTATIME: Final = 0x1000000

MNT_FORCE: Final = 0x1
MNT_DETACH: Final = 0x2

CLONE_NEWNS: Final = 0x00020000

AT_EMPTY_PATH: Final = 0x1000
AT_RECURSIVE: Final = 0x8000

FSOPEN_CLOEXEC: Final = 0x1
FSMOUNT_CLOEXEC: Final = 0x1
FSCONFIG_SET_FLAG: Final = 0
FSCONFIG_SET_STRING: Final = 1
FSCONFIG_SET_FD: Final = 5
FSCONFIG_CMD_CREATE: Final = 6

MOVE_MOUNT_F_EMPTY_PATH: Final = 0x4
OPEN_TREE_CLONE: Final = 0x1
OPEN_TREE_CLOEXEC: Final = os.O_CLOEXEC

MOUNT_ATTR_RDONLY: Final = 0x1
MOUNT_ATTR_NOSUID: Final = 0x2
MOUNT_ATTR_NODEV: Final = 0x4
MOUNT_ATTR_NOEXEC: Final = 0x8
MOUNT_ATTR_NOATIME: Final = 0x10
MOUNT_ATTR_STRICTATIME: Final = 0x20
MOUNT_ATTR_NODIRATIME: Final = 0x80


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_mount = libc_function(
    "mount",
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
)
_umount2 = libc_function("umount2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
_unshare = libc_function("unshare", ctypes.c_int, ctypes.c_int)

_sys_open_tree = syscall("open_tree", ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_sys_move_mount = syscall(
    "move_mount", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
)
_sys_fsopen = syscall("fsopen", ctypes.c_char_p, ctypes.c_uint)
_sys_fsconfig = syscall(
    "fsconfig", ctypes.c_int, ctypes.c_uint, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int
)
_sys_fsmount = syscall("fsmount", ctypes.c_int, ctypes.c_uint, ctypes.c_uint)
_sys_mount_setattr = syscall(
    "mount_setattr",
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
    ctypes.POINTER(_MountAttr),
    ctypes.c_size_t,
)


# --- classic mounts ---------------------------------------------------------------------------


def mount(
    source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    """``mount(2)``.

    :param source: a device, a directory (``MS_BIND``) or a name such as ``"overlay"``.
    :param target: the mount point.
    :param fstype: the filesystem type, ``None`` for binds, remounts and propagation changes.
    :param flags: ``MS_*`` flags.
    :param data: the filesystem's option string.
    :raises OSError: the kernel refused; names ``target`` and ``source``.
    """
    if _mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        raise_oserror(ctypes.get_errno(), target, source)
    release_loop(source)


def umount(target: str, flags: int = 0) -> None:
    """``umount2(2)``.

    :param flags: ``MNT_DETACH`` and/or ``MNT_FORCE``.
    :raises OSError: e.g. ``EINVAL`` (not a mount point) or ``EBUSY``, naming ``target``.
    """
    if _umount2(os.fsencode(target), flags) != 0:
        raise_oserror(ctypes.get_errno(), target)


def unshare(flags: int) -> None:
    """``unshare(2)`` for the calling thread, e.g. :data:`CLONE_NEWNS`."""
    if _unshare(flags) != 0:
        raise_oserror(ctypes.get_errno())


# --- the new mount API (Linux 5.2+) -----------------------------------------------------------


def fsopen(fstype: str, flags: int = FSOPEN_CLOEXEC) -> int:
    """Open a filesystem context; returns its fd.

    :raises OSError: ``ENODEV`` for an unknown type, ``ENOSYS`` on old kernels.
    """
    fd = _sys_fsopen(os.fsencode(fstype), flags)
    if fd < 0:
        raise_oserror(ctypes.get_errno(), fstype)
    return fd


def fsconfig(
    fs_fd: int,
    cmd: int,
    key: str | None = None,
    value: str | bytes | int | None = None,
    aux: int = 0,
) -> None:
    """Configure a filesystem context: ``FSCONFIG_SET_FLAG``/``SET_STRING``/``SET_FD``/``CMD_*``.

    An ``int`` ``value`` is passed as a number (for ``SET_FD`` the fd goes in ``aux``).
    The kernel's own explanation of a refusal is in the context's log (:func:`_fs_log`).

    :raises OSError: naming the key and value.
    """
    raw: bytes | int | None = value if isinstance(value, int) else encode(value)
    pointer = ctypes.c_char_p(raw) if isinstance(raw, bytes) else raw
    if _sys_fsconfig(fs_fd, cmd, encode(key), pointer, aux) < 0:
        err = ctypes.get_errno()
        shown = os.fsdecode(value) if isinstance(value, bytes) else value
        what = key if value is None else f"{key}={shown}"
        raise_oserror(err, what, detail=_fs_log(fs_fd))


def fsmount(fs_fd: int, flags: int = FSMOUNT_CLOEXEC, attr_flags: int = 0) -> int:
    """Turn a created filesystem context into a detached mount; returns the mount fd.

    :param attr_flags: ``MOUNT_ATTR_*`` flags for the new mount.
    """
    fd = _sys_fsmount(fs_fd, flags, attr_flags)
    if fd < 0:
        raise_oserror(ctypes.get_errno(), detail=_fs_log(fs_fd))
    return fd


def move_mount(
    from_fd: int, from_path: str, to_fd: int, to_path: str, flags: int = MOVE_MOUNT_F_EMPTY_PATH
) -> None:
    """Attach a detached mount (or move one): ``move_mount(2)``.

    :raises OSError: naming ``to_path``.
    """
    if _sys_move_mount(from_fd, os.fsencode(from_path), to_fd, os.fsencode(to_path), flags) < 0:
        raise_oserror(ctypes.get_errno(), to_path)


def open_tree(dirfd: int, path: str, flags: int) -> int:
    """Open (or, with ``OPEN_TREE_CLONE``, copy) a mount tree; returns its fd.

    :param flags: ``OPEN_TREE_CLONE``, ``OPEN_TREE_CLOEXEC``, ``AT_RECURSIVE``, ...
    """
    fd = _sys_open_tree(dirfd, os.fsencode(path), flags)
    if fd < 0:
        raise_oserror(ctypes.get_errno(), path)
    return fd


def mount_setattr(
    dirfd: int,
    path: str,
    flags: int,
    attr_set: int = 0,
    attr_clr: int = 0,
    propagation: int = 0,
    userns_fd: int = 0,
) -> None:
    """Change mount attributes (``MOUNT_ATTR_*``), recursively with ``AT_RECURSIVE``."""
    attr = _MountAttr(attr_set, attr_clr, propagation, userns_fd)
    raw = os.fsencode(path)
    if _sys_mount_setattr(dirfd, raw, flags, ctypes.byref(attr), ctypes.sizeof(attr)) < 0:
        raise_oserror(ctypes.get_errno(), path)


def _fs_log(fs_fd: int) -> str:
    """Drain the filesystem context's message log: ``"e overlayfs: ..."`` lines."""
    lines = []
    # The log holds at most 8 messages (fs/fs_context.c); the bound guards against a kernel
    # that keeps answering.
    for _ in range(64):
        try:
            line = os.read(fs_fd, 4096)
        except OSError:  # ENODATA: log empty
            break
        if not line:
            break
        lines.append(line.decode(errors="replace").strip())
    return "; ".join(lines)


# --- overlayfs and bind mounts ---------------------------------------------------------------

# Mount attributes that the new API takes on the mount (fsmount), not on the superblock.
_MOUNT_ATTRS: Final[dict[str, tuple[int, int]]] = {
    # option: (MOUNT_ATTR_* for fsmount, MS_* for mount(2))
    "nosuid": (MOUNT_ATTR_NOSUID, MS_NOSUID),
    "nodev": (MOUNT_ATTR_NODEV, MS_NODEV),
    "noexec": (MOUNT_ATTR_NOEXEC, MS_NOEXEC),
    "noatime": (MOUNT_ATTR_NOATIME, MS_NOATIME),
    "nodiratime": (MOUNT_ATTR_NODIRATIME, MS_NODIRATIME),
    "relatime": (0, MS_RELATIME),
    "strictatime": (MOUNT_ATTR_STRICTATIME, MS_STRICTATIME),
}

# fsconfig copies a string value with strndup_user(value, 256) (fs/fsopen.c): a longer path is
# EINVAL. Longer layer paths go in as an fd instead (overlayfs takes fds since Linux 6.13).
_FSCONFIG_STRING_MAX: Final = 255


@attrs.define
class _OverlayContext:
    """An ``fsopen("overlay")`` context whose refusals name the mount and the kernel's reason."""

    fd: int
    target: str

    def set(self, cmd: int, key: str | None, value: str | None = None, aux: int = 0) -> None:
        raw = None if value is None else ctypes.c_char_p(os.fsencode(value))
        if _sys_fsconfig(self.fd, cmd, encode(key), raw, aux) < 0:
            self.fail(ctypes.get_errno(), key if value is None else f"{key}={value}")

    def set_path(self, key: str, path: str, what: str) -> None:
        if len(os.fsencode(path)) <= _FSCONFIG_STRING_MAX:
            raw = ctypes.c_char_p(os.fsencode(path))
            if _sys_fsconfig(self.fd, FSCONFIG_SET_STRING, key.encode(), raw, 0) < 0:
                self.fail(ctypes.get_errno(), what, path)
            return
        try:
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            self.fail(exc.errno or errno.EINVAL, what, path)
        with closing_fd(dir_fd):
            if _sys_fsconfig(self.fd, FSCONFIG_SET_FD, key.encode(), None, dir_fd) < 0:
                self.fail(ctypes.get_errno(), what, path)

    def fail(self, err: int, what: str | None, path: str | None = None) -> NoReturn:
        reason = _fs_log(self.fd)
        if not reason and err == errno.EINVAL:
            # overlayfs reports some refusals (a missing workdir) with pr_err, not in the log.
            reason = "no reason logged here; the kernel log may say more"
        where = f"overlay at {self.target}" + (f", {what}" if what else "")
        raise_oserror(err, path or self.target, detail=f"{where}: {reason}" if reason else where)


def _overlay_escape(path: str) -> str:
    # overlayfs splits lowerdir on ':' and the option string on ','; both take '\' escapes.
    return re.sub(r"([\\:,])", r"\\\1", path)


def mount_overlay(
    target: str,
    lowerdirs: Sequence[str],
    upperdir: str | None = None,
    workdir: str | None = None,
    options: Sequence[str] = (),
) -> None:
    """Mount overlayfs at ``target``.

    Uses the new mount API with one ``lowerdir+`` per lower (Linux 6.8+), so up to the kernel's
    500 lowers with no page-size limit on the option string. On kernels that refuse ``fsopen``
    or ``lowerdir+``, falls back to ``mount(2)`` with ``lowerdir=a:b:c``.

    :param lowerdirs: lower dirs, uppermost first.
    :param upperdir: the writable dir; ``None`` mounts a read-only stack.
    :param workdir: required with ``upperdir``, on the same filesystem.
    :param options: ``"ro"``, ``"userxattr"``, ``"index=off"`` style: ``key=value`` is a string
        option, a bare ``key`` a flag; ``nosuid``, ``nodev``, ``noexec`` and the ``*atime``
        options apply to the mount.
    :raises OSError: with the kernel's explanation (``e overlay: ...``) in the message, e.g.
        ``EINVAL`` "too many lower directories, limit is 500" for a 501st lower.
    """
    if not lowerdirs:
        raise OSError(errno.EINVAL, "overlay needs at least one lower dir", target)
    try:
        fs_fd = fsopen("overlay")
    except OSError as exc:
        # ENOSYS: Linux < 5.2, or a seccomp policy that hides the new API.
        if exc.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        _mount_overlay_classic(target, lowerdirs, upperdir, workdir, options)
        return
    with closing_fd(fs_fd):
        context = _OverlayContext(fs_fd, target)
        count = len(lowerdirs)
        try:
            context.set_path("lowerdir+", lowerdirs[0], f"lowerdir+ 1 of {count}")
        except OSError as exc:
            # Linux < 6.8 knows no "lowerdir+" ("Unknown parameter"): the first one tells.
            if exc.errno != errno.EINVAL:
                raise
            try:
                _mount_overlay_classic(target, lowerdirs, upperdir, workdir, options)
            except OSError as classic:
                raise_oserror(
                    classic.errno or errno.EINVAL,
                    target,
                    detail=f"{classic.strerror}; before that, {exc.strerror}",
                )
            return
        for index, lower in enumerate(lowerdirs[1:], start=2):
            context.set_path("lowerdir+", lower, f"lowerdir+ {index} of {count}")
        if upperdir is not None:
            context.set_path("upperdir", upperdir, "upperdir")
        if workdir is not None:
            context.set_path("workdir", workdir, "workdir")
        attr_flags = 0
        for option in options:
            key, sep, value = option.partition("=")
            if sep:
                context.set(FSCONFIG_SET_STRING, key, value)
            elif key in _MOUNT_ATTRS:
                attr_flags |= _MOUNT_ATTRS[key][0]
            elif key != "rw":
                if key == "ro":
                    attr_flags |= MOUNT_ATTR_RDONLY
                context.set(FSCONFIG_SET_FLAG, key)
        context.set(FSCONFIG_CMD_CREATE, None)
        mnt_fd = _sys_fsmount(fs_fd, FSMOUNT_CLOEXEC, attr_flags)
        if mnt_fd < 0:
            context.fail(ctypes.get_errno(), "fsmount")
        with closing_fd(mnt_fd):
            move_mount(mnt_fd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)


def _mount_overlay_classic(
    target: str,
    lowerdirs: Sequence[str],
    upperdir: str | None,
    workdir: str | None,
    options: Sequence[str],
) -> None:
    flags = 0
    data = ["lowerdir=" + ":".join(_overlay_escape(lower) for lower in lowerdirs)]
    if upperdir is not None:
        data.append("upperdir=" + _overlay_escape(upperdir))
    if workdir is not None:
        data.append("workdir=" + _overlay_escape(workdir))
    for option in options:
        if option in _MOUNT_ATTRS:
            flags |= _MOUNT_ATTRS[option][1]
        elif option == "ro":
            flags |= MS_RDONLY
        elif option != "rw":
            data.append(option)
    mount("overlay", target, "overlay", flags, ",".join(data))


def bind_mount(source: str, target: str, *, readonly: bool = False, recursive: bool = True) -> None:
    """Bind ``source`` onto ``target``.

    With ``readonly`` the whole tree refuses writes with ``EROFS``, submounts included when
    ``recursive``: ``open_tree(OPEN_TREE_CLONE)`` + ``mount_setattr(MOUNT_ATTR_RDONLY)`` +
    ``move_mount``, because a classic ``MS_BIND|MS_RDONLY`` ignores the read-only flag and a
    remount makes only the top mount read-only. Falls back to bind + remount on old kernels.
    """
    tree_flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    try:
        tree_fd = open_tree(AT_FDCWD, source, tree_flags)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        _bind_mount_classic(source, target, readonly=readonly, recursive=recursive)
        return
    with closing_fd(tree_fd):
        if readonly:
            setattr_flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
            try:
                mount_setattr(tree_fd, "", setattr_flags, attr_set=MOUNT_ATTR_RDONLY)
            except OSError as exc:
                raise_oserror(exc.errno or errno.EINVAL, source, detail="making the bind read-only")
        move_mount(tree_fd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)


def _bind_mount_classic(source: str, target: str, *, readonly: bool, recursive: bool) -> None:
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    if not readonly:
        return
    try:
        mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    except OSError:
        # Never leave a writable bind where a read-only one was asked for.
        umount(target, MNT_DETACH)
        raise
