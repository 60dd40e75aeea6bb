"""A faithful full copy of a directory tree: the whole of what a vfs layer creation does.

File data goes the cheapest way the filesystem allows (:class:`laminae.driverkit.DataCopier`):
a reflink on btrfs and XFS with ``reflink=1``, else ``copy_file_range`` or ``read``/``write`` of
the data only, so holes stay holes (found with ``SEEK_DATA``/``SEEK_HOLE``, or, where the
filesystem cannot say, as blocks of zeros in a file with fewer blocks than its size). One
copier serves the whole tree, so ext4 pays for the failed ``FICLONE`` once, not once per file.

Kept: hardlinks (as hardlinks), symlinks, character and block devices, FIFOs, owners, modes with
setuid/setgid/sticky, every extended attribute (``security.capability`` included), and
nanosecond atime/mtime. Sockets are skipped: they cannot be copied and mean nothing at rest.

The walk holds two directory fds at a time and works with ``*at`` calls relative to them, so a
path is resolved once per directory rather than once per file, and deep trees cannot exhaust
the fd table. Order matters and is deliberate:

* file data first, then ``chown`` (which clears setuid/setgid and ``security.capability``),
  then ``chmod``, then xattrs, then times (every earlier step may touch the times);
* directories get their mode and times only after everything below them exists, because
  creating an entry changes a directory's mtime and a read-only mode would refuse the entry.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Final, final

from laminae.driverkit import DataCopier, get_xattr, list_xattrs, set_xattr

__all__ = ["copy_tree"]

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def copy_tree(source: str, destination: str) -> None:
    """Copy the tree at ``source`` to ``destination``, which must not exist yet.

    :raises OSError: the first failure, naming the source path it concerns; ``destination``
        is left half-made for the caller to remove.
    """
    os.mkdir(destination, 0o700)
    copier = _Copier(source, destination)
    try:
        copier.run()
    finally:
        copier.close()


@final
class _Copier:
    __slots__ = (
        "data",
        "destination",
        "directories",
        "dst_root",
        "links",
        "source",
        "src_root",
    )

    def __init__(self, source: str, destination: str) -> None:
        self.source = source
        self.destination = destination
        self.data = DataCopier()
        # (st_dev, st_ino) of a multiply linked source inode -> its first copy, relative.
        self.links: dict[tuple[int, int], str] = {}
        # Every directory in pre-order with its source stat; replayed backwards at the end.
        self.directories: list[tuple[str, os.stat_result]] = []
        self.src_root = os.open(source, _DIR_FLAGS)
        try:
            self.dst_root = os.open(destination, _DIR_FLAGS)
        except BaseException:
            os.close(self.src_root)
            raise

    def close(self) -> None:
        os.close(self.src_root)
        os.close(self.dst_root)

    def run(self) -> None:
        pending = [("", os.fstat(self.src_root))]
        while pending:
            relative, st = pending.pop()
            self.directories.append((relative, st))
            pending.extend(self._copy_directory(relative, st))
        # Reversed pre-order: every directory comes after all of its descendants.
        for relative, st in reversed(self.directories):
            where = relative or "."
            os.chmod(where, stat.S_IMODE(st.st_mode), dir_fd=self.dst_root)
            os.utime(where, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=self.dst_root)

    def _copy_directory(
        self, relative: str, st: os.stat_result
    ) -> list[tuple[str, os.stat_result]]:
        """Copy one directory's owner, xattrs and entries; return its subdirectories."""
        subdirectories = []
        src_fd = os.open(relative or ".", _DIR_FLAGS, dir_fd=self.src_root)
        try:
            dst_fd = os.open(relative or ".", _DIR_FLAGS, dir_fd=self.dst_root)
            try:
                os.fchown(dst_fd, st.st_uid, st.st_gid)
                _copy_xattrs(src_fd, dst_fd)
                with os.scandir(src_fd) as listing:
                    entries = list(listing)
                for entry in entries:
                    child = f"{relative}/{entry.name}" if relative else entry.name
                    try:
                        child_st = entry.stat(follow_symlinks=False)
                        if stat.S_ISDIR(child_st.st_mode):
                            os.mkdir(entry.name, 0o700, dir_fd=dst_fd)
                            subdirectories.append((child, child_st))
                        else:
                            self._copy_entry(src_fd, dst_fd, entry.name, child, child_st)
                    except OSError as exc:
                        named = _naming(exc, f"{self.source}/{child}")
                        if named is exc:
                            raise
                        raise named from exc
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        return subdirectories

    def _copy_entry(
        self, src_fd: int, dst_fd: int, name: str, relative: str, st: os.stat_result
    ) -> None:
        mode = st.st_mode
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self.links.get(key)
            if first is not None:
                os.link(
                    first, name, src_dir_fd=self.dst_root, dst_dir_fd=dst_fd, follow_symlinks=False
                )
                return
            self.links[key] = relative
        if stat.S_ISREG(mode):
            self._copy_file(src_fd, dst_fd, name, st)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
            self._copy_path_xattrs(relative, symlink=True)
            os.utime(
                name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_fd, follow_symlinks=False
            )
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dst_fd)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
            os.chmod(name, stat.S_IMODE(mode), dir_fd=dst_fd)
            self._copy_path_xattrs(relative, symlink=False)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_fd)
        # Sockets (and anything stranger) are not copied.

    def _copy_file(self, src_dir: int, dst_dir: int, name: str, st: os.stat_result) -> None:
        src = os.open(name, _READ_FLAGS, dir_fd=src_dir)
        try:
            dst = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dst_dir)
            try:
                self.data.copy(src, dst, st.st_size, allocated=st.st_blocks * 512)
                os.fchown(dst, st.st_uid, st.st_gid)
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                _copy_xattrs(src, dst)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _copy_path_xattrs(self, relative: str, *, symlink: bool) -> None:
        # Symlinks and device nodes cannot be opened for their xattrs; go by path, no follow.
        source = f"{self.source}/{relative}"
        names = list_xattrs(source)
        if not names:
            return
        destination = f"{self.destination}/{relative}"
        for name in names:
            value = get_xattr(source, name)
            if value is None:
                continue
            try:
                set_xattr(destination, name, value)
            except OSError as exc:
                # The kernel refuses user.* on symlinks and devices (EPERM), some filesystems
                # say ENOTSUP; such an attribute cannot exist on the copy's file type.
                if not (name.startswith(b"user.") and exc.errno in (errno.EPERM, errno.ENOTSUP)):
                    raise


def _copy_xattrs(src_fd: int, dst_fd: int) -> None:
    names = list_xattrs(src_fd)
    for name in names:
        value = get_xattr(src_fd, name)
        if value is not None:
            set_xattr(dst_fd, name, value)


def _naming(exc: OSError, path: str) -> OSError:
    """``exc`` again, naming the full ``path`` instead of a name relative to a dir fd."""
    if exc.filename is not None and exc.filename != os.path.basename(path):
        return exc
    return OSError(exc.errno, exc.strerror, path)
