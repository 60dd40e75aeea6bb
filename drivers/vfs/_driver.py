"""The vfs driver: every layer is a plain directory holding a full copy of its parent.

It runs anywhere with a writable directory: no mounts of its own, no special filesystem, no
root (root is needed only to copy other users' files and device nodes). It pays for that in
space and time: a layer costs as much as its whole image, and creating one copies its parent
(see :mod:`._copy`; reflinks make the copy cheap on btrfs and XFS).

On disk, below ``home``::

    dir/<id>/      a layer's root
    tmp-<id>/      a layer being created; renamed to dir/<id> only when complete
    rm-<id>/       a layer being removed; renamed out of dir/ first

So ``dir/`` only ever holds complete layers, whatever happens to this process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, final

from laminae.driverkit import (
    AlreadyExists,
    Capabilities,
    DriverUnavailable,
    InvalidArgument,
    MountSpec,
    NotFound,
    Usage,
    check_storage_id,
    is_storage_id,
    map_os_errors,
    rename_noreplace,
    tree_usage,
)

from ._copy import copy_tree

__all__ = ["VfsDriver"]


def _check_options(options: Mapping[str, str]) -> None:
    for key in options:
        raise InvalidArgument(f"vfs: unknown option {key!r} (vfs takes no options)")


@final
class VfsDriver:
    """Layers as full copies in plain directories. See the module docstring for the layout."""

    name: ClassVar[str] = "vfs"
    # vfs has no stacking limit: a layer is a copy, not a stack. 1000 keeps a conformance run
    # that walks to max_depth to 1000 copies of a small tree, while being far beyond any image
    # (Moby's layer store stops at 125).
    capabilities: ClassVar[Capabilities] = Capabilities(
        features=frozenset(), max_depth=1000, needs_root=False, independent_layers=False
    )

    __slots__ = ("_dir", "_home")

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, str]) -> None:
        """vfs runs wherever ``home`` (or its nearest existing ancestor) is a writable dir.

        :raises InvalidArgument: an option is given (vfs takes none).
        :raises DriverUnavailable: the nearest existing ancestor is not a writable directory.
        """
        _check_options(options)
        existing = Path(os.path.abspath(home))
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise DriverUnavailable(f"vfs: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise DriverUnavailable(f"vfs: {existing} is not writable")

    def __init__(self, home: Path, options: Mapping[str, str]) -> None:
        _check_options(options)
        self._home = Path(home)
        self._dir = self._home / "dir"
        with map_os_errors(f"vfs: prepare {self._dir}"):
            # 0700: layer roots hold setuid binaries that other users must not reach
            # (CVE-2021-41091 was this hole in Moby's overlay2 home).
            self._home.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dir.mkdir(mode=0o700, exist_ok=True)

    def create(self, id: str, parents: Sequence[str], writable: bool) -> None:
        """Create layer ``id``: empty (mode 0755), or a full copy of ``parents[0]``.

        ``writable`` makes no difference: every vfs layer is a plain directory.

        :raises AlreadyExists: ``id`` is on disk already.
        :raises NotFound: ``parents[0]`` is not on disk.
        """
        check_storage_id(id)
        final_path = self._dir / id
        if os.path.lexists(final_path):
            raise AlreadyExists(f"vfs: layer {id} exists")
        source = None
        if parents:
            check_storage_id(parents[0])
            source = self._dir / parents[0]
            if not source.is_dir():
                raise NotFound(f"vfs: parent layer {parents[0]} of {id} is not on disk")
        staging = self._home / f"tmp-{id}"
        with map_os_errors(f"vfs: create layer {id}"):
            if os.path.lexists(staging):  # left by a crash during an earlier create
                _remove_tree(staging)
            try:
                if source is None:
                    os.mkdir(staging, 0o755)
                    os.chmod(staging, 0o755)  # whatever the umask
                    if os.geteuid() == 0:
                        os.chown(staging, 0, 0)
                else:
                    copy_tree(str(source), str(staging))
                times = os.lstat(staging)
                rename_noreplace(str(staging), str(final_path))
            except BaseException:
                # The original failure is the one to report, not a cleanup hiccup.
                with contextlib.suppress(OSError):
                    _remove_tree(staging, missing_ok=True)
                raise
            # Moving a directory to another parent rewrites its "..": keep its times exact.
            os.utime(final_path, ns=(times.st_atime_ns, times.st_mtime_ns))

    def remove(self, id: str) -> None:
        """Remove layer ``id`` and everything in it.

        Also sweeps what a crash left of ``id`` (a half copy, a half removal).

        :raises NotFound: nothing of ``id`` is on disk.
        """
        check_storage_id(id)
        path = self._dir / id
        doomed = self._home / f"rm-{id}"
        # What a crash left: a half copy (create) or a half removal of this id.
        leftovers = [p for p in (self._home / f"tmp-{id}", doomed) if os.path.lexists(p)]
        with map_os_errors(f"vfs: remove layer {id}"):
            for leftover in leftovers:
                _remove_tree(leftover)
            if not os.path.lexists(path):
                if leftovers:
                    return
                raise NotFound(f"vfs: layer {id} is not on disk")
            # Out of dir/ in one step, so a crash mid-removal leaves no half layer listed.
            os.rename(path, doomed)
            _remove_tree(doomed)

    def mounts(self, id: str, parents: Sequence[str], readonly: bool) -> list[MountSpec]:
        """One recursive bind of the layer's directory, ``ro`` when ``readonly``.

        :raises NotFound: ``id`` is not on disk.
        """
        path = self._layer(id)
        return [
            MountSpec(type="bind", source=str(path), options=("rbind", "ro" if readonly else "rw"))
        ]

    def usage(self, id: str) -> Usage:
        """Bytes (allocated blocks) and inodes under layer ``id``, each hardlinked inode once.

        :raises NotFound: ``id`` is not on disk.
        """
        path = self._layer(id)
        with map_os_errors(f"vfs: usage of layer {id}"):
            return tree_usage(path)

    def layers(self) -> list[str]:
        """The storage ids under ``dir/``, sorted; layers being created or removed are not."""
        with map_os_errors(f"vfs: list {self._dir}"), os.scandir(self._dir) as entries:
            return sorted(
                entry.name
                for entry in entries
                if entry.is_dir(follow_symlinks=False) and is_storage_id(entry.name)
            )

    def close(self) -> None:
        """Nothing to release: vfs holds no fds, mounts or locks between calls."""

    def _layer(self, id: str) -> Path:
        check_storage_id(id)
        path = self._dir / id
        if not path.is_dir():
            raise NotFound(f"vfs: layer {id} is not on disk")
        return path


def _remove_tree(path: Path, *, missing_ok: bool = False) -> None:
    """Remove ``path`` and everything below it, never following a symlink.

    As root this is :func:`shutil.rmtree`. Without root a directory the layer made read-only
    (0555 ``/proc`` of an image, say) refuses to let its entries go, so on ``EACCES`` every
    directory is made ``u+rwx`` first and the removal tried again.
    """
    if missing_ok and not os.path.lexists(path):
        return
    try:
        shutil.rmtree(path)
    except PermissionError:
        _make_writable(str(path))
        shutil.rmtree(path)


def _make_writable(top: str) -> None:
    pending = [top]
    while pending:
        directory = pending.pop()
        try:
            mode = os.lstat(directory).st_mode
            if mode & stat.S_IRWXU != stat.S_IRWXU:
                os.chmod(directory, mode | stat.S_IRWXU)
            with os.scandir(directory) as entries:
                pending.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except OSError as exc:
            # Gone already, or not ours to change: rmtree reports what matters.
            if exc.errno not in (errno.ENOENT, errno.EPERM, errno.EACCES):
                raise
