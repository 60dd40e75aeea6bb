"""The btrfs driver: every layer is a subvolume, and a child is a snapshot of its parent.

Creating a layer on a parent costs one snapshot ioctl, whatever the parent holds: the child
shares the parent's tree until one of them writes. Committed layers are made read-only
subvolumes, views are read-only snapshots, and removing a layer is one subvolume deletion per
subvolume (nested ones first), never a walk that unlinks file by file (podman#26975).
Every kernel call is an ioctl (:mod:`laminae.driverkit.btrfs`); no ``btrfs`` process runs.

On disk, below ``home`` (which must be on btrfs)::

    subvolumes/<id>     a layer: a subvolume (read-only once committed, and for views)
    qgroups-pending     qgroup ids whose subvolume the kernel had not yet dropped when its
                        layer went; retried on later removals and on close

Quotas (:attr:`Feature.QUOTA`): :meth:`BtrfsDriver.set_quota` turns btrfs quota on when it is
off, and limits the referenced bytes (``max_rfer``) of the layer's qgroup ``0/<subvolid>``,
as Moby's and containers-storage's btrfs drivers do: the limit counts what the layer
references, its parent's shared content included. The ``size`` option (``storage.toml``:
``[storage.options.btrfs] size = "10G"``) sets that limit on every writable layer at create;
a layer the store fills from a tar (:attr:`Feature.APPLY`: an image's layer being imported)
has it lifted first, so ``size`` bounds what containers write, never what images hold.

A filesystem whose qgroup numbers the kernel marked inconsistent enforces limits against wrong
counts. Opening the driver, and setting a limit, check the quota status: an inconsistent one
starts a rescan (setting a limit waits for it), and a warning goes to the
``laminae.drivers.btrfs`` logger.

Committed layers (:attr:`Feature.COMMIT`): the store calls :meth:`BtrfsDriver.commit`, which
makes the layer a read-only subvolume. ``create`` also freezes a parent that is not frozen
yet (only committed layers have children), for layers committed before the store called it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, ClassVar, Final, final

from laminae.driverkit import (
    BTRFS_SUPER_MAGIC,
    AlreadyExists,
    Capabilities,
    DriverUnavailable,
    Feature,
    InvalidArgument,
    LaminaeError,
    Limits,
    MountSpec,
    NotFound,
    Usage,
    apply_tar,
    btrfs,
    check_storage_id,
    is_storage_id,
    map_os_errors,
    mountinfo,
    parse_size,
    statfs_type,
    syncfs,
    tree_usage,
)

__all__ = ["BtrfsDriver"]

_OPTIONS: Final = frozenset({"size"})
_PENDING: Final = "qgroups-pending"

_log: Final = logging.getLogger("laminae.drivers.btrfs")


def _parse_options(options: Mapping[str, str]) -> int | None:
    """The ``size`` option in bytes, or ``None``.

    :raises InvalidArgument: an unknown option, or a size that is not one.
    """
    for key in options:
        if key not in _OPTIONS:
            raise InvalidArgument(f"btrfs: unknown option {key!r} (known: size)")
    if "size" not in options:
        return None
    try:
        return parse_size(options["size"])
    except InvalidArgument as exc:
        raise InvalidArgument(f"btrfs: option size: {exc}") from exc


def _nearest_existing(path: Path) -> Path:
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def _filesystem_type(path: Path) -> str:
    """The type of the filesystem mounted where ``path`` lives, from mountinfo."""
    real = os.path.realpath(path)
    best, fs_type = "", "unknown"
    for entry in mountinfo():
        point = entry.mount_point.rstrip("/") + "/"
        if (real + "/").startswith(point) and len(point) > len(best):
            best, fs_type = point, entry.fs_type
    return fs_type


@final
class BtrfsDriver:
    """Layers as btrfs subvolumes and snapshots. See the module docstring for the layout."""

    name: ClassVar[str] = "btrfs"
    # A snapshot holds its whole tree: depth costs nothing at mount time, so the limit is
    # vfs's (Moby's layer store stops at 125 anyway).
    capabilities: ClassVar[Capabilities] = Capabilities(
        features=frozenset({Feature.QUOTA, Feature.COMMIT, Feature.APPLY}),
        max_depth=1000,
        needs_root=True,
        independent_layers=False,
    )

    __slots__ = ("_home", "_size", "_subvolumes")

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, str]) -> None:
        """btrfs runs as root where ``home`` (or its nearest existing ancestor) is on btrfs.

        :raises InvalidArgument: a bad option.
        :raises DriverUnavailable: not root, or not on btrfs (naming the filesystem found).
        """
        _parse_options(options)
        if os.geteuid() != 0:
            raise DriverUnavailable(
                "btrfs needs root for subvolume, quota and tree-search ioctls and for bind "
                f"mounts (running as uid {os.geteuid()})"
            )
        existing = _nearest_existing(home)
        try:
            magic = statfs_type(str(existing))
        except OSError as exc:
            raise DriverUnavailable(f"btrfs: cannot examine {existing}: {exc.strerror}") from exc
        if magic != BTRFS_SUPER_MAGIC:
            raise DriverUnavailable(
                f"btrfs: {existing} is on {_filesystem_type(existing)}, not on btrfs "
                "(put the store's root on a btrfs filesystem)"
            )

    def __init__(self, home: Path, options: Mapping[str, str]) -> None:
        self._size = _parse_options(options)
        self._home = Path(home)
        self._subvolumes = self._home / "subvolumes"
        with map_os_errors(f"btrfs: prepare {self._subvolumes}"):
            # 0700: layer roots hold setuid binaries that other users must not reach
            # (CVE-2021-41091 was this hole in Moby's overlay2 home).
            self._home.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._subvolumes.mkdir(mode=0o700, exist_ok=True)
        # Not waited for here: opening must not block on a large filesystem's rescan; setting
        # a limit waits. Nor fatal: a store that sets no limit works without it (the warning
        # is logged before the rescan is asked for).
        with contextlib.suppress(OSError):
            self._rescan_if_inconsistent(str(self._subvolumes), wait=False)

    # -- layers ------------------------------------------------------------------------------

    def create(self, id: str, parents: Sequence[str], writable: bool) -> None:
        """Create layer ``id``: an empty subvolume (mode 0755), or a snapshot of
        ``parents[0]``, read-only unless ``writable``.

        ``parents[0]`` is committed (the store makes children of committed layers only), so
        it is frozen first if it is not yet. With the ``size`` option, a writable layer gets
        that quota; otherwise a snapshot has none (not even its parent's).

        :raises AlreadyExists: ``id`` is on disk already.
        :raises NotFound: ``parents[0]`` is not on disk.
        """
        check_storage_id(id)
        path = self._subvolumes / id
        if os.path.lexists(path):
            raise AlreadyExists(f"btrfs: layer {id} exists")
        source = None
        if parents:
            source = self._layer(parents[0], what="parent layer")
        with map_os_errors(f"btrfs: create layer {id}"):
            if source is not None:
                btrfs.set_readonly(str(source), True)
                btrfs.create_snapshot(str(source), str(path), readonly=not writable)
            else:
                btrfs.create_subvolume(str(path))
            try:
                if source is None:
                    os.chmod(path, 0o755)  # whatever the umask
                    os.chown(path, 0, 0)
                    if not writable:
                        btrfs.set_readonly(str(path), True)
                if writable and self._size is not None:
                    self._limit(path, self._size)
                elif source is not None:
                    self._drop_inherited_limit(path)
            except BaseException:
                # The original failure is the one to report, not a cleanup hiccup.
                with contextlib.suppress(OSError):
                    btrfs.delete_subvolume(str(path))
                raise

    def commit(self, id: str) -> None:
        """Freeze layer ``id``: make its subvolume read-only, for good (:attr:`Feature.COMMIT`).

        ``create`` also freezes a parent that is not frozen yet, for stores made before the
        store called this.

        :raises NotFound: ``id`` is not on disk.
        """
        path = self._layer(id)
        with map_os_errors(f"btrfs: freeze layer {id}"):
            btrfs.set_readonly(str(path), True)

    def remove(self, id: str) -> None:
        """Remove layer ``id``: delete the subvolumes a container nested in it, deepest
        first, then its own; and their qgroups when quota is on.

        Each is one ioctl; nothing is unlinked file by file. Read-only subvolumes that hold
        nested ones are made writable first (the nested names live in them).

        :raises NotFound: ``id`` is not on disk.
        """
        path = self._layer(id)
        with map_os_errors(f"btrfs: remove layer {id}"):
            own = btrfs.subvolume_id(str(path))
            nested = btrfs.nested_subvolumes(str(path))
            holders = {sub.parent_id for sub in nested}
            for sub in [btrfs.Subvolume(own, 0, str(path)), *nested]:
                if sub.id in holders:
                    btrfs.set_readonly(sub.path, False)
            # nested lists parents before children: reversed, every child goes first.
            for sub in reversed(nested):
                btrfs.delete_subvolume(sub.path)
            btrfs.delete_subvolume(str(path))
            if btrfs.quota_status(str(self._subvolumes)) is not None:
                self._drop_qgroups([own, *(sub.id for sub in nested)])

    def apply(self, id: str, parents: Sequence[str], tar: BinaryIO, limits: object) -> None:
        """Write ``tar`` straight into layer ``id``'s subvolume (a snapshot of its parent, so
        whiteouts delete what the parent had), with no mount.

        A limit from the ``size`` option goes first: it bounds containers, and a layer being
        applied is image content.

        :raises NotFound: ``id`` is not on disk.
        """
        if not isinstance(limits, Limits):
            raise InvalidArgument(f"btrfs: apply limits {limits!r} are not laminae.Limits")
        path = self._layer(id)
        if self._size is not None:
            with map_os_errors(f"btrfs: lift the size limit of layer {id}"):
                self._drop_limit(path)
        apply_tar(path, tar, limits=limits)

    def mounts(self, id: str, parents: Sequence[str], readonly: bool) -> list[MountSpec]:
        """One bind of the layer's subvolume, ``ro`` when ``readonly``.

        :raises NotFound: ``id`` is not on disk.
        """
        path = self._layer(id)
        return [
            MountSpec(type="bind", source=str(path), options=("rbind", "ro" if readonly else "rw"))
        ]

    def usage(self, id: str) -> Usage:
        """Bytes and inodes layer ``id`` references.

        With quota on (and its numbers consistent), the bytes are the qgroup's referenced
        bytes, read in constant time after a commit, and the inodes a count of directory
        entries (no ``stat`` per file). Otherwise a walk adds up allocated blocks, each
        hardlinked inode once. Either way the parent's shared content counts: an upper
        bound, as the contract allows.

        :raises NotFound: ``id`` is not on disk.
        """
        path = self._layer(id)
        with map_os_errors(f"btrfs: usage of layer {id}"):
            status = btrfs.quota_status(str(path))
            if status is not None and status.consistent:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    syncfs(fd)  # qgroup numbers change at transaction commit
                finally:
                    os.close(fd)
                subvolid = btrfs.subvolume_id(str(path))
                qgroup = btrfs.qgroups(str(path)).get(btrfs.qgroup_id(subvolid))
                if qgroup is not None:
                    return Usage(size=qgroup.referenced, inodes=1 + _count_entries(str(path)))
            return tree_usage(path)

    def layers(self) -> list[str]:
        """The storage ids under ``subvolumes/`` that are subvolumes, sorted."""
        with (
            map_os_errors(f"btrfs: list {self._subvolumes}"),
            os.scandir(self._subvolumes) as entries,
        ):
            return sorted(
                entry.name
                for entry in entries
                if is_storage_id(entry.name)
                and entry.is_dir(follow_symlinks=False)
                # d_ino of a subvolume's entry is its tree id; its root is inode 256.
                and entry.stat(follow_symlinks=False).st_ino == btrfs.FIRST_FREE_OBJECTID
            )

    def close(self) -> None:
        """Retry dropping the qgroups of removed layers that the kernel still held."""
        with contextlib.suppress(OSError):
            if os.path.exists(self._home / _PENDING):
                self._drop_qgroups([])

    # -- quotas ------------------------------------------------------------------------------

    def set_quota(self, id: str, size: int) -> None:
        """Limit the bytes layer ``id`` references to ``size``; writing more fails with
        ``EDQUOT``.

        Turns quota on for the whole filesystem if it is off (and waits for the kernel's
        first count), and makes the layer's qgroup if it has none.

        :raises InvalidArgument: ``size`` is not positive.
        :raises NotFound: ``id`` is not on disk.
        """
        if size <= 0:
            raise InvalidArgument(f"btrfs: quota size {size!r}: must be positive")
        path = self._layer(id)
        with map_os_errors(f"btrfs: set quota of layer {id}"):
            self._limit(path, size)

    def _limit(self, path: Path, size: int) -> None:
        where = str(path)
        if btrfs.quota_status(where) is None:
            btrfs.quota_enable(where)
            # Enabling starts a rescan; limits are only as good as the numbers behind them.
            btrfs.quota_rescan_wait(where)
        else:
            self._rescan_if_inconsistent(where, wait=True)
        qgroup = btrfs.qgroup_id(btrfs.subvolume_id(where))
        # With quota on, the kernel makes 0/<id> with every subvolume (and for every existing
        # one when quota is turned on); this covers a qgroup somebody destroyed by hand.
        if qgroup not in btrfs.qgroups(where):
            btrfs.qgroup_create(where, qgroup)
        btrfs.qgroup_limit(where, qgroup, size)

    @staticmethod
    def _rescan_if_inconsistent(where: str, *, wait: bool) -> None:
        """Rebuild qgroup numbers the kernel marked inconsistent, and say so; with ``wait``,
        also wait for any rescan running (then limits count from right numbers)."""
        status = btrfs.quota_status(where)
        if status is None:
            return
        if status.inconsistent and not status.rescanning:
            _log.warning(
                "btrfs: qgroup numbers of the filesystem holding %s are inconsistent, so size "
                "limits are not enforced right; rescanning them",
                where,
            )
            btrfs.quota_rescan(where)
        if wait and not status.consistent:
            btrfs.quota_rescan_wait(where)

    def _drop_limit(self, path: Path) -> None:
        """Lift any limit on the layer's qgroup."""
        where = str(self._subvolumes)
        if btrfs.quota_status(where) is None:
            return
        qgroup = btrfs.qgroup_id(btrfs.subvolume_id(str(path)))
        numbers = btrfs.qgroups(where).get(qgroup)
        if numbers is not None and numbers.max_referenced is not None:
            # Through the store's directory, not the layer: the ioctl's transaction is
            # charged to the subvolume it is issued on, and a layer already past its limit
            # (a snapshot of a larger parent) would refuse even the lift with EDQUOT.
            btrfs.qgroup_limit(where, qgroup, None)

    def _drop_inherited_limit(self, path: Path) -> None:
        """A snapshot's qgroup copies its source's limit (btrfs_qgroup_inherit): a layer's
        limit is its own, so a copied one goes."""
        self._drop_limit(path)

    def _drop_qgroups(self, subvolids: Sequence[int]) -> None:
        """Destroy the qgroups of deleted subvolumes ``subvolids`` and of earlier ones still
        pending; keep in ``qgroups-pending`` those the kernel refuses yet.

        Since Linux 6.8 (and its stable backports) a subvolume's qgroup cannot go while the
        cleaner has not dropped the subvolume (``EBUSY``); since 6.10 the kernel then
        removes it itself. Retrying later covers the kernels in between (moby#29325 was the
        same leak with a driver that never tried).
        """
        pending_file = self._home / _PENDING
        try:
            pending = {int(line) for line in pending_file.read_text().split()}
        except FileNotFoundError:
            pending = set()
        still = set()
        where = str(self._subvolumes)
        for subvolid in sorted(pending | set(subvolids)):
            try:
                btrfs.qgroup_destroy(where, btrfs.qgroup_id(subvolid))
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    still.add(subvolid)
                elif exc.errno not in (errno.ENOENT, errno.ENOTCONN):  # gone; quota off
                    raise
        if still:
            staging = pending_file.with_name(f"{_PENDING}.{os.getpid()}")
            staging.write_text("".join(f"{i}\n" for i in sorted(still)))
            os.replace(staging, pending_file)
        elif pending:
            pending_file.unlink(missing_ok=True)

    # -- paths -------------------------------------------------------------------------------

    def _layer(self, id: str, *, what: str = "layer") -> Path:
        check_storage_id(id)
        path = self._subvolumes / id
        try:
            is_subvolume = btrfs.is_subvolume(str(path))
        except OSError as exc:
            raise LaminaeError(f"btrfs: examine {what} {id}: {exc.strerror}") from exc
        if not is_subvolume:
            if os.path.lexists(path):
                raise LaminaeError(f"btrfs: {path} is not a subvolume; it is not a layer")
            raise NotFound(f"btrfs: {what} {id} is not on disk")
        return path


def _count_entries(top: str) -> int:
    """Directory entries below ``top`` (hardlinks counted each time), with no ``stat``:
    ``readdir`` gives each entry's type."""
    count = 0
    pending = [top]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                count += 1
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return count
