"""btrfs through its ioctls: subvolumes, snapshots, read-only flags, qgroups.

The kernel side of the btrfs driver, speaking ioctls like the rest of :mod:`laminae.kernel`, so
that a layer costs no ``btrfs`` process.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from typing import Any, Final

import attrs

from laminae.kernel._filesystems import BTRFS_SUPER_MAGIC, statfs_type
from laminae.kernel._syscalls import MACHINE, closing_fd

__all__ = [
    "FIRST_FREE_OBJECTID",
    "Item",
    "Qgroup",
    "QuotaStatus",
    "Subvolume",
    "create_snapshot",
    "create_subvolume",
    "delete_subvolume",
    "get_readonly",
    "is_subvolume",
    "nested_subvolumes",
    "qgroup_create",
    "qgroup_destroy",
    "qgroup_id",
    "qgroup_limit",
    "qgroups",
    "quota_enable",
    "quota_rescan",
    "quota_rescan_wait",
    "quota_status",
    "set_readonly",
    "subvolume_id",
    "sync",
    "tree_search",
    "wait_subvolume_cleaned",
]

# Subvolumes, snapshots and qgroups through the ioctls of include/uapi/linux/btrfs.h, so that a
# layer costs no `btrfs` process. Every call takes paths and opens what it needs; errors are
# OSErrors naming the path. Layouts are the uapi structs field for field; the request numbers
# are computed from their sizes (_ioc), so a wrong layout shows as a wrong number in
# tests/test_btrfs_ioctls.py, which checks them against the numbers btrfs-progs uses.

FIRST_FREE_OBJECTID: Final = 256
"""The inode number of every subvolume's root directory."""

_BTRFS_IOCTL_MAGIC: Final = 0x94
_BTRFS_SUBVOL_NAME_MAX: Final = 4039
_BTRFS_INO_LOOKUP_PATH_MAX: Final = 4080
_BTRFS_SEARCH_ARGS_BUFSIZE: Final = 4096 - 104  # 4096 - sizeof(struct btrfs_ioctl_search_key)

_BTRFS_SUBVOL_RDONLY: Final = 1 << 1
_BTRFS_QGROUP_LIMIT_MAX_RFER: Final = 1 << 0
_BTRFS_QUOTA_CTL_ENABLE: Final = 1
_BTRFS_SUBVOL_SYNC_WAIT_FOR_ONE: Final = 0

# Tree ids and item types (include/uapi/linux/btrfs_tree.h).
_BTRFS_ROOT_TREE_OBJECTID: Final = 1
_BTRFS_QUOTA_TREE_OBJECTID: Final = 8
_BTRFS_ROOT_REF_KEY: Final = 156
_BTRFS_QGROUP_STATUS_KEY: Final = 240
_BTRFS_QGROUP_INFO_KEY: Final = 242
_BTRFS_QGROUP_LIMIT_KEY: Final = 244
_BTRFS_QGROUP_STATUS_FLAG_ON: Final = 1 << 0
_BTRFS_QGROUP_STATUS_FLAG_RESCAN: Final = 1 << 1
_BTRFS_QGROUP_STATUS_FLAG_INCONSISTENT: Final = 1 << 2
_U64_MAX: Final = (1 << 64) - 1

# _IOC direction bits in the asm-generic encoding that x86_64 and aarch64 share; powerpc, mips
# and sparc encode directions differently, so they are refused rather than guessed.
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2
_IOC_GENERICMACHINES: Final = frozenset({"x86_64", "aarch64"})


class _BtrfsVolArgsV2Name(ctypes.Union):
    _fields_ = [
        ("name", ctypes.c_char * (_BTRFS_SUBVOL_NAME_MAX + 1)),
        ("devid", ctypes.c_uint64),
        ("subvolid", ctypes.c_uint64),
    ]


class _BtrfsVolArgsV2(ctypes.Structure):
    """``struct btrfs_ioctl_vol_args_v2``: 4096 bytes.

    ``unused`` is the union with ``{u64 size; struct btrfs_qgroup_inherit *qgroup_inherit;}``,
    left zero: no flag here asks for qgroup inheritance.
    """

    _anonymous_ = ("u",)
    _fields_ = [
        ("fd", ctypes.c_int64),
        ("transid", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("unused", ctypes.c_uint64 * 4),
        ("u", _BtrfsVolArgsV2Name),
    ]


class _BtrfsInoLookupArgs(ctypes.Structure):
    _fields_ = [
        ("treeid", ctypes.c_uint64),
        ("objectid", ctypes.c_uint64),
        ("name", ctypes.c_char * _BTRFS_INO_LOOKUP_PATH_MAX),
    ]


class _BtrfsQuotaCtlArgs(ctypes.Structure):
    _fields_ = [("cmd", ctypes.c_uint64), ("status", ctypes.c_uint64)]


class _BtrfsQuotaRescanArgs(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("progress", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 6),
    ]


class _BtrfsQgroupCreateArgs(ctypes.Structure):
    _fields_ = [("create", ctypes.c_uint64), ("qgroupid", ctypes.c_uint64)]


class _BtrfsQgroupLimit(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("max_rfer", ctypes.c_uint64),
        ("max_excl", ctypes.c_uint64),
        ("rsv_rfer", ctypes.c_uint64),
        ("rsv_excl", ctypes.c_uint64),
    ]


class _BtrfsQgroupLimitArgs(ctypes.Structure):
    _fields_ = [("qgroupid", ctypes.c_uint64), ("lim", _BtrfsQgroupLimit)]


class _BtrfsSearchKey(ctypes.Structure):
    _fields_ = [
        ("tree_id", ctypes.c_uint64),
        ("min_objectid", ctypes.c_uint64),
        ("max_objectid", ctypes.c_uint64),
        ("min_offset", ctypes.c_uint64),
        ("max_offset", ctypes.c_uint64),
        ("min_transid", ctypes.c_uint64),
        ("max_transid", ctypes.c_uint64),
        ("min_type", ctypes.c_uint32),
        ("max_type", ctypes.c_uint32),
        ("nr_items", ctypes.c_uint32),
        ("unused", ctypes.c_uint32),
        ("unused1", ctypes.c_uint64 * 4),
    ]


class _BtrfsSearchArgs(ctypes.Structure):
    _fields_ = [
        ("key", _BtrfsSearchKey),
        ("buf", ctypes.c_uint8 * _BTRFS_SEARCH_ARGS_BUFSIZE),
    ]


class _BtrfsSubvolWait(ctypes.Structure):
    _fields_ = [
        ("subvolid", ctypes.c_uint64),
        ("mode", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_BTRFS_IOCTL_MAGIC << 8) | number


_BTRFS_IOC_SYNC: Final = _ioc(_IOC_NONE, 8, 0)
_BTRFS_IOC_TREE_SEARCH: Final = _ioc(_IOC_READ | _IOC_WRITE, 17, ctypes.sizeof(_BtrfsSearchArgs))
_BTRFS_IOC_INO_LOOKUP: Final = _ioc(_IOC_READ | _IOC_WRITE, 18, ctypes.sizeof(_BtrfsInoLookupArgs))
_BTRFS_IOC_SNAP_CREATE_V2: Final = _ioc(_IOC_WRITE, 23, ctypes.sizeof(_BtrfsVolArgsV2))
_BTRFS_IOC_SUBVOL_CREATE_V2: Final = _ioc(_IOC_WRITE, 24, ctypes.sizeof(_BtrfsVolArgsV2))
_BTRFS_IOC_SUBVOL_GETFLAGS: Final = _ioc(_IOC_READ, 25, ctypes.sizeof(ctypes.c_uint64))
_BTRFS_IOC_SUBVOL_SETFLAGS: Final = _ioc(_IOC_WRITE, 26, ctypes.sizeof(ctypes.c_uint64))
_BTRFS_IOC_QUOTA_CTL: Final = _ioc(_IOC_READ | _IOC_WRITE, 40, ctypes.sizeof(_BtrfsQuotaCtlArgs))
_BTRFS_IOC_QGROUP_CREATE: Final = _ioc(_IOC_WRITE, 42, ctypes.sizeof(_BtrfsQgroupCreateArgs))
# _IOR, though userspace writes it: so the uapi header declares it, so the kernel matches it.
_BTRFS_IOC_QGROUP_LIMIT: Final = _ioc(_IOC_READ, 43, ctypes.sizeof(_BtrfsQgroupLimitArgs))
_BTRFS_IOC_QUOTA_RESCAN: Final = _ioc(_IOC_WRITE, 44, ctypes.sizeof(_BtrfsQuotaRescanArgs))
_BTRFS_IOC_QUOTA_RESCAN_WAIT: Final = _ioc(_IOC_NONE, 46, 0)
_BTRFS_IOC_SNAP_DESTROY_V2: Final = _ioc(_IOC_WRITE, 63, ctypes.sizeof(_BtrfsVolArgsV2))
_BTRFS_IOC_SUBVOL_SYNC_WAIT: Final = _ioc(_IOC_WRITE, 65, ctypes.sizeof(_BtrfsSubvolWait))


def _btrfs_ioctl(fd: int, request: int, arg: Any, path: str) -> None:
    """``ioctl(fd, request, &arg)``; an ``OSError`` names ``path``."""
    if MACHINE not in _IOC_GENERICMACHINES:
        raise OSError(
            errno.ENOSYS, f"laminae has no btrfs ioctl encoding for machine {MACHINE!r}", path
        )
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None


def _open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _split_new(path: str) -> tuple[str, bytes]:
    """The parent directory of ``path`` and its last component, checked as a name."""
    # Not normpath: it would turn "a/.." into "" and "a/." into "a", naming another directory.
    parent, name = os.path.split(path.rstrip("/"))
    raw = os.fsencode(name)
    if not raw or raw in (b".", b"..") or len(raw) > 255:
        raise OSError(errno.EINVAL, "not a usable subvolume name", path)
    return parent or ".", raw


def is_subvolume(path: str) -> bool:
    """Whether ``path`` is the root of a btrfs subvolume (inode 256 of a btrfs directory).

    Symlinks are not followed; a missing path is not a subvolume.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_ino != FIRST_FREE_OBJECTID:
        return False
    return statfs_type(path) == BTRFS_SUPER_MAGIC


def subvolume_id(path: str) -> int:
    """The id (tree id) of the subvolume holding ``path``: ``BTRFS_IOC_INO_LOOKUP``."""
    args = _BtrfsInoLookupArgs(treeid=0, objectid=FIRST_FREE_OBJECTID)
    with closing_fd(_open_dir(path)) as fd:
        _btrfs_ioctl(fd, _BTRFS_IOC_INO_LOOKUP, args, path)
    return int(args.treeid)


def create_subvolume(path: str) -> None:
    """Create an empty subvolume at ``path``: ``BTRFS_IOC_SUBVOL_CREATE_V2``.

    Its root directory's mode follows the umask; set it afterwards.

    :raises OSError: ``EEXIST``, ``ENOENT`` (no parent), ``ENOTTY`` (not btrfs), ...
    """
    parent, name = _split_new(path)
    args = _BtrfsVolArgsV2(name=name)
    with closing_fd(_open_dir(parent)) as fd:
        _btrfs_ioctl(fd, _BTRFS_IOC_SUBVOL_CREATE_V2, args, path)


def create_snapshot(source: str, path: str, *, readonly: bool = False) -> None:
    """Snapshot subvolume ``source`` at ``path``: ``BTRFS_IOC_SNAP_CREATE_V2``.

    Constant time whatever ``source`` holds: the snapshot shares its tree. Subvolumes nested
    in ``source`` are not part of it (they show as empty directories).

    :param readonly: make the snapshot read-only (``BTRFS_SUBVOL_RDONLY``).
    :raises OSError: ``EINVAL`` when ``source`` is not a subvolume root, ``EXDEV`` across
        filesystems, ``EEXIST`` ...
    """
    parent, name = _split_new(path)
    with closing_fd(_open_dir(source)) as source_fd, closing_fd(_open_dir(parent)) as fd:
        args = _BtrfsVolArgsV2(
            fd=source_fd, flags=_BTRFS_SUBVOL_RDONLY if readonly else 0, name=name
        )
        _btrfs_ioctl(fd, _BTRFS_IOC_SNAP_CREATE_V2, args, path)


def delete_subvolume(path: str) -> None:
    """Delete the subvolume at ``path`` in one call: ``BTRFS_IOC_SNAP_DESTROY_V2``.

    The name goes at once; the kernel's cleaner frees the blocks afterwards. Read-only
    subvolumes can be deleted; their parent directory must be writable.

    :raises OSError: ``ENOTEMPTY`` while subvolumes are nested in it, ``EINVAL`` for a path
        that is not a subvolume root, ``EPERM`` for the default subvolume, ...
    """
    parent, name = _split_new(path)
    args = _BtrfsVolArgsV2(name=name)
    with closing_fd(_open_dir(parent)) as fd:
        _btrfs_ioctl(fd, _BTRFS_IOC_SNAP_DESTROY_V2, args, path)


def get_readonly(path: str) -> bool:
    """Whether subvolume ``path`` is read-only: ``BTRFS_IOC_SUBVOL_GETFLAGS``."""
    flags = ctypes.c_uint64()
    with closing_fd(_open_dir(path)) as fd:
        _btrfs_ioctl(fd, _BTRFS_IOC_SUBVOL_GETFLAGS, flags, path)
    return bool(flags.value & _BTRFS_SUBVOL_RDONLY)


def set_readonly(path: str, readonly: bool) -> None:
    """Make subvolume ``path`` read-only or writable: ``BTRFS_IOC_SUBVOL_SETFLAGS``.

    A read-only subvolume refuses every change with ``EROFS``, whatever the mount says.
    The kernel commits a transaction for it.

    :raises OSError: ``EINVAL`` when ``path`` is not a subvolume root.
    """
    flags = ctypes.c_uint64()
    with closing_fd(_open_dir(path)) as fd:
        _btrfs_ioctl(fd, _BTRFS_IOC_SUBVOL_GETFLAGS, flags, path)
        wanted = (
            flags.value | _BTRFS_SUBVOL_RDONLY if readonly else flags.value & ~_BTRFS_SUBVOL_RDONLY
        )
        if wanted != flags.value:
            _btrfs_ioctl(fd, _BTRFS_IOC_SUBVOL_SETFLAGS, ctypes.c_uint64(wanted), path)


@attrs.frozen
class Item:
    """One item found by a tree search: its key and its bytes (little-endian, on-disk)."""

    objectid: int
    type: int
    offset: int
    data: bytes


def tree_search(
    path: str,
    tree_id: int,
    item_type: int,
    *,
    min_objectid: int = 0,
    max_objectid: int = _U64_MAX,
    min_offset: int = 0,
    max_offset: int = _U64_MAX,
) -> Iterator[Item]:
    """Items of ``item_type`` in tree ``tree_id`` with keys in the given range, in key order:
    ``BTRFS_IOC_TREE_SEARCH`` (needs ``CAP_SYS_ADMIN``).

    The kernel searches the range of whole keys from (min_objectid, item_type, min_offset)
    to (max_objectid, item_type, max_offset), which holds other types too; they are skipped.

    :raises OSError: ``ENOENT`` for a tree that does not exist (the quota tree with quota
        off), ``EPERM`` without ``CAP_SYS_ADMIN``.
    """
    header = struct.Struct("<QQQII")  # struct btrfs_ioctl_search_header
    args = _BtrfsSearchArgs()
    key = args.key
    key.tree_id = tree_id
    key.min_objectid, key.max_objectid = min_objectid, max_objectid
    key.min_offset, key.max_offset = min_offset, max_offset
    key.min_type = key.max_type = item_type
    key.min_transid, key.max_transid = 0, _U64_MAX
    with closing_fd(_open_dir(path)) as fd:
        while True:
            key.nr_items = 4096
            _btrfs_ioctl(fd, _BTRFS_IOC_TREE_SEARCH, args, path)
            if key.nr_items == 0:
                return
            buffer = bytes(args.buf)
            position = 0
            objectid = offset = type_ = 0
            for _ in range(key.nr_items):
                _, objectid, offset, type_, length = header.unpack_from(buffer, position)
                position += header.size
                if type_ == item_type:
                    yield Item(objectid, type_, offset, buffer[position : position + length])
                position += length
            # Resume just after the last key returned, in whole-key order (btrfs-progs does
            # the same); the range ends at (max_objectid, item_type, max_offset).
            if offset < _U64_MAX:
                following = (objectid, type_, offset + 1)
            elif type_ < 0xFF:
                following = (objectid, type_ + 1, 0)
            elif objectid < _U64_MAX:
                following = (objectid + 1, 0, 0)
            else:
                return
            if following > (key.max_objectid, item_type, key.max_offset):
                return
            key.min_objectid, key.min_type, key.min_offset = following


def _ino_path(fd: int, tree_id: int, inode: int, path: str) -> str:
    """The path of directory ``inode`` inside subvolume ``tree_id`` ("" for its root)."""
    args = _BtrfsInoLookupArgs(treeid=tree_id, objectid=inode)
    _btrfs_ioctl(fd, _BTRFS_IOC_INO_LOOKUP, args, path)
    return os.fsdecode(args.name)


@attrs.frozen
class Subvolume:
    """A subvolume found below another: its id, the id of the subvolume holding it, its path."""

    id: int
    parent_id: int
    path: str


def nested_subvolumes(path: str) -> list[Subvolume]:
    """Every subvolume below subvolume ``path``, at any depth, parents before children.

    Read from the root tree's ``ROOT_REF`` items, not by walking the files, so the cost
    grows with the number of subvolumes, not of files. Needs ``CAP_SYS_ADMIN``.
    Subvolumes deleted but not yet cleaned are not listed.
    """
    found: list[Subvolume] = []
    pending = [Subvolume(subvolume_id(path), 0, os.path.normpath(path))]
    with closing_fd(_open_dir(path)) as fd:
        while pending:
            parent = pending.pop()
            for item in tree_search(
                path,
                _BTRFS_ROOT_TREE_OBJECTID,
                _BTRFS_ROOT_REF_KEY,
                min_objectid=parent.id,
                max_objectid=parent.id,
            ):
                # struct btrfs_root_ref (packed): dirid, sequence, name_len, then the name.
                dirid, _, name_len = struct.unpack_from("<QQH", item.data)
                name = os.fsdecode(item.data[18 : 18 + name_len])
                where = _ino_path(fd, parent.id, dirid, path)
                child = Subvolume(item.offset, parent.id, os.path.join(parent.path, where, name))
                found.append(child)
                pending.append(child)
    return found


def sync(path: str) -> None:
    """Commit the filesystem holding ``path`` and wake its cleaner: ``BTRFS_IOC_SYNC``.

    Unlike :func:`syncfs`, this also starts the cleaning of deleted subvolumes now rather
    than at the next periodic commit (30 s by default).
    """
    with closing_fd(_open_dir(path)) as fd:
        _btrfs_ioctl(fd, _BTRFS_IOC_SYNC, 0, path)


def wait_subvolume_cleaned(path: str, subvolid: int) -> None:
    """Wait until deleted subvolume ``subvolid`` of the filesystem holding ``path`` is
    cleaned (its blocks freed): ``BTRFS_IOC_SUBVOL_SYNC_WAIT`` (Linux 6.13+).

    Returns at once for a subvolume that is gone already.

    :raises OSError: ``ENOTTY`` before Linux 6.13.
    """
    args = _BtrfsSubvolWait(subvolid=subvolid, mode=_BTRFS_SUBVOL_SYNC_WAIT_FOR_ONE)
    with closing_fd(_open_dir(path)) as fd:
        try:
            _btrfs_ioctl(fd, _BTRFS_IOC_SUBVOL_SYNC_WAIT, args, path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # not queued: cleaned, or never deleted
                raise


# --- btrfs quotas (qgroups) -------------------------------------------------------------------


def qgroup_id(subvolid: int, level: int = 0) -> int:
    """The qgroup id ``level/subvolid`` as the kernel packs it (level in the top 16 bits)."""
    return (level << 48) | subvolid


@attrs.frozen
class QuotaStatus:
    """The quota tree's status item.

    :param flags: ``BTRFS_QGROUP_STATUS_FLAG_*``.
    """

    flags: int

    @property
    def rescanning(self) -> bool:
        """A rescan is rebuilding the numbers."""
        return bool(self.flags & _BTRFS_QGROUP_STATUS_FLAG_RESCAN)

    @property
    def inconsistent(self) -> bool:
        """The kernel marked the numbers wrong (``BTRFS_QGROUP_STATUS_FLAG_INCONSISTENT``):
        limits are not enforced from right counts until a rescan rebuilds them."""
        return bool(self.flags & _BTRFS_QGROUP_STATUS_FLAG_INCONSISTENT)

    @property
    def consistent(self) -> bool:
        """The numbers can be trusted: not marked inconsistent, no rescan running."""
        return not self.flags & (
            _BTRFS_QGROUP_STATUS_FLAG_INCONSISTENT | _BTRFS_QGROUP_STATUS_FLAG_RESCAN
        )


@attrs.frozen
class Qgroup:
    """One qgroup's numbers as last committed.

    :param referenced: bytes its subvolumes reference, shared extents included.
    :param exclusive: bytes referenced by its subvolumes only.
    :param max_referenced: its limit on ``referenced``, ``None`` if unlimited.
    """

    id: int
    referenced: int
    exclusive: int
    max_referenced: int | None


def quota_status(path: str) -> QuotaStatus | None:
    """The quota status of the filesystem holding ``path``; ``None`` when quota is off.

    Read from the committed quota tree: call :func:`syncfs` first for current numbers.
    """
    try:
        items = list(
            tree_search(path, _BTRFS_QUOTA_TREE_OBJECTID, _BTRFS_QGROUP_STATUS_KEY, max_objectid=0)
        )
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # no quota tree: quota was never enabled, or disabled
            return None
        raise
    if not items:
        return None
    # struct btrfs_qgroup_status_item: version, generation, flags, rescan (, enable_gen).
    _, _, flags = struct.unpack_from("<QQQ", items[0].data)
    if not flags & _BTRFS_QGROUP_STATUS_FLAG_ON:
        return None
    return QuotaStatus(flags)


def quota_enable(path: str) -> None:
    """Enable quota (qgroups) on the filesystem holding ``path``: ``BTRFS_IOC_QUOTA_CTL``.

    Harmless when enabled already. The kernel makes a qgroup for every subvolume and starts
    a rescan; :func:`quota_rescan_wait` waits for it.
    """
    args = _BtrfsQuotaCtlArgs(cmd=_BTRFS_QUOTA_CTL_ENABLE)
    with closing_fd(_open_dir(path)) as fd:
        _btrfs_ioctl(fd, _BTRFS_IOC_QUOTA_CTL, args, path)


def quota_rescan(path: str) -> bool:
    """Start a rescan that rebuilds every qgroup's numbers: ``BTRFS_IOC_QUOTA_RESCAN``.

    The rescan clears the inconsistent flag when it finishes; :func:`quota_rescan_wait`
    waits for it.

    :returns: ``False`` when a rescan was running already (``EINPROGRESS``).
    :raises OSError: ``ENOTCONN`` with quota off.
    """
    args = _BtrfsQuotaRescanArgs()
    with closing_fd(_open_dir(path)) as fd:
        try:
            _btrfs_ioctl(fd, _BTRFS_IOC_QUOTA_RESCAN, args, path)
        except OSError as exc:
            if exc.errno == errno.EINPROGRESS:
                return False
            raise
    return True


def quota_rescan_wait(path: str) -> None:
    """Wait for a running quota rescan to finish: ``BTRFS_IOC_QUOTA_RESCAN_WAIT``.

    Returns at once when none runs.
    """
    with closing_fd(_open_dir(path)) as fd:
        _btrfs_ioctl(fd, _BTRFS_IOC_QUOTA_RESCAN_WAIT, 0, path)


def qgroup_create(path: str, qgroupid: int) -> None:
    """Create qgroup ``qgroupid``: ``BTRFS_IOC_QGROUP_CREATE``.

    :raises OSError: ``EEXIST`` when it exists, ``ENOTCONN`` with quota off.
    """
    args = _BtrfsQgroupCreateArgs(create=1, qgroupid=qgroupid)
    with closing_fd(_open_dir(path)) as fd:
        _btrfs_ioctl(fd, _BTRFS_IOC_QGROUP_CREATE, args, path)


def qgroup_destroy(path: str, qgroupid: int) -> None:
    """Destroy qgroup ``qgroupid``: ``BTRFS_IOC_QGROUP_CREATE`` with ``create = 0``.

    :raises OSError: ``ENOENT`` when there is none, ``EBUSY`` while its subvolume still
        exists (Linux 6.10+ refuses until the cleaner has dropped it, then removes the
        qgroup itself), ``ENOTCONN`` with quota off.
    """
    args = _BtrfsQgroupCreateArgs(create=0, qgroupid=qgroupid)
    with closing_fd(_open_dir(path)) as fd:
        _btrfs_ioctl(fd, _BTRFS_IOC_QGROUP_CREATE, args, path)


def qgroup_limit(path: str, qgroupid: int, max_referenced: int | None) -> None:
    """Limit the bytes qgroup ``qgroupid`` may reference (``None``: no limit):
    ``BTRFS_IOC_QGROUP_LIMIT`` on ``max_rfer``.

    Past the limit, writes into its subvolume fail with ``EDQUOT``.
    """
    value = _U64_MAX if max_referenced is None else max_referenced  # (u64)-1 clears
    args = _BtrfsQgroupLimitArgs(
        qgroupid=qgroupid, lim=_BtrfsQgroupLimit(flags=_BTRFS_QGROUP_LIMIT_MAX_RFER, max_rfer=value)
    )
    with closing_fd(_open_dir(path)) as fd:
        _btrfs_ioctl(fd, _BTRFS_IOC_QGROUP_LIMIT, args, path)


def qgroups(path: str) -> dict[int, Qgroup]:
    """Every qgroup of the filesystem holding ``path``, by id; empty with quota off.

    The numbers are those of the last committed transaction: :func:`syncfs` first.
    """
    try:
        infos = list(
            tree_search(path, _BTRFS_QUOTA_TREE_OBJECTID, _BTRFS_QGROUP_INFO_KEY, max_objectid=0)
        )
        limits = {
            item.offset: item.data
            for item in tree_search(
                path, _BTRFS_QUOTA_TREE_OBJECTID, _BTRFS_QGROUP_LIMIT_KEY, max_objectid=0
            )
        }
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return {}
        raise
    result = {}
    for item in infos:
        # struct btrfs_qgroup_info_item: generation, rfer, rfer_cmpr, excl, excl_cmpr.
        _, rfer, _, excl, _ = struct.unpack_from("<QQQQQ", item.data)
        maximum = None
        if item.offset in limits:
            # struct btrfs_qgroup_limit_item: flags, max_rfer, max_excl, rsv_rfer, rsv_excl.
            flags, max_rfer = struct.unpack_from("<QQ", limits[item.offset])
            if flags & _BTRFS_QGROUP_LIMIT_MAX_RFER and max_rfer != _U64_MAX:
                maximum = max_rfer
        result[item.offset] = Qgroup(item.offset, rfer, excl, maximum)
    return result
