"""The toolkit for writing a laminae storage driver: the contract, and what drivers are made of.

A driver keeps layers on disk; the store keeps everything else (the graph, names, digests,
mounts, locks). This namespace is everything a driver may use, the built-in ``vfs``,
``overlay`` and ``btrfs`` drivers included: they import nothing else of laminae, so a
third-party driver can do all that they do. Store users want :mod:`laminae` instead.

Writing a driver
----------------
A class with a ``name``, its :class:`Capabilities` and the methods of :class:`Driver`,
registered by a pluggy hook in a module named by a ``laminae.drivers`` entry point::

    import shutil
    from pathlib import Path

    from laminae.driverkit import (
        Capabilities, DriverRegistry, InvalidArgument, MountSpec, Usage, check_storage_id,
        hookimpl, is_storage_id, map_os_errors, tree_usage,
    )

    class CopyDriver:
        name = "copy"
        capabilities = Capabilities(needs_root=False)

        @classmethod
        def probe(cls, home: Path, options: dict[str, str]) -> None:
            if options:
                raise InvalidArgument(f"copy: unknown options {sorted(options)}")

        def __init__(self, home: Path, options: dict[str, str]) -> None:
            self.home = Path(home)
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)

        def _path(self, id: str) -> Path:
            check_storage_id(id)
            return self.home / id

        def create(self, id: str, parents: list[str], writable: bool) -> None:
            with map_os_errors(f"copy: create layer {id}"):  # EEXIST: AlreadyExists...
                if parents:
                    shutil.copytree(self._path(parents[0]), self._path(id), symlinks=True)
                else:
                    self._path(id).mkdir(mode=0o755)

        def remove(self, id: str) -> None:
            with map_os_errors(f"copy: remove layer {id}"):  # ENOENT: NotFound
                shutil.rmtree(self._path(id))

        def mounts(self, id: str, parents: list[str], readonly: bool) -> list[MountSpec]:
            mode = "ro" if readonly else "rw"
            return [MountSpec(type="bind", source=str(self._path(id)), options=("rbind", mode))]

        def usage(self, id: str) -> Usage:
            return tree_usage(self._path(id))

        def layers(self) -> list[str]:
            return sorted(p.name for p in self.home.iterdir() if is_storage_id(p.name))

        def close(self) -> None:
            pass

    @hookimpl
    def laminae_register_drivers(register: DriverRegistry) -> None:
        register(CopyDriver, priority=1)

with ``[project.entry-points."laminae.drivers"] copy = "my_package"`` in ``pyproject.toml``.
``pytest --pyargs laminae.conformance --laminae-driver copy`` then checks it against the
contract. ``examples/laminae-blockfile`` in the repository is a whole one.

What is here
------------
The contract
    :class:`Driver`, :class:`Capabilities`, :class:`Feature`, :class:`MountSpec`,
    :class:`Usage` and :func:`tree_usage`; the optional parts a driver declares as features:
    :class:`Applier`, :class:`ChangeReporter`, :class:`Committer`, :class:`DetachedApplier`,
    :class:`QuotaSetter`; storage ids: :func:`check_storage_id`, :func:`is_storage_id`.
Registration
    :data:`hookimpl`, :class:`DriverRegistry` (what the hook is handed) and
    :class:`DriverEntry` (what it records).
Errors
    The ones a driver raises (:class:`LaminaeError` and below; :class:`ParentsNeeded` from a
    detached apply), and :func:`map_os_errors`, which turns an :class:`OSError` into one of
    them at the driver's boundary, keeping it as ``__cause__``.
Layer content
    :class:`Change`, :class:`ChangeKind` and :func:`naive_changes` (the changes of a layer by
    walking it beside its parent); :func:`apply_tar` with :class:`Limits`,
    :class:`WhiteoutMode` and :class:`ApplyResult`; :func:`write_changes_tar`. For layers in
    overlayfs's format applied side by side: :func:`apply_tar_detached`,
    :func:`settle_detached` and :class:`Unsettled`.
Mounts
    The executor that performs :class:`MountSpec` lists (:func:`mount_all`,
    :func:`unmount_all`, :func:`mounted`) as the store does; ``mount(2)`` (:func:`mount`,
    :func:`umount`, the ``MS_*`` and ``MNT_*`` flags), :func:`bind_mount` (read-only all
    the way down), :func:`mount_overlay` and the new mount API (:func:`fsopen`,
    :func:`fsconfig`, :func:`fsmount`, :func:`move_mount`, :func:`open_tree`,
    :func:`mount_setattr` and their constants); the mount table: :func:`mountinfo`,
    :class:`MountInfo`, :func:`mount_points`, :func:`is_mountpoint`.
Loop devices
    :func:`attach_loop`, :func:`detach_loop`, :func:`loop_device_of`.
Files
    :func:`ficlone` (a reflink) and :class:`DataCopier` (a reflink where it can, else a copy
    that keeps holes); :func:`rename_noreplace`; extended attributes with ``bytes`` names,
    which need not be UTF-8: :func:`get_xattr`, :func:`set_xattr`, :func:`list_xattrs`,
    :func:`read_xattrs`, :func:`remove_xattr`.
Filesystems
    :func:`statfs_type` and the magic numbers it returns (:data:`BTRFS_SUPER_MAGIC`, ...);
    :func:`syncfs`.
Options
    :func:`parse_size`, the size parser of ``storage.toml``: ``"64G"`` means the same bytes to
    every driver.
btrfs
    :mod:`laminae.driverkit.btrfs`, imported on its own: subvolumes, snapshots and qgroups.

Kernel calls raise :class:`OSError` naming the path; the rest raise the errors above.
Importing this namespace loads neither the image code nor an HTTP client. See
docs/architecture.md.
"""

import importlib as _importlib

# Names resolve on first use (PEP 562), as in laminae's own namespace: a store that imports one
# size parser, or a driver that needs five names, does not pay for the whole toolkit. Not
# typing.TYPE_CHECKING, for the same reason as there; type checkers take any TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from laminae._exceptions import (
        AlreadyExists,
        CorruptLayer,
        DriverUnavailable,
        FailedPrecondition,
        InvalidArgument,
        LaminaeError,
        LimitExceeded,
        NotFound,
        ParentsNeeded,
        ResourceExhausted,
        Unsupported,
        map_os_errors,
    )
    from laminae.archive._apply import ApplyResult, WhiteoutMode, apply_tar
    from laminae.archive._changes import Change, ChangeKind, naive_changes
    from laminae.archive._limits import Limits
    from laminae.archive._overlayformat import Unsettled, apply_tar_detached, settle_detached
    from laminae.archive._write import write_changes_tar
    from laminae.driverkit._contract import (
        Applier,
        Capabilities,
        ChangeReporter,
        Committer,
        DetachedApplier,
        Driver,
        Feature,
        MountSpec,
        QuotaSetter,
        Usage,
        check_storage_id,
        is_storage_id,
        tree_usage,
    )
    from laminae.driverkit._mount import mount_all, mounted, unmount_all
    from laminae.driverkit._plugins import DriverEntry, DriverRegistry, hookimpl
    from laminae.driverkit._sizes import parse_size
    from laminae.kernel._filecopy import DataCopier, ficlone
    from laminae.kernel._filesystems import (
        BTRFS_SUPER_MAGIC,
        EXT4_SUPER_MAGIC,
        NFS_SUPER_MAGIC,
        OVERLAYFS_SUPER_MAGIC,
        TMPFS_MAGIC,
        statfs_type,
        syncfs,
    )
    from laminae.kernel._loop import attach_loop, detach_loop, loop_device_of
    from laminae.kernel._mountinfo import MountInfo, is_mountpoint, mount_points, mountinfo
    from laminae.kernel._mounts import (
        AT_EMPTY_PATH,
        AT_RECURSIVE,
        FSCONFIG_CMD_CREATE,
        FSCONFIG_SET_FD,
        FSCONFIG_SET_FLAG,
        FSCONFIG_SET_STRING,
        FSMOUNT_CLOEXEC,
        FSOPEN_CLOEXEC,
        MNT_DETACH,
        MNT_FORCE,
        MOUNT_ATTR_NOATIME,
        MOUNT_ATTR_NODEV,
        MOUNT_ATTR_NODIRATIME,
        MOUNT_ATTR_NOEXEC,
        MOUNT_ATTR_NOSUID,
        MOUNT_ATTR_RDONLY,
        MOUNT_ATTR_STRICTATIME,
        MOVE_MOUNT_F_EMPTY_PATH,
        MS_BIND,
        MS_NOATIME,
        MS_NODEV,
        MS_NODIRATIME,
        MS_NOEXEC,
        MS_NOSUID,
        MS_PRIVATE,
        MS_RDONLY,
        MS_REC,
        MS_RELATIME,
        MS_REMOUNT,
        MS_STRICTATIME,
        OPEN_TREE_CLOEXEC,
        OPEN_TREE_CLONE,
        bind_mount,
        fsconfig,
        fsmount,
        fsopen,
        mount,
        mount_overlay,
        mount_setattr,
        move_mount,
        open_tree,
        umount,
    )
    from laminae.kernel._paths import rename_noreplace
    from laminae.kernel._syscalls import AT_FDCWD
    from laminae.kernel._xattrs import get_xattr, list_xattrs, read_xattrs, remove_xattr, set_xattr

_HOMES: dict[str, str] = {
    **dict.fromkeys(
        (
            "AlreadyExists",
            "CorruptLayer",
            "DriverUnavailable",
            "FailedPrecondition",
            "InvalidArgument",
            "LaminaeError",
            "LimitExceeded",
            "NotFound",
            "ParentsNeeded",
            "ResourceExhausted",
            "Unsupported",
            "map_os_errors",
        ),
        "laminae._exceptions",
    ),
    **dict.fromkeys(
        (
            "ApplyResult",
            "WhiteoutMode",
            "apply_tar",
        ),
        "laminae.archive._apply",
    ),
    **dict.fromkeys(
        (
            "Change",
            "ChangeKind",
            "naive_changes",
        ),
        "laminae.archive._changes",
    ),
    **dict.fromkeys(
        ("Limits",),
        "laminae.archive._limits",
    ),
    **dict.fromkeys(
        (
            "Unsettled",
            "apply_tar_detached",
            "settle_detached",
        ),
        "laminae.archive._overlayformat",
    ),
    **dict.fromkeys(
        ("write_changes_tar",),
        "laminae.archive._write",
    ),
    **dict.fromkeys(
        (
            "Applier",
            "Capabilities",
            "ChangeReporter",
            "Committer",
            "DetachedApplier",
            "Driver",
            "Feature",
            "MountSpec",
            "QuotaSetter",
            "Usage",
            "check_storage_id",
            "is_storage_id",
            "tree_usage",
        ),
        "laminae.driverkit._contract",
    ),
    **dict.fromkeys(
        (
            "mount_all",
            "mounted",
            "unmount_all",
        ),
        "laminae.driverkit._mount",
    ),
    **dict.fromkeys(
        (
            "DriverEntry",
            "DriverRegistry",
            "hookimpl",
        ),
        "laminae.driverkit._plugins",
    ),
    **dict.fromkeys(
        ("parse_size",),
        "laminae.driverkit._sizes",
    ),
    **dict.fromkeys(
        (
            "DataCopier",
            "ficlone",
        ),
        "laminae.kernel._filecopy",
    ),
    **dict.fromkeys(
        (
            "BTRFS_SUPER_MAGIC",
            "EXT4_SUPER_MAGIC",
            "NFS_SUPER_MAGIC",
            "OVERLAYFS_SUPER_MAGIC",
            "TMPFS_MAGIC",
            "statfs_type",
            "syncfs",
        ),
        "laminae.kernel._filesystems",
    ),
    **dict.fromkeys(
        (
            "attach_loop",
            "detach_loop",
            "loop_device_of",
        ),
        "laminae.kernel._loop",
    ),
    **dict.fromkeys(
        (
            "MountInfo",
            "is_mountpoint",
            "mount_points",
            "mountinfo",
        ),
        "laminae.kernel._mountinfo",
    ),
    **dict.fromkeys(
        (
            "AT_EMPTY_PATH",
            "AT_RECURSIVE",
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
        ),
        "laminae.kernel._mounts",
    ),
    **dict.fromkeys(
        ("rename_noreplace",),
        "laminae.kernel._paths",
    ),
    **dict.fromkeys(
        ("AT_FDCWD",),
        "laminae.kernel._syscalls",
    ),
    **dict.fromkeys(
        (
            "get_xattr",
            "list_xattrs",
            "read_xattrs",
            "remove_xattr",
            "set_xattr",
        ),
        "laminae.kernel._xattrs",
    ),
}
"""Where each public name lives; it is imported from there on first use."""

# Plain sorted() order, which tests/test_architecture.py holds every public namespace to;
# ruff's isort-style order would put the constants first.
__all__ = [  # noqa: RUF022
    "AT_EMPTY_PATH",
    "AT_FDCWD",
    "AT_RECURSIVE",
    "AlreadyExists",
    "Applier",
    "ApplyResult",
    "BTRFS_SUPER_MAGIC",
    "Capabilities",
    "Change",
    "ChangeKind",
    "ChangeReporter",
    "Committer",
    "CorruptLayer",
    "DataCopier",
    "DetachedApplier",
    "Driver",
    "DriverEntry",
    "DriverRegistry",
    "DriverUnavailable",
    "EXT4_SUPER_MAGIC",
    "FSCONFIG_CMD_CREATE",
    "FSCONFIG_SET_FD",
    "FSCONFIG_SET_FLAG",
    "FSCONFIG_SET_STRING",
    "FSMOUNT_CLOEXEC",
    "FSOPEN_CLOEXEC",
    "FailedPrecondition",
    "Feature",
    "InvalidArgument",
    "LaminaeError",
    "LimitExceeded",
    "Limits",
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
    "MountInfo",
    "MountSpec",
    "NFS_SUPER_MAGIC",
    "NotFound",
    "OPEN_TREE_CLOEXEC",
    "OPEN_TREE_CLONE",
    "OVERLAYFS_SUPER_MAGIC",
    "ParentsNeeded",
    "QuotaSetter",
    "ResourceExhausted",
    "TMPFS_MAGIC",
    "Unsettled",
    "Unsupported",
    "Usage",
    "WhiteoutMode",
    "apply_tar",
    "apply_tar_detached",
    "attach_loop",
    "bind_mount",
    "check_storage_id",
    "detach_loop",
    "ficlone",
    "fsconfig",
    "fsmount",
    "fsopen",
    "get_xattr",
    "hookimpl",
    "is_mountpoint",
    "is_storage_id",
    "list_xattrs",
    "loop_device_of",
    "map_os_errors",
    "mount",
    "mount_all",
    "mount_overlay",
    "mount_points",
    "mount_setattr",
    "mounted",
    "mountinfo",
    "move_mount",
    "naive_changes",
    "open_tree",
    "parse_size",
    "read_xattrs",
    "remove_xattr",
    "rename_noreplace",
    "set_xattr",
    "settle_detached",
    "statfs_type",
    "syncfs",
    "tree_usage",
    "umount",
    "unmount_all",
    "write_changes_tar",
]


if not TYPE_CHECKING:
    # Hidden from type checkers, which see the imports above instead.

    def __getattr__(name: str) -> object:
        """Import a public name on first use, and keep it.

        :raises AttributeError: ``name`` is not in the toolkit.
        """
        module = _HOMES.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(_importlib.import_module(module), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})


del TYPE_CHECKING
