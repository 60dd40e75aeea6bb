"""Apply OCI layer tars onto a directory, safely.

:func:`apply_tar` follows image-spec "Applying changesets" and containerd's
``applyNaive``/``createTarFile``, with one difference that matters: every path is resolved
against a directory file descriptor, never by joining strings (docs/architecture.md,
invariant 1). An entry's parent directory is opened with ``openat2(root_fd,
parent, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``, so ``..`` and symlinks, absolute or not,
stay inside the root as if it were ``/``; where ``openat2`` is missing, a component-by-component
``O_NOFOLLOW`` walk does the same (symlinks re-rooted like containerd's ``fs.RootPath``, at most
255 of them). The final component is then created or changed with ``*at`` calls on that fd
(``O_NOFOLLOW|O_EXCL`` opens, ``mkdirat``, ``symlinkat``, ``linkat`` without
``AT_SYMLINK_FOLLOW``, ``mknodat``, ``fchownat(AT_SYMLINK_NOFOLLOW)``...), through
:class:`~laminae.archive._tree.Tree`. Every escape in the peers' history (docs/architecture.md,
"Security of extraction") resolves a path string and lets the kernel follow a link planted
earlier in the same archive; here there is no string to follow.

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
  are written verbatim (containment happens when a later entry is resolved). FIFOs are made
  with ``mknod``; character and block devices as :attr:`Limits.devices
  <laminae.archive._limits.Limits.devices>` says (made, skipped, or refused), and skipped where
  the kernel refuses ``mknod`` (rootless). Tar has no socket type, so there is nothing to skip;
  an unknown type is refused.
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
  overlayfs would read it as a whiteout. (:mod:`laminae.archive._overlayformat` applies the
  same tar before the lowers are there, and settles what they decide afterwards.)
* ``trusted.overlay.*`` and ``user.overlay.*`` xattrs in a tar are refused: they are
  overlayfs's own bookkeeping, and a forged ``redirect`` or ``opaque`` would let a layer alias
  or hide content of other layers. Every other xattr, ``trusted.*`` included, is content
  (:mod:`laminae.archive._layerxattrs`).

A failure raises at once and leaves the target half-written (the store throws the whole layer
away); it never leaves anything outside the root. Errors name the entry.
"""

from __future__ import annotations

import enum
import errno
import functools
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Final, NoReturn

import attrs

from laminae._exceptions import (
    InvalidArgument,
    LaminaeError,
    LimitExceeded,
    map_os_errors,
)
from laminae.archive._layerxattrs import check_xattr_names, set_layer_xattr, set_layer_xattrs
from laminae.archive._limits import Limits
from laminae.archive._lowers import Lowers
from laminae.archive._tarheader import EntryType, printable
from laminae.archive._tarstream import CHUNK_SIZE, TarEntry, TarReader
from laminae.archive._tree import (
    O_LIST_DIR,
    O_READ_FILE,
    Dir,
    Tree,
    clean_name,
    dir_key,
)
from laminae.archive._whiteouts import (
    OPAQUE_MARKER,
    OPAQUE_XATTRS,
    WHITEOUT_PREFIX,
    hidden_name,
    is_whiteout,
)
from laminae.kernel._xattrs import read_xattrs

__all__ = ["Applier", "ApplyResult", "WhiteoutMode", "apply_entries", "apply_tar"]


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
    devices_skipped: int = 0
    """Character and block devices not made: by the ``skip`` policy, or where the kernel
    refused ``mknod`` (rootless); hard links to them count too."""


_O_NEW_FILE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DEVICE_TYPES: Final = {
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}
_DEV_MAX: Final = 1 << 32
_DEFAULT_LIMITS: Final = Limits()


class Applier(Tree):
    """Applies the entries of one tar onto a root; see the module docstring for the rules.

    Hand it to :func:`apply_entries` with a :class:`~laminae.archive._tarstream.TarReader`.

    :param root: the directory to apply onto.
    :param limits: bounds for a hostile tar (the reader enforces all but ``max_path_depth``).
    :param whiteouts: delete whiteout targets, or write overlayfs whiteouts.
    :param parent_roots: the lower trees (:class:`~laminae.archive._lowers.Lowers`).
    :param userxattr: OVERLAY mode: opaque flags in ``user.overlay.*``.

    **A base class.** :mod:`laminae.archive._overlayformat` derives the detached apply from it
    (OVERLAY mode with no lower dirs, recording what the lowers would decide). These are the
    hooks a subclass may override, each called at one step of :meth:`apply`; the detached apply
    overrides all of them:

    - :meth:`apply`: one entry, before anything else;
    - :meth:`parent`: the directory an entry goes into, made when missing; it sets
      :attr:`creating` while it resolves, and the walk then calls :meth:`make_parent` (a
      component is missing) and :meth:`make_parent_over` (a component is this layer's
      whiteout), the hooks of :class:`~laminae.archive._tree.Tree`;
    - :meth:`kept_dir`: a directory entry lands on a directory that is there already;
    - :meth:`replaced_dir`: OVERLAY mode, a directory entry replaced a non-directory;
    - :meth:`dir_removed`: a directory of this layer is about to be removed (``Tree``'s hook);
    - :meth:`symlink`: a symlink entry is made;
    - :meth:`link_target`: a hard link's target is looked up, :meth:`copy_up` (OVERLAY mode)
      copies it up from the lowers when only they have it;
    - :meth:`whiteout`: a whiteout or opaque marker entry;
    - :meth:`finish`: after the last entry (directory times).

    A subclass may also call :meth:`make_whiteout` and :meth:`set_opaque`, read
    :attr:`opaque_xattr`, :attr:`dir_times` (directory entries' times, set at the end) and
    :attr:`lowers`. Everything with an underscore stays private to this module.
    """

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
        self.opaque_xattr = OPAQUE_XATTRS[userxattr]
        try:
            self.lowers = Lowers(self.root_path, parent_roots, self.opaque_xattr)
        except BaseException:
            super().close()
            raise
        # DELETE mode must know what this layer created, to spare it from whiteouts and
        # opaque markers that come later in the tar. Directories the layer created hold
        # nothing older, so only their identity is kept ("fresh"); the names are kept only
        # for children of directories that were already there. Identities, not paths, so a
        # path reached through a symlink counts the same as the real one.
        self._fresh: set[int] = set()
        self._created: dict[int, set[bytes]] = {}
        self.dir_times: list[tuple[bytes, int, int]] = []
        self.creating = False
        self._euid = os.geteuid()
        self.devices_skipped = 0
        # Paths of devices not made, so that a hard link to one is skipped with it.
        self._skipped: set[bytes] = set()

    def close(self) -> None:
        self.lowers.close()
        super().close()

    def release(self) -> None:
        super().release()
        self.lowers.release()

    def is_fresh(self, key: int) -> bool:
        return key in self._fresh

    def _note(self, parent: Dir, name: bytes) -> None:
        if not parent[2] and not self._overlay:
            created = self._created.get(parent[1])
            if created is None:
                self._created[parent[1]] = created = set()
            created.add(name)

    def _created_here(self, parent: Dir, name: bytes) -> bool:
        return parent[2] or name in self._created.get(parent[1], ())

    # --- resolution with creation -------------------------------------------------------

    def parent(self, path: bytes) -> Dir:
        """The directory at ``path``, created (with missing ancestors) when absent."""
        if path == self._last_path:
            return self._last
        self.creating = True
        try:
            found = self.lookup(path)
        finally:
            self.creating = False
        if found is None:
            raise InvalidArgument(f"a component of '{printable(path)}' is not a directory")
        return found

    def make_parent_over(
        self, dir_fd: int, name: bytes, st: os.stat_result, resolved: list[bytes]
    ) -> bool:
        # An entry below a path this layer whited out (".wh.x", then "x/y" with no "x/"):
        # DELETE mode deleted x and makes it again, so here the whiteout becomes a directory,
        # opaque because the whiteout hid everything below it.
        if not (self.creating and self._overlay and is_whiteout(st)):
            return False
        os.unlink(name, dir_fd=dir_fd)
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        fd = os.open(name, O_LIST_DIR, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o755)  # mkdir's mode went through the umask
            if self.lowers.hide_a_dir(b"/".join([*resolved, name])):
                set_layer_xattr(fd, self.opaque_xattr, b"y")
        finally:
            os.close(fd)
        return True

    def make_parent(self, dir_fd: int, name: bytes, resolved: list[bytes]) -> bool:
        if not self.creating:
            return False
        if self._overlay:
            # A lower non-directory there is a file of the parent's tree: applied onto that
            # tree (DELETE mode) the path would not resolve, so neither does it here.
            shown = self.lowers.shown(b"/".join([*resolved, name]), upper=True, beneath=True)
            if shown is not None and not stat.S_ISDIR(shown[1].st_mode):
                return False
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        fd = os.open(name, O_LIST_DIR, dir_fd=dir_fd)
        try:
            parent_key = dir_key(dir_fd)
            self._note((dir_fd, parent_key, parent_key in self._fresh, -1), name)
            self._fresh.add(dir_key(fd))
            path = b"/".join([*resolved, name])
            times = self._copy_parent_attributes(fd, path)
            if times is None:
                os.fchmod(fd, 0o755)  # mkdir's mode went through the umask
            else:
                # Set again after the last entry: children added below move the mtime.
                self.dir_times.append((path, *times))
        finally:
            os.close(fd)
        return True

    def _copy_parent_attributes(self, fd: int, path: bytes) -> tuple[int, int] | None:
        """Give a new directory the attributes it has in the nearest lower tree, if any.

        In OVERLAY mode "nearest" is what overlayfs shows over the lowers at ``path``.

        :returns: the (atime, mtime) copied, or ``None`` when no lower tree has it.
        """
        source = self.lowers.open_dir(path, overlay=self._overlay)
        if source is None:
            return None
        try:
            st = os.fstat(source)
            xattrs = read_xattrs(source)
        finally:
            os.close(source)
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        set_layer_xattrs(fd, xattrs, regular_or_dir=True)
        return st.st_atime_ns, st.st_mtime_ns

    # --- overlayfs's markers, and copy-up ----------------------------------------------

    def make_whiteout(self, dir_fd: int, name: bytes, uid: int, gid: int) -> None:
        """Make an overlayfs whiteout for ``name``, unless this layer has an entry there."""
        try:
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd)
        except FileExistsError:
            return  # this layer's own entry stays: whiteouts hide lower layers only
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)

    def set_opaque(self, dir_fd: int, name: bytes = b".") -> None:
        """Make a directory of this layer opaque, and drop the whiteouts below it.

        Below an opaque directory nothing merges with the lowers, so a whiteout made there
        earlier in the tar hides nothing, and overlayfs would list it as an entry that
        cannot be opened.
        """
        fd = os.open(name, O_LIST_DIR, dir_fd=dir_fd)
        pending = [fd]
        try:
            set_layer_xattr(fd, self.opaque_xattr, b"y")
            while pending:
                current = pending.pop()
                try:
                    with os.scandir(current) as entries:
                        for entry in entries:
                            if entry.is_dir(follow_symlinks=False):
                                pending.append(os.open(entry.name, O_LIST_DIR, dir_fd=current))
                            elif not entry.is_file(follow_symlinks=False) and is_whiteout(
                                entry.stat(follow_symlinks=False)
                            ):
                                os.unlink(entry.name, dir_fd=current)
                finally:
                    os.close(current)
        finally:
            for left in pending:
                os.close(left)

    def copy_up(self, path: bytes) -> None:
        """Copy the non-directory overlayfs shows at ``path`` from the lowers into this layer.

        What overlayfs does before linking to a lower file: the copy keeps mode, owner,
        times and xattrs, so it is the same file to a reader. Nothing happens when the lowers
        show nothing there, or a directory.
        """
        found = self.lowers.shown(path, upper=True)
        if found is None or found[0] < 0 or stat.S_ISDIR(found[1].st_mode):
            return
        index, st = found
        source = self.lowers.path(index, path)
        above, _, name = path.rpartition(b"/")
        dir_fd = self.parent(above)[0]
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFREG:
            src = os.open(source, O_READ_FILE)
            try:
                fd = os.open(name, _O_NEW_FILE, 0o600, dir_fd=dir_fd)
                try:
                    while os.copy_file_range(src, fd, CHUNK_SIZE):
                        pass
                    os.fchown(fd, st.st_uid, st.st_gid)
                    os.fchmod(fd, stat.S_IMODE(st.st_mode))
                    set_layer_xattrs(fd, read_xattrs(src), regular_or_dir=True)
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
            set_layer_xattrs(target, xattrs, regular_or_dir=False)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    # --- entries ------------------------------------------------------------------------

    def apply(self, entry: TarEntry) -> None:
        """Apply one entry of the tar (after the reader checked it)."""
        path = clean_name(entry.name)
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
            check_xattr_names(entry.xattrs)
        parent_path, _, name = path.rpartition(b"/")
        if name.startswith(WHITEOUT_PREFIX):
            self.whiteout(entry, parent_path, name)
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
            self.symlink(entry, parent[0], name)
        elif kind == EntryType.HARDLINK:
            if self._skipped and clean_name(entry.linkname) in self._skipped:
                self._skip_device(path)
                return
            parent = self._hardlink(entry, parent_path, name, path)
        elif kind in _DEVICE_TYPES:
            if entry.type != EntryType.FIFO and self._limits.devices.skips(
                entry.type == EntryType.CHAR, entry.devmajor, entry.devminor
            ):
                self._skip_device(path)
                return
            parent = self.parent(parent_path)
            if not self._device(entry, parent[0], name):
                self._skip_device(path)
                return
        else:
            raise InvalidArgument(f"unsupported entry type {chr(kind)!r}")
        # A path made again is no longer a skipped device.
        self._skipped.discard(path)
        self._note(parent, name)

    def _skip_device(self, path: bytes) -> None:
        self.devices_skipped += 1
        self._skipped.add(path)

    def _regular(self, entry: TarEntry, parent: Dir, name: bytes) -> None:
        dir_fd = parent[0]
        try:
            fd = os.open(name, _O_NEW_FILE, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            self.remove(dir_fd, name)
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
                set_layer_xattrs(fd, entry.xattrs, regular_or_dir=True)
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
                self.remove(dir_fd, name)
                os.mkdir(name, 0o700, dir_fd=dir_fd)
                created = replaced = True
        fd = os.open(name, O_LIST_DIR, dir_fd=dir_fd)
        try:
            if created and not self._overlay:
                self._fresh.add(dir_key(fd))
            elif not created:
                self.kept_dir(dir_key(fd))
            if replaced and self._overlay:
                self.replaced_dir(fd, path)
            os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode)
            if entry.xattrs:
                set_layer_xattrs(fd, entry.xattrs, regular_or_dir=True)
        finally:
            os.close(fd)
        mtime = entry.mtime_ns
        self.dir_times.append((path, mtime if entry.atime_ns is None else entry.atime_ns, mtime))

    def kept_dir(self, key: int) -> None:
        """An existing directory takes a directory entry's attributes."""
        # Cached records hold the group new files get here; it may change now.
        self.forget(key)

    def replaced_dir(self, fd: int, path: bytes) -> None:
        """OVERLAY mode: directory ``fd`` at ``path`` replaced a non-directory of this layer."""
        if self.lowers.hide_a_dir(path):
            # What this layer put here before (a whiteout, a file) hid the lowers.
            set_layer_xattr(fd, self.opaque_xattr, b"y")

    def symlink(self, entry: TarEntry, dir_fd: int, name: bytes) -> None:
        """Make symlink entry ``entry`` as ``name`` in directory ``dir_fd``."""
        target = entry.linkname
        if not target:
            raise InvalidArgument("a symlink with an empty target")
        if b"\x00" in target:
            raise InvalidArgument("a symlink target holds a NUL byte")
        try:
            os.symlink(target, name, dir_fd=dir_fd)
        except FileExistsError:
            self.remove(dir_fd, name)
            os.symlink(target, name, dir_fd=dir_fd)
        self._finish_by_name(entry, dir_fd, name, chmod=False)

    def _device(self, entry: TarEntry, dir_fd: int, name: bytes) -> bool:
        """Make a device or FIFO; ``False`` where the kernel refuses to make a device."""
        major, minor = entry.devmajor, entry.devminor
        if not (0 <= major < _DEV_MAX and 0 <= minor < _DEV_MAX):
            raise InvalidArgument(f"device number {major}:{minor} out of range")
        mode = _DEVICE_TYPES[EntryType(entry.type)] | 0o600
        if self._overlay and stat.S_ISCHR(mode) and major == minor == 0:
            raise InvalidArgument("a 0:0 character device; overlayfs would read it as a whiteout")
        device = os.makedev(major, minor)
        try:
            try:
                os.mknod(name, mode, device, dir_fd=dir_fd)
            except FileExistsError:
                self.remove(dir_fd, name)
                os.mknod(name, mode, device, dir_fd=dir_fd)
        except PermissionError:
            # No CAP_MKNOD, or a user namespace (where no device may be made): rootless
            # containers-storage and containerd skip devices, and so does this.
            if stat.S_ISFIFO(mode):
                raise
            return False
        self._finish_by_name(entry, dir_fd, name, chmod=True)
        return True

    def _finish_by_name(self, entry: TarEntry, dir_fd: int, name: bytes, *, chmod: bool) -> None:
        """Owner, mode, xattrs and times of something that cannot be opened (no fd)."""
        os.chown(name, entry.uid, entry.gid, dir_fd=dir_fd, follow_symlinks=False)
        if chmod:
            os.chmod(name, entry.mode, dir_fd=dir_fd, follow_symlinks=False)
        if entry.xattrs:
            # The fd's /proc link pins the directory; the last component is not followed.
            target = f"/proc/self/fd/{dir_fd}/{os.fsdecode(name)}"
            set_layer_xattrs(target, entry.xattrs, regular_or_dir=False)
        mtime = entry.mtime_ns
        atime = mtime if entry.atime_ns is None else entry.atime_ns
        os.utime(name, ns=(atime, mtime), dir_fd=dir_fd, follow_symlinks=False)

    def _hardlink(self, entry: TarEntry, parent_path: bytes, name: bytes, path: bytes) -> Dir:
        target = clean_name(entry.linkname)
        if not target or b"\x00" in target:
            raise InvalidArgument(f"invalid hard link target '{printable(entry.linkname)}'")
        if target == path:
            raise InvalidArgument("a hard link to itself")
        if target.count(b"/") >= self._limits.max_path_depth:
            raise LimitExceeded(
                f"the hard link target depth is above the limit of "
                f"{self._limits.max_path_depth} (limit max_path_depth)"
            )
        target_parent, _, target_name = target.rpartition(b"/")
        missing = InvalidArgument(f"hard link target '{printable(entry.linkname)}' does not exist")
        found = self.link_target(target_parent, target_name)
        if found is None and self._overlay:
            self.copy_up(target)
            found = self.link_target(target_parent, target_name)
        if found is None:
            raise missing
        source, mode = found
        if stat.S_ISDIR(mode):
            raise InvalidArgument(f"hard link target '{printable(entry.linkname)}' is a directory")
        parent = self.parent(parent_path)
        # The source may have been dropped from the cache by resolving the parent; its fd
        # stays open until release() after this entry.
        link = functools.partial(
            os.link, target_name, name, src_dir_fd=source[0], dst_dir_fd=parent[0]
        )
        try:
            link(follow_symlinks=False)
        except FileExistsError:
            self.remove(parent[0], name)
            try:
                link(follow_symlinks=False)
            except FileNotFoundError:
                raise missing from None
        return parent

    def link_target(self, parent_path: bytes, name: bytes) -> tuple[Dir, int] | None:
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
        if self._overlay and is_whiteout(st):
            return None
        return source, st.st_mode

    # --- whiteouts ----------------------------------------------------------------------

    def whiteout(self, entry: TarEntry, parent_path: bytes, name: bytes) -> None:
        """Apply whiteout or opaque marker ``name`` in the directory at ``parent_path``."""
        if name == OPAQUE_MARKER:
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
            shown = self.lowers.shown(path, upper=True)
            if shown is not None and shown[0] >= 0:
                parent = self.parent(parent_path)
                self.make_whiteout(parent[0], hidden, entry.uid, entry.gid)
            return
        found = self.lookup(parent_path)
        if found is None or self._created_here(found, hidden):
            return
        self.remove(found[0], hidden)

    def _overlay_opaque(self, path: bytes) -> None:
        shown = self.lowers.shown(path, upper=True)
        if shown is None or not stat.S_ISDIR(shown[1].st_mode):
            return  # no directory there (or this layer's non-directory): nothing below it
        if self.lowers.hide_a_dir(path):
            self.set_opaque(self.parent(path)[0])

    def _overlay_opaque_root(self, entry: TarEntry) -> None:
        """Hide every lower child of the root: overlayfs ignores the flag on a layer's root."""
        for name in sorted(self.lowers.root_names()):
            shown = self.lowers.shown(name, upper=True)
            if shown is None:
                continue
            if shown[0] >= 0:
                self.make_whiteout(self.root_fd, name, entry.uid, entry.gid)
            elif stat.S_ISDIR(shown[1].st_mode) and self.lowers.hide_a_dir(name):
                self.set_opaque(self.root_fd, name)

    def _delete_opaque(self, path: bytes) -> None:
        """Remove every child of ``path`` (and below) that this layer did not create."""
        found = self.lookup(path)
        if found is None or found[2]:
            return
        removed = False
        pending = [(os.open(".", O_LIST_DIR, dir_fd=found[0]), found[1])]
        try:
            while pending:
                fd, key = pending.pop()
                try:
                    created = self._created.get(key, set())
                    for child in os.listdir(fd):
                        name = os.fsencode(child)
                        if name not in created:
                            removed |= self.remove(fd, name)
                            continue
                        try:
                            child_fd = os.open(name, O_LIST_DIR, dir_fd=fd)
                        except OSError as exc:
                            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                                continue  # a file or symlink this layer made
                            raise
                        child_key = dir_key(child_fd)
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
        for path, atime, mtime in self.dir_times:
            self.set_dir_times(path, atime, mtime)
        self.release()


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
    applier = Applier(root, limits, whiteouts, parent_roots, userxattr)
    return apply_entries(applier, reader)


def apply_entries(applier: Applier, reader: TarReader) -> ApplyResult:
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
    return ApplyResult(reader.bytes_read, count, applier.devices_skipped)


def _rename_error(exc: LaminaeError, entry: TarEntry) -> NoReturn:
    """Say which entry an error is about (the tar reader's own errors already do)."""
    if str(exc).startswith("layer tar"):
        raise exc
    message = f"layer tar entry '{printable(entry.name)}': {exc}"
    raise type(exc)(message) from (exc.__cause__ or exc)


def _entry_os_error(exc: OSError, entry: TarEntry) -> NoReturn:
    what = f"layer tar entry '{printable(entry.name)}'"
    if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL):
        # The tar asked for something the kernel calls invalid: a bad input, not a failure.
        raise InvalidArgument(f"{what}: {exc.strerror}") from exc
    with map_os_errors(what):
        raise exc
    raise AssertionError("unreachable")  # pragma: no cover
