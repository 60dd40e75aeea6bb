"""The kernel, through ctypes: mounts, the new mount API, openat2, FICLONE, loop devices,
btrfs subvolumes and qgroups.

This is the one module of laminae that speaks ctypes (DESIGN section 7). Everything else calls
the named functions here. Python 3.11 lacks ``os.openat2``, ``os.unshare``, ``fcntl.FICLONE``
and the whole new mount API (``fsopen`` ... ``mount_setattr``), and ``os.statvfs`` has no
``f_type``, so they are wrapped below with explicit ``argtypes``/``restype``.

Failures are raised as :class:`OSError` with the errno, its message and the path involved;
callers translate them at their boundary (:func:`laminae._exceptions.map_os_errors`).
Filesystem-context errors from the new mount API (the ``e overlayfs: ...`` lines the kernel
logs on the ``fsopen`` descriptor) are appended to the message, because they are the only place
that says *which* option the kernel refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import platform
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, NoReturn

import attrs

__all__ = [
    "BTRFS_SUPER_MAGIC",
    "CLONE_NEWNS",
    "EXT4_SUPER_MAGIC",
    "MNT_DETACH",
    "MNT_FORCE",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "MS_SLAVE",
    "OVERLAYFS_SUPER_MAGIC",
    "RESOLVE_BENEATH",
    "RESOLVE_IN_ROOT",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "RESOLVE_NO_XDEV",
    "TMPFS_MAGIC",
    "MountInfo",
    "attach_loop",
    "bind_mount",
    "detach_loop",
    "ficlone",
    "fsconfig",
    "fsmount",
    "fsopen",
    "is_mountpoint",
    "mount",
    "mount_overlay",
    "mount_points",
    "mount_setattr",
    "mountinfo",
    "move_mount",
    "open_tree",
    "openat2",
    "openat2_available",
    "parse_mountinfo",
    "rename_noreplace",
    "statfs_type",
    "syncfs",
    "umount",
    "unshare",
]

# --- constants (include/uapi/linux/mount.h, fs.h, openat2.h, magic.h, sched.h) --------------

MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REMOUNT: Final = 0x20
MS_NOATIME: Final = 0x400
MS_NODIRATIME: Final = 0x800
MS_BIND: Final = 0x1000
MS_MOVE: Final = 0x2000
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 0x40000
MS_SLAVE: Final = 0x80000
MS_SHARED: Final = 0x100000
MS_RELATIME: Final = 0x200000
MS_STRICTATIME: Final = 0x1000000

MNT_FORCE: Final = 0x1
MNT_DETACH: Final = 0x2

RESOLVE_NO_XDEV: Final = 0x01
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_NO_SYMLINKS: Final = 0x04
RESOLVE_BENEATH: Final = 0x08
RESOLVE_IN_ROOT: Final = 0x10

CLONE_NEWNS: Final = 0x00020000

OVERLAYFS_SUPER_MAGIC: Final = 0x794C7630
BTRFS_SUPER_MAGIC: Final = 0x9123683E
TMPFS_MAGIC: Final = 0x01021994
EXT4_SUPER_MAGIC: Final = 0xEF53

AT_FDCWD: Final = -100
AT_SYMLINK_NOFOLLOW: Final = 0x100
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

RENAME_NOREPLACE: Final = 0x1

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

# _IOW(0x94, 9, int). powerpc, mips and sparc encode _IOW differently (0x80049409); they are
# not in _SYSCALLS either, so one table entry per machine keeps both facts together.
_FICLONE: Final[dict[str, int]] = {"x86_64": 0x40049409, "aarch64": 0x40049409}

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

MACHINE: Final = platform.machine()

libc = ctypes.CDLL(None, use_errno=True)


def _raise(
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


def _libc_function(name: str, restype: Any, *argtypes: Any) -> Any:
    function = getattr(libc, name)
    function.restype = restype
    function.argtypes = argtypes
    return function


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


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


# struct statfs is 120 bytes on 64-bit Linux with f_type (a long) first; a larger buffer costs
# nothing and keeps us clear of the kernel writing past a short one.
_STATFS_SIZE: Final = 256

_mount = _libc_function(
    "mount",
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
)
_umount2 = _libc_function("umount2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
_statfs = _libc_function("statfs", ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_syncfs = _libc_function("syncfs", ctypes.c_int, ctypes.c_int)
_unshare = _libc_function("unshare", ctypes.c_int, ctypes.c_int)
_renameat2 = _libc_function(
    "renameat2",
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
)


def _syscall(name: str, *argtypes: Any) -> Callable[..., int]:
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


_sys_open_tree = _syscall("open_tree", ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_sys_move_mount = _syscall(
    "move_mount", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
)
_sys_fsopen = _syscall("fsopen", ctypes.c_char_p, ctypes.c_uint)
_sys_fsconfig = _syscall(
    "fsconfig", ctypes.c_int, ctypes.c_uint, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int
)
_sys_fsmount = _syscall("fsmount", ctypes.c_int, ctypes.c_uint, ctypes.c_uint)
_sys_openat2 = _syscall(
    "openat2", ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_OpenHow), ctypes.c_size_t
)
_sys_mount_setattr = _syscall(
    "mount_setattr",
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
    ctypes.POINTER(_MountAttr),
    ctypes.c_size_t,
)


def _encode(value: str | bytes | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


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
    if _mount(_encode(source), _encode(target), _encode(fstype), flags, _encode(data)) != 0:
        _raise(ctypes.get_errno(), target, source)
    _release_loop(source)


def umount(target: str, flags: int = 0) -> None:
    """``umount2(2)``.

    :param flags: ``MNT_DETACH`` and/or ``MNT_FORCE``.
    :raises OSError: e.g. ``EINVAL`` (not a mount point) or ``EBUSY``, naming ``target``.
    """
    if _umount2(os.fsencode(target), flags) != 0:
        _raise(ctypes.get_errno(), target)


# --- the new mount API (Linux 5.2+) -----------------------------------------------------------


def fsopen(fstype: str, flags: int = FSOPEN_CLOEXEC) -> int:
    """Open a filesystem context; returns its fd.

    :raises OSError: ``ENODEV`` for an unknown type, ``ENOSYS`` on old kernels.
    """
    fd = _sys_fsopen(os.fsencode(fstype), flags)
    if fd < 0:
        _raise(ctypes.get_errno(), fstype)
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
    raw: bytes | int | None = value if isinstance(value, int) else _encode(value)
    pointer = ctypes.c_char_p(raw) if isinstance(raw, bytes) else raw
    if _sys_fsconfig(fs_fd, cmd, _encode(key), pointer, aux) < 0:
        err = ctypes.get_errno()
        shown = os.fsdecode(value) if isinstance(value, bytes) else value
        what = key if value is None else f"{key}={shown}"
        _raise(err, what, detail=_fs_log(fs_fd))


def fsmount(fs_fd: int, flags: int = FSMOUNT_CLOEXEC, attr_flags: int = 0) -> int:
    """Turn a created filesystem context into a detached mount; returns the mount fd.

    :param attr_flags: ``MOUNT_ATTR_*`` flags for the new mount.
    """
    fd = _sys_fsmount(fs_fd, flags, attr_flags)
    if fd < 0:
        _raise(ctypes.get_errno(), detail=_fs_log(fs_fd))
    return fd


def move_mount(
    from_fd: int, from_path: str, to_fd: int, to_path: str, flags: int = MOVE_MOUNT_F_EMPTY_PATH
) -> None:
    """Attach a detached mount (or move one): ``move_mount(2)``.

    :raises OSError: naming ``to_path``.
    """
    if _sys_move_mount(from_fd, os.fsencode(from_path), to_fd, os.fsencode(to_path), flags) < 0:
        _raise(ctypes.get_errno(), to_path)


def open_tree(dirfd: int, path: str, flags: int) -> int:
    """Open (or, with ``OPEN_TREE_CLONE``, copy) a mount tree; returns its fd.

    :param flags: ``OPEN_TREE_CLONE``, ``OPEN_TREE_CLOEXEC``, ``AT_RECURSIVE``, ...
    """
    fd = _sys_open_tree(dirfd, os.fsencode(path), flags)
    if fd < 0:
        _raise(ctypes.get_errno(), path)
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
        _raise(ctypes.get_errno(), path)


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


@contextlib.contextmanager
def closing_fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


@attrs.define
class _OverlayContext:
    """An ``fsopen("overlay")`` context whose refusals name the mount and the kernel's reason."""

    fd: int
    target: str

    def set(self, cmd: int, key: str | None, value: str | None = None, aux: int = 0) -> None:
        raw = None if value is None else ctypes.c_char_p(os.fsencode(value))
        if _sys_fsconfig(self.fd, cmd, _encode(key), raw, aux) < 0:
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
        _raise(err, path or self.target, detail=f"{where}: {reason}" if reason else where)


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
                _raise(
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
                _raise(exc.errno or errno.EINVAL, source, detail="making the bind read-only")
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


# --- openat2 (Linux 5.6+) ---------------------------------------------------------------------


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
    _raise(err, raw)


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


# --- files and filesystems --------------------------------------------------------------------


def ficlone(src_fd: int, dst_fd: int) -> None:
    """Make ``dst_fd`` share ``src_fd``'s extents (a reflink): ``ioctl(FICLONE)``.

    :raises OSError: ``EOPNOTSUPP`` (ext4, tmpfs), ``EXDEV`` (different filesystems),
        ``EINVAL`` (unaligned or unsupported), ``ENOSYS`` on an unknown machine.
    """
    request = _FICLONE.get(MACHINE)
    if request is None:
        raise OSError(errno.ENOSYS, f"laminae has no FICLONE number for machine {MACHINE!r}")
    fcntl.ioctl(dst_fd, request, src_fd)


def statfs_type(path: str) -> int:
    """The filesystem magic of ``path`` (``f_type``), e.g. :data:`BTRFS_SUPER_MAGIC`."""
    buffer = ctypes.create_string_buffer(_STATFS_SIZE)
    if _statfs(os.fsencode(path), buffer) != 0:
        _raise(ctypes.get_errno(), path)
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def syncfs(fd: int) -> None:
    """Flush the filesystem holding ``fd`` to disk: ``syncfs(2)``."""
    if _syncfs(fd) != 0:
        _raise(ctypes.get_errno())


def unshare(flags: int) -> None:
    """``unshare(2)`` for the calling thread, e.g. :data:`CLONE_NEWNS`."""
    if _unshare(flags) != 0:
        _raise(ctypes.get_errno())


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (``renameat2(RENAME_NOREPLACE)``).

    Plain ``rename`` silently replaces an empty directory, which would swallow a layer.

    :raises OSError: ``EEXIST`` when ``dst`` exists; names both paths.
    """
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) != 0:
        _raise(ctypes.get_errno(), src, dst)


# --- mountinfo --------------------------------------------------------------------------------


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


# --- loop devices -----------------------------------------------------------------------------

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

    The device auto-clears: once :func:`mount` has mounted it, it goes away with the last
    unmount; before that, :func:`detach_loop` (or the end of this process) removes it.

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


def _release_loop(device: str) -> None:
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
