"""A directory tree reached only through directory file descriptors, with a cache of them.

:class:`Tree` is how laminae touches a tree whose content it does not trust (a layer being
applied, a layer's files read back, a container's root): a path is cleaned
(:func:`clean_name`) and resolved against the root's file descriptor with ``openat2(root_fd,
path, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``, so ``..`` and symlinks, absolute or not, stay
inside the root as if it were ``/``; where ``openat2`` is missing, a component-by-component
``O_NOFOLLOW`` walk does the same (symlinks re-rooted like containerd's ``fs.RootPath``, at most
255 of them). The caller then works on the final component with ``*at`` calls on the directory's
fd. There is never a path string to follow.

Used by the applier (:mod:`laminae.archive._apply`, which creates missing directories through
the :meth:`Tree.make_parent` hooks) and the detached apply built on it, the lower trees below
an apply (:mod:`laminae.archive._lowers`), the changes-tar writer
(:mod:`laminae.archive._write`), tar-split replay (:mod:`laminae.archive._tarsplit`) and the
bundle writer (:mod:`laminae.containers._bundle`, reading a container's ``/etc/passwd``).
"""

from __future__ import annotations

import collections
import errno
import os
import posixpath
import stat
from pathlib import Path
from typing import Final

from laminae._exceptions import InvalidArgument
from laminae.archive._tarheader import printable
from laminae.kernel import _paths

__all__ = [
    "O_LIST_DIR",
    "O_PATH_DIR",
    "O_READ_FILE",
    "Dir",
    "Tree",
    "clean_name",
    "dir_key",
]

O_PATH_DIR: Final = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
"""Open a directory to resolve paths from (an ``O_PATH`` fd)."""
O_LIST_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
"""Open a directory to list it or change its attributes; never through a symlink."""
O_READ_FILE: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
"""Open a file to read it; never through a symlink, never as a controlling terminal."""

_O_PATH_NOFOLLOW: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_RESOLVE: Final = _paths.RESOLVE_IN_ROOT | _paths.RESOLVE_NO_MAGICLINKS
_MAX_SYMLINKS: Final = 255  # containerd's fs.RootPath
_DIR_CACHE_SIZE: Final = 128


def clean_name(name: bytes) -> bytes:
    """``name`` relative to the root: no leading ``/`` or ``./``, ``..`` collapsed within it.

    ``b""`` is the root itself.
    """
    if name[:1] not in (b".", b"/") and b"/." not in name and b"//" not in name:
        return name[:-1] if name.endswith(b"/") else name
    return posixpath.normpath(b"/" + name).lstrip(b"/")


def dir_key(fd: int) -> int:
    """Identity of a directory: device and inode in one int."""
    st = os.fstat(fd)
    return st.st_dev << 64 | st.st_ino


def _new_file_gid(st: os.stat_result) -> int:
    """The group a file created in directory ``st`` gets (BSD semantics under setgid)."""
    return st.st_gid if st.st_mode & stat.S_ISGID else os.getegid()


Dir = tuple[int, int, bool, int]
"""A resolved directory: its ``O_PATH`` fd, its identity (:func:`dir_key`), whether the
caller counts it as fresh (:meth:`Tree.is_fresh`), and the group a file created in it gets."""


class Tree:
    """A root directory and an LRU cache of its directories' fds, by cleaned path.

    The cache is the main speed lever for 100,000-file layers: entries come grouped by
    directory, so most of them need no path resolution at all. Any removal or replacement of
    a directory or symlink can change what a cached path means, so it empties the cache; fds
    dropped while an entry is being applied are closed after it (:meth:`release`), never
    under a caller that still holds one.

    Hooks for a subclass (each does nothing here): :meth:`is_fresh` (whether a directory
    counts as made by the caller), :meth:`make_parent` and :meth:`make_parent_over` (make a
    directory the walk finds missing, or finds a non-directory in place of), and
    :meth:`dir_removed` (a directory is about to go).

    :param root: the tree's root directory. ``root_path``, ``root_fd`` and ``root`` are the
        root as bytes, its ``O_PATH`` fd and its :data:`Dir`; ``retired`` holds the fds dropped
        from the cache and not closed yet.
    """

    def __init__(self, root: Path) -> None:
        self.root_path = os.fsencode(root)
        self.root_fd = os.open(root, O_PATH_DIR)
        try:
            st = os.fstat(self.root_fd)
            self.root: Dir = (self.root_fd, st.st_dev << 64 | st.st_ino, False, _new_file_gid(st))
        except BaseException:
            os.close(self.root_fd)
            raise
        self._cache: collections.OrderedDict[bytes, Dir] = collections.OrderedDict()
        self.retired: list[int] = []
        self._last_path = b""
        self._last: Dir = self.root
        self.openat2 = _paths.openat2_available()

    def close(self) -> None:
        """Close every fd, the root's included."""
        self.invalidate()
        self.release()
        os.close(self.root_fd)

    def invalidate(self) -> None:
        """Empty the cache: a removal or replacement may have changed what paths mean."""
        self.retired.extend(found[0] for found in self._cache.values())
        self._cache.clear()
        self._last_path = b""
        self._last = self.root

    def forget(self, key: int) -> None:
        """Drop the cached records of directory ``key`` (its mode or group changed)."""
        stale = [path for path, found in self._cache.items() if found[1] == key]
        for path in stale:
            self.retired.append(self._cache.pop(path)[0])
        if self._last[1] == key and self._last is not self.root:
            self._last_path = b""
            self._last = self.root

    def release(self) -> None:
        """Close the fds dropped from the cache (:attr:`retired`); none may be in use."""
        retired, self.retired = self.retired, []
        for fd in retired:
            os.close(fd)

    def lookup(self, path: bytes) -> Dir | None:
        """The directory at cleaned ``path``, or ``None`` when it does not exist."""
        if path == self._last_path:
            return self._last
        found = self._cache.get(path)
        if found is None:
            fd = self.open_dir(path)
            if fd is None:
                return None
            found = self._remember(path, fd)
        else:
            self._cache.move_to_end(path)
        self._last_path = path
        self._last = found
        return found

    def _remember(self, path: bytes, fd: int) -> Dir:
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        key = st.st_dev << 64 | st.st_ino
        found = (fd, key, self.is_fresh(key), _new_file_gid(st))
        self._cache[path] = found
        if len(self._cache) > _DIR_CACHE_SIZE:
            _, (old_fd, *_) = self._cache.popitem(last=False)
            self.retired.append(old_fd)
        return found

    def is_fresh(self, key: int) -> bool:
        """A hook: whether directory ``key`` counts as fresh in :data:`Dir` records."""
        return False

    def open_dir(self, path: bytes) -> int | None:
        """An ``O_PATH`` fd of the directory at cleaned ``path``, resolved within the root;
        ``None`` when a component is missing or not a directory (after :meth:`walk`).

        :raises InvalidArgument: too many symbolic links on the way.
        """
        if self.openat2:
            try:
                return _paths.openat2(self.root_fd, path, O_PATH_DIR, resolve=_RESOLVE)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise InvalidArgument(
                        f"path '{printable(path)}': too many levels of symbolic links"
                    ) from exc
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
        return self.walk(path)

    def make_parent(self, dir_fd: int, name: bytes, resolved: list[bytes]) -> bool:
        """Create a missing directory while walking; ``False`` if nothing may be created."""
        return False

    def make_parent_over(
        self, dir_fd: int, name: bytes, st: os.stat_result, resolved: list[bytes]
    ) -> bool:
        """Replace the non-directory ``name`` by a directory while walking; ``False`` if not."""
        return False

    def walk(self, path: bytes) -> int | None:
        """Resolve ``path`` within the root one component at a time, without ``openat2``.

        Each component is opened ``O_PATH|O_NOFOLLOW``; a symlink is read and its target
        spliced into the components left, restarting at the root when absolute; ``..`` never
        climbs above the root. This is ``RESOLVE_IN_ROOT`` done by hand, and also how missing
        directories are created (:meth:`make_parent`), through symlinks like containerd.

        :returns: an ``O_PATH`` fd of the directory, or ``None`` if a component is missing
            (and :meth:`make_parent` declined) or is not a directory.
        """
        todo = [c for c in reversed(path.split(b"/")) if c and c != b"."]
        stack = [self.root_fd]
        resolved: list[bytes] = []
        links = 0
        try:
            while todo:
                name = todo.pop()
                if name == b"..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                        resolved.pop()
                    continue
                current = stack[-1]
                try:
                    fd = os.open(name, _O_PATH_NOFOLLOW, dir_fd=current)
                except FileNotFoundError:
                    if not self.make_parent(current, name, resolved):
                        return None
                    fd = os.open(name, _O_PATH_NOFOLLOW, dir_fd=current)
                st = os.fstat(fd)
                mode = st.st_mode
                if stat.S_ISDIR(mode):
                    stack.append(fd)
                    resolved.append(name)
                    continue
                os.close(fd)
                if not stat.S_ISLNK(mode):
                    if not self.make_parent_over(current, name, st, resolved):
                        return None
                    stack.append(os.open(name, _O_PATH_NOFOLLOW, dir_fd=current))
                    resolved.append(name)
                    continue
                links += 1
                if links > _MAX_SYMLINKS:
                    raise InvalidArgument(
                        f"path '{printable(path)}': more than {_MAX_SYMLINKS} symbolic links"
                    )
                target = os.readlink(name, dir_fd=current)
                if target.startswith(b"/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                    resolved.clear()
                todo.extend(c for c in reversed(target.split(b"/")) if c and c != b".")
            if len(stack) > 1:
                return stack.pop()
            return os.dup(self.root_fd)
        finally:
            for fd in stack[1:]:
                os.close(fd)

    # --- removal and directories by path ----------------------------------------------

    def remove(self, dir_fd: int, name: bytes) -> bool:
        """Remove ``name`` from ``dir_fd`` whatever it is; ``False`` if there was nothing."""
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(mode):
            self._remove_tree(dir_fd, name)
            self.invalidate()
        else:
            os.unlink(name, dir_fd=dir_fd)
            if stat.S_ISLNK(mode):
                self.invalidate()
        return True

    def _remove_tree(self, dir_fd: int, name: bytes) -> None:
        """``rm -r`` through fds, iteratively (a tree may be deeper than Python's stack)."""
        stack = [(dir_fd, name, os.open(name, O_LIST_DIR, dir_fd=dir_fd))]
        try:
            while stack:
                parent_fd, dir_name, fd = stack[-1]
                subdir = None
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            subdir = os.fsencode(entry.name)
                            break
                        os.unlink(entry.name, dir_fd=fd)
                if subdir is not None:
                    stack.append((fd, subdir, os.open(subdir, O_LIST_DIR, dir_fd=fd)))
                    continue
                stack.pop()
                self.dir_removed(fd)
                os.close(fd)
                os.rmdir(dir_name, dir_fd=parent_fd)
        finally:
            for _, _, fd in stack:
                os.close(fd)

    def dir_removed(self, fd: int) -> None:
        """A hook: directory ``fd`` is about to be removed by :meth:`remove`; nothing here."""

    def _directory_at(self, path: bytes) -> tuple[int, bytes, os.stat_result] | None:
        """The directory at ``path`` (resolved in the root): its parent's fd, its name, its
        ``lstat``; ``None`` when there is no directory there."""
        parent_path, _, name = path.rpartition(b"/")
        parent = self.lookup(parent_path)
        if parent is None:
            return None
        try:
            st = os.stat(name, dir_fd=parent[0], follow_symlinks=False)
        except FileNotFoundError:
            return None
        return (parent[0], name, st) if stat.S_ISDIR(st.st_mode) else None

    def dir_identity(self, path: bytes) -> int | None:
        """The identity of the directory at ``path``, or ``None`` when there is none."""
        found = self._directory_at(path)
        return None if found is None else found[2].st_dev << 64 | found[2].st_ino

    def set_dir_times(self, path: bytes, atime: int, mtime: int) -> int | None:
        """Set the times of the directory at ``path`` (resolved in the root), if one is there.

        :returns: the directory's identity, or ``None`` when there is none at ``path``.
        """
        found = self._directory_at(path)
        if found is None:
            return None
        parent, name, st = found
        os.utime(name, ns=(atime, mtime), dir_fd=parent, follow_symlinks=False)
        return st.st_dev << 64 | st.st_ino
