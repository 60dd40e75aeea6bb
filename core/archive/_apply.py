"""OCI layer tars: apply them onto a directory safely, and write them from changes.

**Applying** (:func:`apply_tar`) follows image-spec "Applying changesets" and containerd's
``applyNaive``/``createTarFile`` (REFERENCE.md 5.4, 6.1), with one difference that matters:
every path is resolved against a directory file descriptor, never by joining strings
(DESIGN.md invariant 6.1). An entry's parent directory is opened with ``openat2(root_fd,
parent, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``, so ``..`` and symlinks, absolute or not,
stay inside the root as if it were ``/``; where ``openat2`` is missing, a component-by-component
``O_NOFOLLOW`` walk does the same (symlinks re-rooted like containerd's ``fs.RootPath``, at most
255 of them). The final component is then created or changed with ``*at`` calls on that fd
(``O_NOFOLLOW|O_EXCL`` opens, ``mkdirat``, ``symlinkat``, ``linkat`` without
``AT_SYMLINK_FOLLOW``, ``mknodat``, ``fchownat(AT_SYMLINK_NOFOLLOW)``...). Every escape of
REFERENCE.md section 8 resolves a path string and lets the kernel follow a link planted earlier
in the same archive; here there is no string to follow.

Rules, in the order they apply to an entry:

* Names are cleaned: leading ``/`` and ``./`` dropped, ``..`` collapsed lexically within the
  root. An entry that cleans to the root itself is ignored (as containerd does).
* Missing parent directories are created ``0755`` root-owned, or, with ``parent_roots``, with
  the mode, owner, times and xattrs (``trusted.*`` excepted) of the same directory in the first
  of those trees that has it (containerd's ``WithParents``, for overlay upper dirs).
* Existing path and entry both directories: the directory stays and takes the entry's
  attributes. Otherwise the existing path is removed (a directory with all it holds) and the
  entry created. Duplicate entries for one path are therefore applied in order, the last wins.
* Regular files are written in 1 MiB pieces; sparse files get their holes back (``pwrite`` at
  each segment, ``ftruncate`` to the apparent size). Hard links must name an existing
  non-directory inside the root; a link to a symlink links the symlink itself. Symlink targets
  are written verbatim (containment happens when a later entry is resolved). Devices and FIFOs
  are made with ``mknod``. Tar has no socket type, so there is nothing to skip; an unknown type
  is refused.
* Then ``lchown`` (uid/gid from the header; names are ignored), ``chmod`` after it (``chown``
  clears setuid), xattrs with ``security.capability`` last (``chown`` clears it), and times in
  nanoseconds; directory times are set after the last entry, since adding children moves them.
  Hard-link entries change nothing of the inode they share.
* Whiteouts (image-spec 6.1): ``.wh.<name>`` hides ``<name>`` of the lower layers, and
  ``.wh..wh..opq`` hides every lower child of its directory whatever the marker's position in
  the tar. With :attr:`WhiteoutMode.DELETE` they are deleted from the target. Whiteouts hide
  only lower content: a path this layer created stays. A bare ``.wh.``, a ``.wh..wh.<other>``,
  and a whiteout for ``.`` or ``..`` are refused. Markers are never written as files.
* With :attr:`WhiteoutMode.OVERLAY` the target is an overlayfs upper dir and ``parent_roots``
  are the lower dirs, read with overlayfs's rules (a ``0:0`` character device hides a name, an
  opaque directory hides what is below it, a non-directory ends the stack, the opaque xattr of
  a layer's root means nothing). A whiteout becomes a ``0:0`` character device owned as the
  header says, only where the lowers show the name: in a directory with no lower, overlayfs
  lists a whiteout as an entry that cannot be opened. An opaque marker sets
  ``trusted.overlay.opaque=y`` (``user.overlay.opaque`` with ``userxattr``, as a rootless
  mount reads it) on the layer's directory, where the lowers show a directory beneath it; at
  the root, where overlayfs ignores the flag, every lower name gets a whiteout instead. A
  directory that replaces a non-directory of this layer (a whiteout, a file) is made opaque
  the same way, since what it replaced hid the lowers. The flag goes nowhere else: a stray
  one would show as an xattr where a layer is mounted as a plain bind. Whiteouts below a
  directory made opaque are dropped (they hide nothing any more). A missing parent directory
  is made only where the lowers show none or a directory, so a path through a lower file is
  refused as it is on the parent's tree. A hard link to a file only the lowers have copies
  that file up first, as overlayfs does. A ``0:0`` character device entry is refused:
  overlayfs would read it as a whiteout. (:mod:`._overlayformat` applies the same tar
  before the lowers are there, and settles what they decide afterwards.)
* ``trusted.overlay.*`` and ``user.overlay.*`` xattrs in a tar are refused: they are
  overlayfs's own bookkeeping, and a forged ``redirect`` or ``opaque`` would let a layer alias
  or hide content of other layers. Every other xattr, ``trusted.*`` included, is content.

A failure raises at once and leaves the target half-written (the store throws the whole layer
away); it never leaves anything outside the root. Errors name the entry.

**Writing** (:func:`write_changes_tar`) is hand-written rather than built on
:mod:`tarfile`: ``tarfile`` cannot write a PAX keyword that is not UTF-8 (a non-UTF-8 xattr
name), formats times and header names its own way, and a few dozen lines give byte-exact,
deterministic output.
"""

from __future__ import annotations

import collections
import enum
import errno
import os
import posixpath
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, Final, NoReturn

import attrs

from laminae._exceptions import (
    InvalidArgument,
    LaminaeError,
    LimitExceeded,
    Unsupported,
    map_os_errors,
)
from laminae.archive._changes import Change, ChangeKind
from laminae.archive._tarstream import CHUNK_SIZE, EntryType, Limits, TarEntry, TarReader
from laminae.kernel import _linux
from laminae.kernel._xattrs import get_xattr, read_xattrs, set_xattr

__all__ = ["ApplyResult", "Limits", "WhiteoutMode", "apply_tar", "write_changes_tar"]


class WhiteoutMode(enum.Enum):
    """What a whiteout entry becomes when a tar is applied."""

    DELETE = "delete"
    """Delete the path from the target (the target already holds the parent's content)."""
    OVERLAY = "overlay"
    """Write overlayfs whiteouts: a 0/0 char device, and ``trusted.overlay.opaque=y``."""


@attrs.frozen
class ApplyResult:
    """What applying one tar did."""

    size: int
    """Bytes of the uncompressed tar that were read, trailer included."""
    entries: int
    """Headers applied (whiteouts included)."""


_O_PATH_DIR: Final = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_PATH_NOFOLLOW: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_O_LIST_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_NEW_FILE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_O_READ_FILE: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
_RESOLVE: Final = _linux.RESOLVE_IN_ROOT | _linux.RESOLVE_NO_MAGICLINKS
_MAX_SYMLINKS: Final = 255  # containerd's fs.RootPath
_DIR_CACHE_SIZE: Final = 128
_WHITEOUT: Final = b".wh."
_OPAQUE: Final = b".wh..wh..opq"
_CAPABILITY: Final = b"security.capability"
_OVERLAY_PREFIXES: Final = (b"trusted.overlay.", b"user.overlay.")
_OPAQUE_XATTRS: Final = {False: b"trusted.overlay.opaque", True: b"user.overlay.opaque"}
_DEVICE_TYPES: Final = {
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}
_DEV_MAX: Final = 1 << 32
_DEFAULT_LIMITS: Final = Limits()


def _text(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


def _is_whiteout(st: os.stat_result) -> bool:
    """Whether ``st`` is an overlayfs whiteout: a ``0:0`` character device."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _clean(name: bytes) -> bytes:
    """``name`` relative to the root: no leading ``/`` or ``./``, ``..`` collapsed within it.

    ``b""`` is the root itself.
    """
    if name[:1] not in (b".", b"/") and b"/." not in name and b"//" not in name:
        return name[:-1] if name.endswith(b"/") else name
    return posixpath.normpath(b"/" + name).lstrip(b"/")


def _dir_key(fd: int) -> int:
    """Identity of a directory: device and inode in one int."""
    st = os.fstat(fd)
    return st.st_dev << 64 | st.st_ino


def _new_file_gid(st: os.stat_result) -> int:
    """The group a file created in directory ``st`` gets (BSD semantics under setgid)."""
    return st.st_gid if st.st_mode & stat.S_ISGID else os.getegid()


# A resolved directory: (O_PATH fd, identity, created by this layer, group of a new file).
_Dir = tuple[int, int, bool, int]


class _Tree:
    """A root directory and an LRU cache of its directories' fds, by cleaned path.

    The cache is the main speed lever for 100,000-file layers: entries come grouped by
    directory, so most of them need no path resolution at all. Any removal or replacement of
    a directory or symlink can change what a cached path means, so it empties the cache; fds
    dropped while an entry is being applied are closed after it (:meth:`release`), never
    under a caller that still holds one.
    """

    def __init__(self, root: Path) -> None:
        self.root_path = os.fsencode(root)
        self.root_fd = os.open(root, _O_PATH_DIR)
        try:
            st = os.fstat(self.root_fd)
            self.root: _Dir = (self.root_fd, st.st_dev << 64 | st.st_ino, False, _new_file_gid(st))
        except BaseException:
            os.close(self.root_fd)
            raise
        self._cache: collections.OrderedDict[bytes, _Dir] = collections.OrderedDict()
        self.retired: list[int] = []
        self._last_path = b""
        self._last: _Dir = self.root
        self.openat2 = _linux.openat2_available()

    def close(self) -> None:
        self.invalidate()
        self.release()
        os.close(self.root_fd)

    def invalidate(self) -> None:
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
        retired, self.retired = self.retired, []
        for fd in retired:
            os.close(fd)

    def lookup(self, path: bytes) -> _Dir | None:
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

    def _remember(self, path: bytes, fd: int) -> _Dir:
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
        return False

    def open_dir(self, path: bytes) -> int | None:
        if self.openat2:
            try:
                return _linux.openat2(self.root_fd, path, _O_PATH_DIR, resolve=_RESOLVE)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise InvalidArgument(
                        f"path '{_text(path)}': too many levels of symbolic links"
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
                        f"path '{_text(path)}': more than {_MAX_SYMLINKS} symbolic links"
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


def _is_overlay_xattr(name: bytes) -> bool:
    return name.startswith(_OVERLAY_PREFIXES)


def hidden_name(name: bytes) -> bytes:
    """The name whiteout ``name`` (``.wh.<name>``, not the opaque marker) hides.

    :raises InvalidArgument: a bare ``.wh.``, a ``.wh..wh.<other>``, or ``.`` or ``..``.
    """
    hidden = name[len(_WHITEOUT) :]
    if not hidden or hidden in (b".", b"..") or hidden.startswith(_WHITEOUT):
        raise InvalidArgument(f"invalid whiteout name '{_text(name)}'")
    return hidden


def _check_xattrs(xattrs: dict[bytes, bytes]) -> None:
    """Refuse overlayfs's own attributes: a forged one could hide or alias other layers."""
    for name in xattrs:
        if _is_overlay_xattr(name):
            raise InvalidArgument(
                f"xattr '{_text(name)}' is overlayfs's own bookkeeping; a layer may not carry it"
            )


def _set_xattrs(target: str | int, xattrs: dict[bytes, bytes], regular_or_dir: bool) -> None:
    """Set ``xattrs`` on ``target``, ``security.capability`` last (``chown`` clears it).

    overlayfs's own attributes are left out (a layer tar carrying one is refused before).
    """
    capability = None
    for name, value in sorted(xattrs.items()):
        if _is_overlay_xattr(name):
            continue
        if name == _CAPABILITY:
            capability = value
            continue
        if name.startswith(b"user.") and not regular_or_dir:
            # The kernel allows user.* only on regular files and directories.
            continue
        _set_xattr(target, name, value)
    if capability is not None:
        _set_xattr(target, _CAPABILITY, capability)


def _set_xattr(target: str | int, name: bytes, value: bytes) -> None:
    try:
        set_xattr(target, name, value)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise Unsupported(
                f"xattr '{_text(name)}': not supported by the target filesystem"
            ) from exc
        raise


class _Applier(_Tree):
    """Applies the entries of one tar onto a root; see the module docstring for the rules."""

    def __init__(
        self,
        root: Path,
        limits: Limits,
        whiteouts: WhiteoutMode,
        parent_roots: Sequence[Path],
        userxattr: bool,
    ) -> None:
        super().__init__(root)
        self._limits = limits
        self._overlay = whiteouts is WhiteoutMode.OVERLAY
        self._opaque_xattr = _OPAQUE_XATTRS[userxattr]
        self._lowers: list[_Tree] = []
        try:
            for parent in parent_roots:
                self._lowers.append(_Tree(parent))
        except BaseException:
            self._close_lowers()
            super().close()
            raise
        # DELETE mode must know what this layer created, to spare it from whiteouts and
        # opaque markers that come later in the tar. Directories the layer created hold
        # nothing older, so only their identity is kept ("fresh"); the names are kept only
        # for children of directories that were already there. Identities, not paths, so a
        # path reached through a symlink counts the same as the real one.
        self._fresh: set[int] = set()
        self._created: dict[int, set[bytes]] = {}
        self._dir_times: list[tuple[bytes, int, int]] = []
        self._creating = False
        self._euid = os.geteuid()

    def close(self) -> None:
        self._close_lowers()
        super().close()

    def release(self) -> None:
        super().release()
        for lower in self._lowers:
            lower.release()

    def _close_lowers(self) -> None:
        lowers, self._lowers = self._lowers, []
        for lower in lowers:
            lower.close()

    def is_fresh(self, key: int) -> bool:
        return key in self._fresh

    def _note(self, parent: _Dir, name: bytes) -> None:
        if not parent[2] and not self._overlay:
            created = self._created.get(parent[1])
            if created is None:
                self._created[parent[1]] = created = set()
            created.add(name)

    def _created_here(self, parent: _Dir, name: bytes) -> bool:
        return parent[2] or name in self._created.get(parent[1], ())

    # --- resolution with creation -------------------------------------------------------

    def parent(self, path: bytes) -> _Dir:
        """The directory at ``path``, created (with missing ancestors) when absent."""
        if path == self._last_path:
            return self._last
        self._creating = True
        try:
            found = self.lookup(path)
        finally:
            self._creating = False
        if found is None:
            raise InvalidArgument(f"a component of '{_text(path)}' is not a directory")
        return found

    def make_parent_over(
        self, dir_fd: int, name: bytes, st: os.stat_result, resolved: list[bytes]
    ) -> bool:
        # An entry below a path this layer whited out (".wh.x", then "x/y" with no "x/"):
        # DELETE mode deleted x and makes it again, so here the whiteout becomes a directory,
        # opaque because the whiteout hid everything below it.
        if not (self._creating and self._overlay and _is_whiteout(st)):
            return False
        os.unlink(name, dir_fd=dir_fd)
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        fd = os.open(name, _O_LIST_DIR, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o755)  # mkdir's mode went through the umask
            if self._hides_a_lower_dir(b"/".join([*resolved, name])):
                _set_xattr(fd, self._opaque_xattr, b"y")
        finally:
            os.close(fd)
        return True

    def make_parent(self, dir_fd: int, name: bytes, resolved: list[bytes]) -> bool:
        if not self._creating:
            return False
        if self._overlay:
            # A lower non-directory there is a file of the parent's tree: applied onto that
            # tree (DELETE mode) the path would not resolve, so neither does it here.
            shown = self._lower_entry(b"/".join([*resolved, name]), upper=True, beneath=True)
            if shown is not None and not stat.S_ISDIR(shown[1].st_mode):
                return False
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        fd = os.open(name, _O_LIST_DIR, dir_fd=dir_fd)
        try:
            parent_key = _dir_key(dir_fd)
            self._note((dir_fd, parent_key, parent_key in self._fresh, -1), name)
            self._fresh.add(_dir_key(fd))
            path = b"/".join([*resolved, name])
            times = self._copy_parent_attributes(fd, path)
            if times is None:
                os.fchmod(fd, 0o755)  # mkdir's mode went through the umask
            else:
                # Set again after the last entry: children added below move the mtime.
                self._dir_times.append((path, *times))
        finally:
            os.close(fd)
        return True

    def _copy_parent_attributes(self, fd: int, path: bytes) -> tuple[int, int] | None:
        """Give a new directory the attributes it has in the nearest lower tree, if any.

        In OVERLAY mode "nearest" is what overlayfs shows over the lowers at ``path``.

        :returns: the (atime, mtime) copied, or ``None`` when no lower tree has it.
        """
        source = self._open_lower_dir(path)
        if source is None:
            return None
        try:
            st = os.fstat(source)
            xattrs = read_xattrs(source)
        finally:
            os.close(source)
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        _set_xattrs(fd, xattrs, regular_or_dir=True)
        return st.st_atime_ns, st.st_mtime_ns

    def _open_lower_dir(self, path: bytes) -> int | None:
        """Open the directory at ``path`` in the nearest lower tree that has one."""
        if self._overlay:
            # Through this layer's directories above: under one it made opaque, or made over
            # a whiteout, the lowers show nothing.
            shown = self._lower_entry(path, upper=True, beneath=True)
            if shown is None or not stat.S_ISDIR(shown[1].st_mode):
                return None
            return os.open(self._lower_path(shown[0], path), _O_LIST_DIR)
        above, _, name = path.rpartition(b"/")
        for lower in self._lowers:
            found = lower.lookup(above)
            if found is None:
                continue
            try:
                return os.open(name, _O_LIST_DIR, dir_fd=found[0])
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
        return None

    # --- overlayfs's view of the lowers ---------------------------------------------------

    def _lower_path(self, index: int, path: bytes) -> bytes:
        root = self.root_path if index < 0 else self._lowers[index].root_path
        return root + b"/" + path

    def _lower_entry(
        self, path: bytes, *, upper: bool, beneath: bool = False
    ) -> tuple[int, os.stat_result] | None:
        """What overlayfs shows at ``path`` over the lowers, and over this layer if ``upper``.

        With ``beneath``, this layer's own entry at ``path`` itself is passed over: what the
        lowers show there, through this layer's directories above it.

        Read with overlayfs's lookup rules: in each directory the first layer with the name
        decides; a whiteout hides it, a non-directory ends the stack, an opaque directory
        ends it below itself; layer roots are never opaque. Lower trees are committed layers
        and every component is checked to be a real directory in the layer it is read from,
        so the joined paths follow no symlink.

        :returns: ``(layer, lstat)`` where layer is ``-1`` for this layer, else the index in
            ``parent_roots``; ``None`` when nothing shows there.
        """
        names = [n for n in path.split(b"/") if n]
        stack = [(-1, b"")] if upper else []
        stack.extend((index, b"") for index in range(len(self._lowers)))
        for depth, name in enumerate(names):
            last = depth == len(names) - 1
            found: tuple[int, os.stat_result] | None = None
            below: list[tuple[int, bytes]] = []
            for index, above in stack:
                if last and beneath and index < 0:
                    continue
                relative = above + b"/" + name if above else name
                try:
                    st = os.lstat(self._lower_path(index, relative))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                if _is_whiteout(st):
                    break
                if found is None:
                    found = (index, st)
                if not stat.S_ISDIR(st.st_mode) or last:
                    break
                below.append((index, relative))
                opaque = get_xattr(
                    os.fsdecode(self._lower_path(index, relative)), self._opaque_xattr
                )
                if opaque == b"y":
                    break
            if found is None or last:
                return found
            if not stat.S_ISDIR(found[1].st_mode):
                return None
            stack = below
        return None

    def _make_whiteout(self, dir_fd: int, name: bytes, uid: int, gid: int) -> None:
        try:
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd)
        except FileExistsError:
            return  # this layer's own entry stays: whiteouts hide lower layers only
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)

    def _set_opaque(self, dir_fd: int, name: bytes = b".") -> None:
        """Make a directory of this layer opaque, and drop the whiteouts below it.

        Below an opaque directory nothing merges with the lowers, so a whiteout made there
        earlier in the tar hides nothing, and overlayfs would list it as an entry that
        cannot be opened.
        """
        fd = os.open(name, _O_LIST_DIR, dir_fd=dir_fd)
        pending = [fd]
        try:
            _set_xattr(fd, self._opaque_xattr, b"y")
            while pending:
                current = pending.pop()
                try:
                    with os.scandir(current) as entries:
                        for entry in entries:
                            if entry.is_dir(follow_symlinks=False):
                                pending.append(os.open(entry.name, _O_LIST_DIR, dir_fd=current))
                            elif not entry.is_file(follow_symlinks=False) and _is_whiteout(
                                entry.stat(follow_symlinks=False)
                            ):
                                os.unlink(entry.name, dir_fd=current)
                finally:
                    os.close(current)
        finally:
            for left in pending:
                os.close(left)

    def _hides_a_lower_dir(self, path: bytes) -> bool:
        """Whether a directory of this layer at ``path`` would merge with a lower one.

        Only then is an opaque flag needed; anywhere else it would be a stray xattr, and
        visible where the layer is mounted as a plain bind (a base layer).
        """
        shown = self._lower_entry(path, upper=True, beneath=True)
        return shown is not None and stat.S_ISDIR(shown[1].st_mode)

    def _copy_up(self, path: bytes) -> None:
        """Copy the non-directory overlayfs shows at ``path`` from the lowers into this layer.

        What overlayfs does before linking to a lower file: the copy keeps mode, owner,
        times and xattrs, so it is the same file to a reader. Nothing happens when the lowers
        show nothing there, or a directory.
        """
        found = self._lower_entry(path, upper=True)
        if found is None or found[0] < 0 or stat.S_ISDIR(found[1].st_mode):
            return
        index, st = found
        source = self._lower_path(index, path)
        above, _, name = path.rpartition(b"/")
        dir_fd = self.parent(above)[0]
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFREG:
            src = os.open(source, _O_READ_FILE)
            try:
                fd = os.open(name, _O_NEW_FILE, 0o600, dir_fd=dir_fd)
                try:
                    while os.copy_file_range(src, fd, CHUNK_SIZE):
                        pass
                    os.fchown(fd, st.st_uid, st.st_gid)
                    os.fchmod(fd, stat.S_IMODE(st.st_mode))
                    _set_xattrs(fd, read_xattrs(src), regular_or_dir=True)
                    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(fd)
            finally:
                os.close(src)
            return
        if kind == stat.S_IFLNK:
            os.symlink(os.readlink(source), name, dir_fd=dir_fd)
        else:
            os.mknod(name, st.st_mode, st.st_rdev, dir_fd=dir_fd)
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
        if kind != stat.S_IFLNK:
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd, follow_symlinks=False)
        xattrs = read_xattrs(os.fsdecode(source))
        if xattrs:
            target = f"/proc/self/fd/{dir_fd}/{os.fsdecode(name)}"
            _set_xattrs(target, xattrs, regular_or_dir=False)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    # --- removal ------------------------------------------------------------------------

    def _remove(self, dir_fd: int, name: bytes) -> bool:
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
        stack = [(dir_fd, name, os.open(name, _O_LIST_DIR, dir_fd=dir_fd))]
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
                    stack.append((fd, subdir, os.open(subdir, _O_LIST_DIR, dir_fd=fd)))
                    continue
                stack.pop()
                self._dir_removed(fd)
                os.close(fd)
                os.rmdir(dir_name, dir_fd=parent_fd)
        finally:
            for _, _, fd in stack:
                os.close(fd)

    def _dir_removed(self, fd: int) -> None:
        """Directory ``fd`` of this layer is about to be removed (a hook; nothing here)."""

    # --- entries ------------------------------------------------------------------------

    def apply(self, entry: TarEntry) -> None:
        path = _clean(entry.name)
        if not path:
            return
        if b"\x00" in path:
            raise InvalidArgument("the path holds a NUL byte")
        if path.count(b"/") >= self._limits.max_path_depth:
            raise LimitExceeded(
                f"the path depth is {path.count(b'/') + 1}, above the limit of "
                f"{self._limits.max_path_depth} (limit max_path_depth)"
            )
        if entry.xattrs:
            _check_xattrs(entry.xattrs)
        parent_path, _, name = path.rpartition(b"/")
        if name.startswith(_WHITEOUT):
            self._whiteout(entry, parent_path, name)
            return
        kind = entry.type
        if kind == EntryType.REGULAR:
            parent = self.parent(parent_path)
            self._regular(entry, parent, name)
        elif kind == EntryType.DIRECTORY:
            parent = self.parent(parent_path)
            self._directory(entry, parent[0], name, path)
        elif kind == EntryType.SYMLINK:
            parent = self.parent(parent_path)
            self._symlink(entry, parent[0], name)
        elif kind == EntryType.HARDLINK:
            parent = self._hardlink(entry, parent_path, name, path)
        elif kind in _DEVICE_TYPES:
            parent = self.parent(parent_path)
            self._device(entry, parent[0], name)
        else:
            raise InvalidArgument(f"unsupported entry type {chr(kind)!r}")
        self._note(parent, name)

    def _regular(self, entry: TarEntry, parent: _Dir, name: bytes) -> None:
        dir_fd = parent[0]
        try:
            fd = os.open(name, _O_NEW_FILE, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            self._remove(dir_fd, name)
            fd = os.open(name, _O_NEW_FILE, 0o600, dir_fd=dir_fd)
        try:
            data = entry.buffered()
            if data is not None:
                if data:
                    written = os.write(fd, data)
                    while written < len(data):
                        written += os.write(fd, data[written:])
            elif entry.sparse is None:
                write = os.write
                for _, piece in entry.chunks():
                    written = write(fd, piece)
                    while written < len(piece):
                        written += write(fd, piece[written:])
            else:
                pwrite = os.pwrite
                for offset, piece in entry.chunks():
                    written = pwrite(fd, piece, offset)
                    while written < len(piece):
                        written += pwrite(fd, piece[written:], offset + written)
                os.ftruncate(fd, entry.size)
            if entry.uid != self._euid or entry.gid != parent[3]:
                # A new file is ours already when the header asks for our ids: most files of
                # a layer, where this saves one syscall of six.
                os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode)
            if entry.xattrs:
                _set_xattrs(fd, entry.xattrs, regular_or_dir=True)
            mtime = entry.mtime_ns
            os.utime(fd, ns=(mtime if entry.atime_ns is None else entry.atime_ns, mtime))
        finally:
            os.close(fd)

    def _directory(self, entry: TarEntry, dir_fd: int, name: bytes, path: bytes) -> None:
        replaced = False
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            created = True
        except FileExistsError:
            if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                created = False
            else:
                self._remove(dir_fd, name)
                os.mkdir(name, 0o700, dir_fd=dir_fd)
                created = replaced = True
        fd = os.open(name, _O_LIST_DIR, dir_fd=dir_fd)
        try:
            if created and not self._overlay:
                self._fresh.add(_dir_key(fd))
            elif not created:
                self._kept_dir(_dir_key(fd))
            if replaced and self._overlay:
                self._replaced_dir(fd, path)
            os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode)
            if entry.xattrs:
                _set_xattrs(fd, entry.xattrs, regular_or_dir=True)
        finally:
            os.close(fd)
        mtime = entry.mtime_ns
        self._dir_times.append((path, mtime if entry.atime_ns is None else entry.atime_ns, mtime))

    def _kept_dir(self, key: int) -> None:
        """An existing directory takes a directory entry's attributes."""
        # Cached records hold the group new files get here; it may change now.
        self.forget(key)

    def _replaced_dir(self, fd: int, path: bytes) -> None:
        """OVERLAY mode: directory ``fd`` at ``path`` replaced a non-directory of this layer."""
        if self._hides_a_lower_dir(path):
            # What this layer put here before (a whiteout, a file) hid the lowers.
            _set_xattr(fd, self._opaque_xattr, b"y")

    def _symlink(self, entry: TarEntry, dir_fd: int, name: bytes) -> None:
        target = entry.linkname
        if not target:
            raise InvalidArgument("a symlink with an empty target")
        if b"\x00" in target:
            raise InvalidArgument("a symlink target holds a NUL byte")
        try:
            os.symlink(target, name, dir_fd=dir_fd)
        except FileExistsError:
            self._remove(dir_fd, name)
            os.symlink(target, name, dir_fd=dir_fd)
        self._finish_by_name(entry, dir_fd, name, chmod=False)

    def _device(self, entry: TarEntry, dir_fd: int, name: bytes) -> None:
        major, minor = entry.devmajor, entry.devminor
        if not (0 <= major < _DEV_MAX and 0 <= minor < _DEV_MAX):
            raise InvalidArgument(f"device number {major}:{minor} out of range")
        mode = _DEVICE_TYPES[EntryType(entry.type)] | 0o600
        if self._overlay and stat.S_ISCHR(mode) and major == minor == 0:
            raise InvalidArgument("a 0:0 character device; overlayfs would read it as a whiteout")
        device = os.makedev(major, minor)
        try:
            os.mknod(name, mode, device, dir_fd=dir_fd)
        except FileExistsError:
            self._remove(dir_fd, name)
            os.mknod(name, mode, device, dir_fd=dir_fd)
        self._finish_by_name(entry, dir_fd, name, chmod=True)

    def _finish_by_name(self, entry: TarEntry, dir_fd: int, name: bytes, *, chmod: bool) -> None:
        """Owner, mode, xattrs and times of something that cannot be opened (no fd)."""
        os.chown(name, entry.uid, entry.gid, dir_fd=dir_fd, follow_symlinks=False)
        if chmod:
            os.chmod(name, entry.mode, dir_fd=dir_fd, follow_symlinks=False)
        if entry.xattrs:
            # The fd's /proc link pins the directory; the last component is not followed.
            target = f"/proc/self/fd/{dir_fd}/{os.fsdecode(name)}"
            _set_xattrs(target, entry.xattrs, regular_or_dir=False)
        mtime = entry.mtime_ns
        atime = mtime if entry.atime_ns is None else entry.atime_ns
        os.utime(name, ns=(atime, mtime), dir_fd=dir_fd, follow_symlinks=False)

    def _hardlink(self, entry: TarEntry, parent_path: bytes, name: bytes, path: bytes) -> _Dir:
        target = _clean(entry.linkname)
        if not target or b"\x00" in target:
            raise InvalidArgument(f"invalid hard link target '{_text(entry.linkname)}'")
        if target == path:
            raise InvalidArgument("a hard link to itself")
        if target.count(b"/") >= self._limits.max_path_depth:
            raise LimitExceeded(
                f"the hard link target depth is above the limit of "
                f"{self._limits.max_path_depth} (limit max_path_depth)"
            )
        target_parent, _, target_name = target.rpartition(b"/")
        missing = InvalidArgument(f"hard link target '{_text(entry.linkname)}' does not exist")
        found = self._link_target(target_parent, target_name)
        if found is None and self._overlay:
            self._copy_up(target)
            found = self._link_target(target_parent, target_name)
        if found is None:
            raise missing
        source, mode = found
        if stat.S_ISDIR(mode):
            raise InvalidArgument(f"hard link target '{_text(entry.linkname)}' is a directory")
        parent = self.parent(parent_path)
        # The source may have been dropped from the cache by resolving the parent; its fd
        # stays open until release() after this entry.
        try:
            os.link(
                target_name,
                name,
                src_dir_fd=source[0],
                dst_dir_fd=parent[0],
                follow_symlinks=False,
            )
        except FileExistsError:
            self._remove(parent[0], name)
            try:
                os.link(
                    target_name,
                    name,
                    src_dir_fd=source[0],
                    dst_dir_fd=parent[0],
                    follow_symlinks=False,
                )
            except FileNotFoundError:
                raise missing from None
        return parent

    def _link_target(self, parent_path: bytes, name: bytes) -> tuple[_Dir, int] | None:
        """The directory holding hard link target ``name`` and the target's mode, if any.

        A whiteout is no target: in OVERLAY mode it means this layer deleted the path.
        """
        source = self.lookup(parent_path)
        if source is None:
            return None
        try:
            st = os.stat(name, dir_fd=source[0], follow_symlinks=False)
        except FileNotFoundError:
            return None
        if self._overlay and _is_whiteout(st):
            return None
        return source, st.st_mode

    # --- whiteouts ----------------------------------------------------------------------

    def _whiteout(self, entry: TarEntry, parent_path: bytes, name: bytes) -> None:
        if name == _OPAQUE:
            if not self._overlay:
                self._delete_opaque(parent_path)
            elif parent_path:
                self._overlay_opaque(parent_path)
            else:
                self._overlay_opaque_root(entry)
            return
        hidden = hidden_name(name)
        if self._overlay:
            path = parent_path + b"/" + hidden if parent_path else hidden
            shown = self._lower_entry(path, upper=True)
            if shown is not None and shown[0] >= 0:
                parent = self.parent(parent_path)
                self._make_whiteout(parent[0], hidden, entry.uid, entry.gid)
            return
        found = self.lookup(parent_path)
        if found is None or self._created_here(found, hidden):
            return
        self._remove(found[0], hidden)

    def _overlay_opaque(self, path: bytes) -> None:
        shown = self._lower_entry(path, upper=True)
        if shown is None or not stat.S_ISDIR(shown[1].st_mode):
            return  # no directory there (or this layer's non-directory): nothing below it
        if self._hides_a_lower_dir(path):
            self._set_opaque(self.parent(path)[0])

    def _overlay_opaque_root(self, entry: TarEntry) -> None:
        """Hide every lower child of the root: overlayfs ignores the flag on a layer's root."""
        names: set[bytes] = set()
        for lower in self._lowers:
            names.update(os.listdir(lower.root_path))
        for name in sorted(names):
            shown = self._lower_entry(name, upper=True)
            if shown is None:
                continue
            if shown[0] >= 0:
                self._make_whiteout(self.root_fd, name, entry.uid, entry.gid)
            elif stat.S_ISDIR(shown[1].st_mode) and self._hides_a_lower_dir(name):
                self._set_opaque(self.root_fd, name)

    def _delete_opaque(self, path: bytes) -> None:
        """Remove every child of ``path`` (and below) that this layer did not create."""
        found = self.lookup(path)
        if found is None or found[2]:
            return
        removed = False
        pending = [(os.open(".", _O_LIST_DIR, dir_fd=found[0]), found[1])]
        try:
            while pending:
                fd, key = pending.pop()
                try:
                    created = self._created.get(key, set())
                    for child in os.listdir(fd):
                        name = os.fsencode(child)
                        if name not in created:
                            removed |= self._remove(fd, name)
                            continue
                        try:
                            child_fd = os.open(name, _O_LIST_DIR, dir_fd=fd)
                        except OSError as exc:
                            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                                continue  # a file or symlink this layer made
                            raise
                        child_key = _dir_key(child_fd)
                        if child_key in self._fresh:
                            os.close(child_fd)
                        else:
                            pending.append((child_fd, child_key))
                finally:
                    os.close(fd)
        finally:
            for fd, _ in pending:
                os.close(fd)
        if removed:
            self.invalidate()

    def finish(self) -> None:
        """Set directory times, now that no child will be added."""
        for path, atime, mtime in self._dir_times:
            self.set_dir_times(path, atime, mtime)
        self.release()

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


def apply_tar(
    root: Path,
    tar: BinaryIO,
    *,
    limits: Limits = _DEFAULT_LIMITS,
    whiteouts: WhiteoutMode = WhiteoutMode.DELETE,
    parent_roots: Sequence[Path] = (),
    userxattr: bool = False,
) -> ApplyResult:
    """Apply an uncompressed OCI layer tar onto ``root``; reads ``tar`` to its end.

    See the module docstring for the rules. Nothing outside ``root`` is ever written.

    :param root: the directory to apply onto (the parent's content, or an empty upper dir).
    :param tar: the uncompressed tar stream.
    :param limits: bounds for a hostile tar.
    :param whiteouts: delete whiteout targets, or write overlayfs whiteouts.
    :param parent_roots: lower trees, nearest first, whose directories lend their attributes
        to parent directories this tar needs but does not carry; in OVERLAY mode, the lower
        dirs of the overlay whose upper dir ``root`` is.
    :param userxattr: OVERLAY mode: mark opaque directories with ``user.overlay.opaque``, as
        overlayfs mounted with ``userxattr`` (in a user namespace) reads them.
    :raises InvalidArgument: a malformed or refused entry ("layer tar entry 'a/b': ...").
    :raises LimitExceeded: a limit was broken.
    :raises Unsupported: the target filesystem refused an xattr.
    """
    reader = TarReader(tar, limits)
    applier = _Applier(root, limits, whiteouts, parent_roots, userxattr)
    return apply_entries(applier, reader)


def apply_entries(applier: _Applier, reader: TarReader) -> ApplyResult:
    """Apply every entry ``reader`` gives with ``applier``, finish, and close it."""
    count = 0
    try:
        for entry in reader:
            count += 1
            try:
                applier.apply(entry)
            except LaminaeError as exc:
                _rename_error(exc, entry)
            except OSError as exc:
                _entry_os_error(exc, entry)
            finally:
                if applier.retired:
                    applier.release()
        with map_os_errors("layer tar: setting directory times"):
            applier.finish()
    finally:
        applier.close()
    return ApplyResult(reader.bytes_read, count)


def _rename_error(exc: LaminaeError, entry: TarEntry) -> NoReturn:
    """Say which entry an error is about (the tar reader's own errors already do)."""
    if str(exc).startswith("layer tar"):
        raise exc
    message = f"layer tar entry '{_text(entry.name)}': {exc}"
    raise type(exc)(message) from (exc.__cause__ or exc)


def _entry_os_error(exc: OSError, entry: TarEntry) -> NoReturn:
    what = f"layer tar entry '{_text(entry.name)}'"
    if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL):
        # The tar asked for something the kernel calls invalid: a bad input, not a failure.
        raise InvalidArgument(f"{what}: {exc.strerror}") from exc
    with map_os_errors(what):
        raise exc
    raise AssertionError("unreachable")  # pragma: no cover


# --- writing --------------------------------------------------------------------------------

_NAME_MAX: Final = 100
_PREFIX_MAX: Final = 155
_OCTAL8_MAX: Final = 0o7777777
_OCTAL12_MAX: Final = 0o77777777777
_TYPE_FLAGS: Final = {
    stat.S_IFREG: b"0",
    stat.S_IFLNK: b"2",
    stat.S_IFCHR: b"3",
    stat.S_IFBLK: b"4",
    stat.S_IFDIR: b"5",
    stat.S_IFIFO: b"6",
}
_PAX_NAME: Final = b"././@PaxHeader"


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, value)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length += 1
    return b"%d" % length + body


def _pax_time(ns: int) -> bytes:
    sign = b"-" if ns < 0 else b""
    seconds, fraction = divmod(abs(ns), 1_000_000_000)
    if not fraction:
        return sign + b"%d" % seconds
    return sign + (b"%d.%09d" % (seconds, fraction)).rstrip(b"0")


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """``(prefix, name)`` fitting ustar's fields, or ``None``."""
    if len(name) <= _NAME_MAX:
        return b"", name
    # The split is at a slash; the name part may keep a directory's trailing one.
    cut = name.rfind(b"/", 0, len(name) - 1)
    while cut > 0:
        if cut <= _PREFIX_MAX and len(name) - cut - 1 <= _NAME_MAX:
            return name[:cut], name[cut + 1 :]
        cut = name.rfind(b"/", 0, cut)
    return None


def _block(
    name: bytes,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    prefix: bytes = b"",
) -> bytes:
    header = b"".join(
        (
            name.ljust(100, b"\x00"),
            _octal(mode, 8),
            _octal(uid, 8),
            _octal(gid, 8),
            _octal(size, 12),
            _octal(mtime, 12),
            b" " * 8,
            typeflag,
            linkname.ljust(100, b"\x00"),
            b"ustar\x0000",
            bytes(64),  # uname, gname: left empty, image-spec says to ignore them
            _octal(devmajor, 8),
            _octal(devminor, 8),
            prefix.ljust(155, b"\x00"),
            bytes(12),
        )
    )
    checksum = b"%06o\x00 " % sum(header)
    return header[:148] + checksum + header[156:]


class _TarWriter:
    """PAX headers and data blocks, written straight to ``out``."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def entry(
        self,
        name: bytes,
        typeflag: bytes,
        st: os.stat_result | None,
        *,
        size: int = 0,
        linkname: bytes = b"",
        xattrs: dict[bytes, bytes] | None = None,
    ) -> None:
        if st is None:
            mode = uid = gid = mtime_ns = devmajor = devminor = 0
        else:
            mode = stat.S_IMODE(st.st_mode)
            uid, gid, mtime_ns = st.st_uid, st.st_gid, st.st_mtime_ns
            devmajor = devminor = 0
            if typeflag in (b"3", b"4"):
                devmajor, devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        records: list[tuple[bytes, bytes]] = []
        split = _split_ustar(name) if name.isascii() else None
        if split is None:
            records.append((b"path", name))
            split = b"", name[:_NAME_MAX]
        if len(linkname) > _NAME_MAX or not linkname.isascii():
            records.append((b"linkpath", linkname))
            linkname = linkname[:_NAME_MAX]
        if size > _OCTAL12_MAX:
            records.append((b"size", b"%d" % size))
        if uid > _OCTAL8_MAX:
            records.append((b"uid", b"%d" % uid))
        if gid > _OCTAL8_MAX:
            records.append((b"gid", b"%d" % gid))
        seconds = mtime_ns // 1_000_000_000
        if mtime_ns % 1_000_000_000 or not 0 <= seconds <= _OCTAL12_MAX:
            records.append((b"mtime", _pax_time(mtime_ns)))
        if xattrs:
            for key in sorted(xattrs):
                records.append((b"SCHILY.xattr." + key, xattrs[key]))
        if records:
            if not all(_is_utf8(k) and _is_utf8(v) for k, v in records):
                records.insert(0, (b"hdrcharset", b"BINARY"))
            data = b"".join(_pax_record(k, v) for k, v in records)
            self._out.write(_block(_PAX_NAME, b"x", 0o644, 0, 0, len(data), 0))
            self._out.write(data)
            self._pad(len(data))
        self._out.write(
            _block(
                split[1],
                typeflag,
                mode,
                min(uid, _OCTAL8_MAX),
                min(gid, _OCTAL8_MAX),
                min(size, _OCTAL12_MAX),
                min(max(seconds, 0), _OCTAL12_MAX),
                linkname,
                devmajor,
                devminor,
                split[0],
            )
        )

    def _pad(self, size: int) -> None:
        if size % 512:
            self._out.write(bytes(512 - size % 512))

    def data(self, fd: int, size: int, path: bytes) -> None:
        left = size
        while left > 0:
            piece = os.read(fd, min(left, CHUNK_SIZE))
            if not piece:
                raise InvalidArgument(
                    f"layer diff entry '{_text(path)}': the file shrank while it was read"
                )
            self._out.write(piece)
            left -= len(piece)
        self._pad(size)

    def close(self) -> None:
        self._out.write(bytes(1024))


class _Differ(_Tree):
    """Reads the layer's tree for :func:`write_changes_tar`."""

    def __init__(self, root: Path, out: BinaryIO) -> None:
        super().__init__(root)
        self._tar = _TarWriter(out)
        self._dirs: set[bytes] = set()
        self._links: dict[tuple[int, int], bytes] = {}

    def change(self, change: Change) -> None:
        path = os.fsencode(change.path).strip(b"/")
        if not path or _clean(path) != path:
            raise InvalidArgument(f"change path {change.path!r} is not a clean absolute path")
        parent_path, _, name = path.rpartition(b"/")
        if parent_path and parent_path not in self._dirs:
            self._parents(parent_path)
        if change.kind is ChangeKind.DELETED:
            whiteout = (parent_path + b"/" if parent_path else b"") + _WHITEOUT + name
            self._tar.entry(whiteout, b"0", None)
            return
        parent = self.lookup(parent_path)
        if parent is None:
            raise InvalidArgument(f"layer diff entry '{change.path}': its parent is missing")
        self._write(parent[0], name, path)

    def finish(self) -> None:
        """Write the end-of-archive blocks."""
        self._tar.close()

    def _parents(self, parent_path: bytes) -> None:
        """Write the directories above a change that are not written yet (includeParents)."""
        parts = parent_path.split(b"/")
        for depth in range(1, len(parts) + 1):
            path = b"/".join(parts[:depth])
            if path in self._dirs:
                continue
            above, _, name = path.rpartition(b"/")
            parent = self.lookup(above)
            if parent is None:
                raise InvalidArgument(f"layer diff: parent directory '{_text(path)}' is missing")
            self._write(parent[0], name, path)

    def _write(self, dir_fd: int, name: bytes, path: bytes) -> None:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        kind = stat.S_IFMT(st.st_mode)
        typeflag = _TYPE_FLAGS.get(kind)
        if typeflag is None:
            return  # a socket: tar has no type for it
        if kind == stat.S_IFDIR:
            self._dirs.add(path)
            fd = os.open(name, _O_LIST_DIR, dir_fd=dir_fd)
            try:
                xattrs = _diff_xattrs(fd)
            finally:
                os.close(fd)
            self._tar.entry(path + b"/", typeflag, st, xattrs=xattrs)
            return
        if st.st_nlink > 1:
            inode = (st.st_dev, st.st_ino)
            first = self._links.get(inode)
            if first is not None:
                self._tar.entry(path, b"1", st, linkname=first)
                return
            self._links[inode] = path
        if kind == stat.S_IFREG:
            fd = os.open(name, _O_READ_FILE, dir_fd=dir_fd)
            try:
                self._tar.entry(path, typeflag, st, size=st.st_size, xattrs=_diff_xattrs(fd))
                self._tar.data(fd, st.st_size, path)
            finally:
                os.close(fd)
            return
        # Symlinks and devices cannot be opened safely: read them through the parent's fd.
        xattrs = _diff_xattrs(f"/proc/self/fd/{dir_fd}/{os.fsdecode(name)}")
        linkname = os.readlink(name, dir_fd=dir_fd) if kind == stat.S_IFLNK else b""
        self._tar.entry(path, typeflag, st, linkname=linkname, xattrs=xattrs)


def _diff_xattrs(target: str | int) -> dict[bytes, bytes]:
    xattrs = read_xattrs(target)
    if xattrs:
        for name in [n for n in xattrs if n.startswith(b"trusted.overlay.")]:
            del xattrs[name]
    return xattrs


def write_changes_tar(root: Path, changes: Iterable[Change], out: BinaryIO) -> None:
    """Write the OCI layer tar for ``changes``, reading content from ``root``.

    PAX format, entries in the order of ``changes``, each preceded by the directories above it
    that were not written yet (so their permissions travel with the layer). A deleted path
    becomes an empty ``.wh.<name>`` file with time 0; added and modified paths carry mode
    (setuid, setgid and sticky included), uid/gid (no user or group names), the modification
    time in nanoseconds (a PAX ``mtime`` record when it has a fraction) and every xattr as
    ``SCHILY.xattr.*`` (``hdrcharset=BINARY`` when a name or value is not UTF-8), except
    overlayfs's own ``trusted.overlay.*``. The first name of a multiply-linked inode is written
    as a file, later ones as hard links to it; sockets are skipped. The same tree and changes
    give the same bytes.

    :raises InvalidArgument: a change path is not clean, or a file shrank while being read.
    :raises OSError: a changed path cannot be read (translated by the caller).
    """
    differ = _Differ(root, out)
    try:
        for change in changes:
            try:
                differ.change(change)
            finally:
                differ.release()
        differ.finish()
    finally:
        differ.close()
