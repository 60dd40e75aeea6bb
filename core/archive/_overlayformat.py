"""An overlayfs layer dir applied before its parents are there: detached apply, then settle.

The OVERLAY mode of :func:`laminae.driverkit.apply_tar` reads the lower dirs while it applies: a
whiteout is written only where a lower shows the name, an opaque flag only where a lower shows
a directory beneath, a missing parent directory takes the attributes of the lowers' one (or
is refused when the lowers show a file there). So a layer waits for its parents.
:func:`apply_tar_detached` writes the same tar without any lower, and :func:`settle_detached`
later fixes what depended on them, so that the layers of one image are written side by side
and the result is still, byte for byte, what the sequential apply makes.

Detached, the applier writes every whiteout and every opaque flag, and makes missing parent
directories ``0755`` root-owned; it records where it did (:class:`Unsettled`). The settle step
reads the lowers as overlayfs does and removes the whiteouts that hide nothing, removes the
opaque flags that hide no lower directory, gives the parent directories the lowers' mode,
owner, xattrs and times, and refuses a path through a lower non-directory with the error the
sequential apply gives for that entry.

Why recording is enough: what the sequential apply decides for a path depends on the lowers
and on the layer's own directories above that path. A directory of the layer that got an
opaque flag, or replaced something (a file, a whiteout), hides every lower below it whether
its flag stays or not: when it stays the flag hides them, when it goes the lowers show no
directory there. So a path below such a directory ("shadowed") needs nothing from the lowers:
the applier writes no whiteout or flag there, as the sequential apply would not, and records
nothing. Any other path sees exactly the lowers through plain directories, and what the
lowers show at a path never changes; so each record is settled by what the lowers alone show
at its path. Shadowing only grows while a tar is applied (a directory that loses its place is
made again over what replaced it, or below something that did), so a set of paths tracks it.

What cannot be done without the lowers raises :class:`laminae.driverkit.ParentsNeeded`, and the
caller applies the tar the sequential way once the parents are there:

* an opaque marker at the root (it becomes a whiteout per lower name);
* a hard link to a file the tar did not make (it copies the lower file up);
* a whiteout or an opaque marker in a directory the tar did not make first (the sequential
  apply makes that directory only when the lowers show what it hides);
* a directory that replaces a non-directory through a symlink of the layer (its flag is
  decided by the path as written);
* more records than ``max_entries`` (the memory bound);
* an entry refused after a parent directory was made that the lowers might refuse first
  (the sequential apply would name that earlier entry);
* at settle: a made parent directory that takes a setgid bit or a default ACL from the
  lowers while it holds something (what was made in it inherits those).

Tars written by diff tools (every directory before what it holds, opaque markers after their
directory, hard links to earlier entries) never need that.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Final

import attrs

from laminae._exceptions import InvalidArgument, LaminaeError, ParentsNeeded, map_os_errors
from laminae.archive._apply import Applier, ApplyResult, WhiteoutMode, apply_entries
from laminae.archive._layerxattrs import set_layer_xattr, set_layer_xattrs
from laminae.archive._limits import Limits
from laminae.archive._lowers import Lowers
from laminae.archive._tarheader import printable
from laminae.archive._tarstream import TarEntry, TarReader
from laminae.archive._tree import O_LIST_DIR, O_PATH_DIR, Dir, Tree, dir_key
from laminae.archive._whiteouts import OPAQUE_MARKER, OPAQUE_XATTRS, hidden_name, is_whiteout
from laminae.kernel._xattrs import read_xattrs, remove_xattr

__all__ = ["ImplicitDir", "Unsettled", "apply_tar_detached", "settle_detached"]

_O_PATH_NOFOLLOW_DIR: Final = O_PATH_DIR | os.O_NOFOLLOW
_DEFAULT_ACL: Final = b"system.posix_acl_default"
_DEFAULT_LIMITS: Final = Limits()


@attrs.frozen
class ImplicitDir:
    """A parent directory the detached apply made because the tar did not carry it."""

    path: bytes
    """Where, relative to the root, as resolved (no symlink in it when it was made)."""
    entry: bytes
    """The name of the entry that needed it, for the error the sequential apply gives."""
    wanted: bytes
    """The directory path that entry asked for (``a/b`` for ``a/b/file``), for the same."""
    live: bool
    """Whether the directory made then is still there at the end of the apply."""
    explicit: bool
    """Whether a directory entry later gave it attributes of its own."""
    times_target: int | None
    """The identity of the directory the sequential apply would set times on for ``path``
    (``None``: there is none at the end)."""
    times_overridden: bool
    """Whether a directory entry for that directory comes after this one in the tar."""


@attrs.frozen
class Unsettled:
    """What :func:`apply_tar_detached` leaves for :func:`settle_detached`; opaque to drivers.

    Bounded by the tar's entry count (``max_entries``) records of a few path bytes each.
    """

    result: ApplyResult
    """The tar's size and entry count."""
    whiteouts: tuple[bytes, ...] = ()
    """Paths where a whiteout was written, in order."""
    opaque: tuple[bytes, ...] = ()
    """Directories that got an opaque flag, in order."""
    implicit: tuple[ImplicitDir, ...] = ()
    """Parent directories made, in order."""

    @property
    def settled_already(self) -> bool:
        """Whether nothing depends on the lowers (settling with any parents changes nothing)."""
        return not (self.whiteouts or self.opaque or self.implicit)


@attrs.define
class _Made:
    """An :class:`ImplicitDir` while the apply goes on."""

    path: bytes
    key: int
    entry: bytes
    wanted: bytes
    position: int
    live: bool = True
    explicit: bool = False


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class _DetachedApplier(Applier):
    """OVERLAY mode without lowers: write every marker, record what the lowers decide.

    Built on the hooks the applier offers a subclass (listed in
    :class:`~laminae.archive._apply.Applier`): where the sequential apply would read the
    lowers, this one writes the marker or directory anyway and records the path.
    """

    def __init__(self, root: Path, limits: Limits, userxattr: bool) -> None:
        super().__init__(root, limits, WhiteoutMode.OVERLAY, (), userxattr)
        self._shadows: set[bytes] = set()
        self._whiteouts: dict[bytes, None] = {}
        self._opaque: dict[bytes, None] = {}
        self._made: list[_Made] = []
        self._live: dict[int, _Made] = {}
        self._entry_name = b""
        self._wanted = b""
        self._symlinks = False
        self._records_max = limits.max_entries
        self._targets: list[tuple[int | None, bool]] = []

    # --- what is recorded -----------------------------------------------------------------

    def _count(self) -> None:
        if len(self._whiteouts) + len(self._opaque) + len(self._made) > self._records_max:
            raise ParentsNeeded(
                f"more than {self._records_max} whiteouts, opaque directories and made "
                "parents to settle (limit max_entries)"
            )

    def _shadowed(self, path: bytes, *, inclusive: bool) -> bool:
        """Whether a directory above ``path`` (or ``path`` itself, if ``inclusive``) hides
        every lower below it (see the module docstring)."""
        if not self._shadows:
            return False
        if inclusive and path in self._shadows:
            return True
        cut = path.find(b"/")
        while cut >= 0:
            if path[:cut] in self._shadows:
                return True
            cut = path.find(b"/", cut + 1)
        return False

    def _is_real(self, fd: int, path: bytes) -> bool:
        """Whether directory ``fd`` is at ``path`` itself, not reached through a symlink."""
        if not self._symlinks:
            return True  # no symlink of this layer to go through: the clean path is real
        real, root = (os.readlink(b"/proc/self/fd/%d" % n) for n in (fd, self.root_fd))
        return real == (root + b"/" + path if path else root)

    def _upper_dir(self, path: bytes, what: str) -> int | None:
        """An ``O_PATH`` fd of the directory at ``path`` when every component of it is a
        directory of this layer, read as written (no symlink followed), as the sequential
        apply reads this layer over the lowers; ``None`` when one is something else (a
        symlink, a file, a whiteout), below which the lowers show nothing.

        :raises ParentsNeeded: a component is missing: the lowers decide what is there.
        """
        fd = os.dup(self.root_fd)
        try:
            for component in path.split(b"/") if path else ():
                try:
                    next_fd = os.open(component, _O_PATH_NOFOLLOW_DIR, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        return None
                    if exc.errno == errno.ENOENT:
                        raise ParentsNeeded(
                            f"{what} in '{printable(path)}', a directory this tar does not "
                            "make first"
                        ) from None
                    raise
                os.close(fd)
                fd = next_fd
            found, fd = fd, -1
            return found
        finally:
            if fd >= 0:
                os.close(fd)

    def _flag(self, fd: int, path: bytes) -> None:
        """Directory ``fd`` at ``path`` hides what is below it: flag it unless shadowed."""
        if not self._shadowed(path, inclusive=False):
            set_layer_xattr(fd, self.opaque_xattr, b"y")
            self._opaque[path] = None
            self._count()
        self._shadows.add(path)

    # --- hooks of the sequential applier ----------------------------------------------------

    def apply(self, entry: TarEntry) -> None:
        self._entry_name = entry.name
        super().apply(entry)

    def parent(self, path: bytes) -> Dir:
        self._wanted = path
        return super().parent(path)

    def make_parent(self, dir_fd: int, name: bytes, resolved: list[bytes]) -> bool:
        if not self.creating:
            return False
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        fd = os.open(name, O_LIST_DIR, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o755)  # mkdir's mode went through the umask
            path = b"/".join([*resolved, name])
            if not self._shadowed(path, inclusive=False):
                made = _Made(path, dir_key(fd), self._entry_name, self._wanted, len(self.dir_times))
                self._made.append(made)
                self._live[made.key] = made
                self._count()
        finally:
            os.close(fd)
        return True

    def make_parent_over(
        self, dir_fd: int, name: bytes, st: os.stat_result, resolved: list[bytes]
    ) -> bool:
        if not (self.creating and is_whiteout(st)):
            return False
        os.unlink(name, dir_fd=dir_fd)
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        fd = os.open(name, O_LIST_DIR, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o755)
            self._flag(fd, b"/".join([*resolved, name]))
        finally:
            os.close(fd)
        return True

    def replaced_dir(self, fd: int, path: bytes) -> None:
        if not self._is_real(fd, path):
            raise ParentsNeeded(
                f"directory '{printable(path)}' replaces a non-directory through a symlink"
            )
        self._flag(fd, path)

    def kept_dir(self, key: int) -> None:
        super().kept_dir(key)
        made = self._live.get(key)
        if made is not None:
            made.explicit = True

    def dir_removed(self, fd: int) -> None:
        made = self._live.pop(dir_key(fd), None)
        if made is not None:
            made.live = False

    def symlink(self, entry: TarEntry, dir_fd: int, name: bytes) -> None:
        self._symlinks = True
        super().symlink(entry, dir_fd, name)

    def link_target(self, parent_path: bytes, name: bytes) -> tuple[Dir, int] | None:
        found = super().link_target(parent_path, name)
        if found is not None and stat.S_ISLNK(found[1]):
            self._symlinks = True  # the link is one more symlink
        return found

    def copy_up(self, path: bytes) -> None:
        raise ParentsNeeded(f"a hard link to '{printable(path)}', which this tar does not hold")

    def whiteout(self, entry: TarEntry, parent_path: bytes, name: bytes) -> None:
        if name == OPAQUE_MARKER:
            self._opaque_marker(parent_path)
            return
        hidden = hidden_name(name)
        if self._shadowed(parent_path, inclusive=True):
            return  # nothing of the lowers shows here: the sequential apply writes nothing
        fd = self._upper_dir(parent_path, "a whiteout")
        if fd is None:
            return
        try:
            self.make_whiteout(fd, hidden, entry.uid, entry.gid)
        finally:
            os.close(fd)
        self._whiteouts[_join(parent_path, hidden)] = None
        self._count()

    def _opaque_marker(self, path: bytes) -> None:
        if not path:
            raise ParentsNeeded("an opaque marker at the root hides every name of the parents")
        if self._shadowed(path, inclusive=False):
            return
        fd = self._upper_dir(path, "an opaque marker")
        if fd is None:
            return
        try:
            self.set_opaque(fd)  # also drops the whiteouts below: they hide nothing now
        finally:
            os.close(fd)
        self._opaque[path] = None
        self._shadows.add(path)
        self._count()

    def finish(self) -> None:
        # As the sequential apply, plus: which directory each made parent's times would go
        # to, and whether a directory entry for that one comes later (its times win).
        last: dict[int, int] = {}
        for position, (path, atime, mtime) in enumerate(self.dir_times):
            key = self.set_dir_times(path, atime, mtime)
            if key is not None:
                last[key] = position
        for made in self._made:
            key = self.dir_identity(made.path)
            self._targets.append((key, key is not None and last.get(key, -1) >= made.position))
        self.release()

    @property
    def made_parents(self) -> bool:
        """Whether a parent directory was made that the lowers may refuse."""
        return bool(self._made)

    def unsettled(self, result: ApplyResult) -> Unsettled:
        return Unsettled(
            result=result,
            whiteouts=tuple(self._whiteouts),
            opaque=tuple(self._opaque),
            implicit=tuple(
                ImplicitDir(
                    path=made.path,
                    entry=made.entry,
                    wanted=made.wanted,
                    live=made.live,
                    explicit=made.explicit,
                    times_target=target,
                    times_overridden=overridden,
                )
                for made, (target, overridden) in zip(self._made, self._targets, strict=True)
            ),
        )


def apply_tar_detached(
    root: Path,
    tar: BinaryIO,
    *,
    limits: Limits = _DEFAULT_LIMITS,
    userxattr: bool = False,
) -> Unsettled:
    """Apply an uncompressed layer tar onto the empty overlayfs layer dir ``root`` without
    reading any lower dir; reads ``tar`` to its end.

    Everything of :func:`laminae.driverkit.apply_tar` in OVERLAY mode holds, except what depends on
    the lowers (see the module docstring); :func:`settle_detached` does that part.

    :param root: the layer's own dir (overlayfs upper dir), empty.
    :param tar: the uncompressed tar stream.
    :param limits: bounds for a hostile tar; ``max_entries`` also bounds the records.
    :param userxattr: write ``user.overlay.opaque`` flags (rootless overlayfs).
    :returns: what :func:`settle_detached` needs.
    :raises ParentsNeeded: the tar cannot be applied without the lowers; ``root`` holds
        garbage and must be emptied.
    :raises InvalidArgument: a malformed or refused entry, as :func:`laminae.driverkit.apply_tar`.
    :raises LimitExceeded: a limit was broken.
    """
    reader = TarReader(tar, limits)
    applier = _DetachedApplier(root, limits, userxattr)
    try:
        result = apply_entries(applier, reader)
    except ParentsNeeded:
        raise
    except LaminaeError as exc:
        if applier.made_parents:
            # The sequential apply may have refused one of those parents first, naming an
            # earlier entry: let it give the error.
            raise ParentsNeeded(
                f"the tar is refused ({exc}), after making parent directories the parents "
                "may refuse first"
            ) from exc
        raise
    return applier.unsettled(result)


class _Settler(Tree):
    """Reads the lowers as overlayfs does, and fixes the records of one detached apply."""

    def __init__(self, root: Path, parent_roots: Sequence[Path], userxattr: bool) -> None:
        super().__init__(root)
        self._opaque_xattr = OPAQUE_XATTRS[userxattr]
        try:
            self._lowers = Lowers(self.root_path, parent_roots, self._opaque_xattr)
        except BaseException:
            super().close()
            raise
        self._shown: dict[bytes, os.stat_result | None] = {}

    def close(self) -> None:
        self._lowers.close()
        super().close()

    def shown(self, path: bytes) -> os.stat_result | None:
        """What the lowers alone show at ``path`` (overlayfs's lookup), remembered."""
        if path not in self._shown:
            found = self._lowers.shown(path, upper=False)
            self._shown[path] = None if found is None else found[1]
        return self._shown[path]

    def shows_dir(self, path: bytes) -> bool:
        st = self.shown(path)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def open_real_parent(self, path: bytes) -> tuple[int, bytes] | None:
        """A readable fd of the directory holding ``path``, reached through directories
        only (a record's path had no symlink in it), and the last name; ``None`` if gone."""
        *above, name = path.split(b"/")
        fd = os.dup(self.root_fd)
        try:
            for component in above:
                try:
                    next_fd = os.open(component, _O_PATH_NOFOLLOW_DIR, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        return None
                    raise
                os.close(fd)
                fd = next_fd
            return os.open(".", O_LIST_DIR, dir_fd=fd), name
        finally:
            os.close(fd)

    def refuse(self, implicit: Sequence[ImplicitDir]) -> None:
        """Raise what the sequential apply raises for the first parent made through a lower
        non-directory."""
        for made in implicit:
            st = self.shown(made.path)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(
                    f"layer tar entry '{printable(made.entry)}': a component of "
                    f"'{printable(made.wanted)}' is not a directory"
                )

    def drop_whiteout(self, path: bytes) -> None:
        """Remove the whiteout at ``path``; its directory keeps its times."""
        found = self.open_real_parent(path)
        if found is None:
            return
        fd, name = found
        try:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if not is_whiteout(st):
                return  # this layer's own entry replaced it
            times = os.fstat(fd)
            os.unlink(name, dir_fd=fd)
            os.utime(fd, ns=(times.st_atime_ns, times.st_mtime_ns))
        finally:
            os.close(fd)

    def drop_flag(self, path: bytes) -> None:
        """Remove the opaque flag of the directory at ``path``."""
        fd = self.open_real_dir(path)
        if fd is None:
            return
        try:
            remove_xattr(fd, self._opaque_xattr)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
        finally:
            os.close(fd)

    def open_real_dir(self, path: bytes) -> int | None:
        found = self.open_real_parent(path)
        if found is None:
            return None
        fd, name = found
        try:
            return os.open(name, O_LIST_DIR, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise
        finally:
            os.close(fd)

    def lend_attributes(self, made: ImplicitDir) -> None:
        """Give a made parent the mode, owner and xattrs of the lowers' directory."""
        fd = self.open_real_dir(made.path)
        if fd is None:
            return
        try:
            found = self._lowers.shown(made.path, upper=False)
            assert found is not None
            source = os.open(self._lowers.path(found[0], made.path), O_LIST_DIR)
            try:
                st = os.fstat(source)
                xattrs = read_xattrs(source)
            finally:
                os.close(source)
            inherited = stat.S_ISGID & st.st_mode or _DEFAULT_ACL in xattrs
            if inherited and os.listdir(fd):
                raise ParentsNeeded(
                    f"parent directory '{printable(made.path)}' takes a setgid bit or a default "
                    "ACL from the parents, and what was made in it would have inherited it"
                )
            if made.explicit:
                # A directory entry came after: its owner and mode stand, and its xattrs
                # were set over the lowers' ones.
                present = set(read_xattrs(fd))
                xattrs = {k: v for k, v in xattrs.items() if k not in present}
            else:
                os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
            set_layer_xattrs(fd, xattrs, regular_or_dir=True)
        finally:
            os.close(fd)

    def lend_times(self, implicit: Sequence[ImplicitDir]) -> None:
        """Set the lowers' times where the sequential apply's last word on a directory's
        times is a made parent's (see :meth:`Applier.finish`)."""
        last: dict[int, ImplicitDir] = {}
        for made in implicit:
            if made.times_target is not None and self.shows_dir(made.path):
                last[made.times_target] = made
        for made in last.values():
            if made.times_overridden:
                continue
            st = self.shown(made.path)
            assert st is not None
            self.set_dir_times(made.path, st.st_atime_ns, st.st_mtime_ns)


def settle_detached(
    root: Path,
    unsettled: Unsettled,
    parent_roots: Sequence[Path],
    *,
    userxattr: bool = False,
) -> None:
    """Make ``root`` what :func:`laminae.driverkit.apply_tar` in OVERLAY mode with ``parent_roots``
    would have made of the tar :func:`apply_tar_detached` applied onto it.

    :param root: the layer dir the detached apply wrote.
    :param unsettled: what it returned.
    :param parent_roots: the lower dirs, nearest first, all complete and settled.
    :param userxattr: as given to the detached apply.
    :raises InvalidArgument: the sequential apply refuses the tar on these lowers (a path
        through a lower non-directory), with its message.
    :raises ParentsNeeded: see the module docstring; ``root`` must be emptied.
    """
    if unsettled.settled_already:
        return
    with map_os_errors(f"layer tar: settle {root}"):
        settler = _Settler(root, parent_roots, userxattr)
        try:
            settler.refuse(unsettled.implicit)
            for path in unsettled.whiteouts:
                if settler.shown(path) is None:
                    settler.drop_whiteout(path)
            for path in unsettled.opaque:
                if not settler.shows_dir(path):
                    settler.drop_flag(path)
            for made in unsettled.implicit:
                if made.live and settler.shows_dir(made.path):
                    settler.lend_attributes(made)
            settler.lend_times(unsettled.implicit)
        finally:
            settler.close()
