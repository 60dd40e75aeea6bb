"""Native changes: a layer's changes read from its upper dir alone.

Everything a layer changed is in its ``diff/`` (the mounts keep it so: ``index=off``,
``redirect_dir=nofollow``, ``metacopy=off``), so the walk visits the upper dir only and asks
the parents' view (:class:`StackView`) about each name it finds; its cost grows with the
change, not with the image. The result is the stream :func:`laminae.driverkit.naive_changes` gives
for the same layer over mounted trees, entry for entry and in the same order (the driver's
tests hold the two side by side):

* a whiteout is a deletion, if the parents show the name (a whiteout of nothing is none);
* an opaque directory also deletes each name the parents show below it and the layer does
  not have, and so does every directory below an opaque one: overlayfs merges a directory
  with the lowers only through unbroken merged ancestors;
* an entry the parents do not show is added, a directory with all it holds;
* an entry they show is modified if its type, mode, owner, device number, size, mtime,
  symlink target or xattrs differ (overlayfs's own xattrs left out, as a mount hides them);
  a directory copied up only because something below it changed is not reported;
* a directory replaced by a non-directory, or the reverse, is modified, and a new directory's
  content is added.

Names are sorted within each directory (as ``str``, surrogate-escaped, like
``naive_changes``), and a directory comes before its children.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence

from laminae.driverkit import Change, ChangeKind, read_xattrs

from ._view import Shown, StackView, is_whiteout

__all__ = ["native_changes"]


def native_changes(upper: str, lowers: Sequence[str], *, userxattr: bool) -> Iterator[Change]:
    """Yield the changes of the layer whose upper dir is ``upper`` over ``lowers``.

    :param upper: the layer's ``diff/``.
    :param lowers: the parents' ``diff/`` dirs, immediate parent first; empty for a base.
    :param userxattr: the layer's flags are ``user.overlay.*`` (rootless), not ``trusted``.
    """
    prefix = b"user.overlay." if userxattr else b"trusted.overlay."
    walk = _Walk(StackView(lowers, prefix + b"opaque"), prefix)
    # The root is always merged: overlayfs ignores the opaque flag there.
    yield from walk.directory(upper, tuple(lowers), "", merged=True)


def _scan(path: str) -> dict[str, os.DirEntry[str]]:
    with os.scandir(path) as entries:
        return {entry.name: entry for entry in entries}


class _Walk:
    __slots__ = ("_private", "_view")

    def __init__(self, view: StackView, private: bytes) -> None:
        self._view = view
        self._private = private

    def directory(
        self, upper: str, stack: tuple[str, ...], rel: str, *, merged: bool
    ) -> Iterator[Change]:
        """The changes below upper dir ``upper``, shown by the parents as ``stack``.

        ``merged``: the layer's mount merges this directory with the lowers, so what the
        parents show here and the layer lacks is still there. Otherwise (it or a directory
        above it is opaque) each such name is deleted.
        """
        entries = _scan(upper)
        names: set[str] = set(entries)
        if not merged and stack:
            names |= self._view.names(stack)
        view = self._view
        for name in sorted(names):
            path = f"{rel}/{name}"
            entry = entries.get(name)
            shown = view.lookup(stack, name) if stack else None
            if entry is None:
                if shown is not None:
                    yield Change(path, ChangeKind.DELETED)
                continue
            st = entry.stat(follow_symlinks=False)
            if is_whiteout(st):
                if shown is not None:
                    yield Change(path, ChangeKind.DELETED)
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if shown is None:
                yield Change(path, ChangeKind.ADDED)
                if is_dir:
                    yield from self.added(entry.path, path)
            elif is_dir and shown.is_dir:
                if not self.same(shown, st, entry.path):
                    yield Change(path, ChangeKind.MODIFIED)
                yield from self.directory(
                    entry.path,
                    shown.stack,
                    path,
                    merged=merged and not view.is_opaque(entry.path),
                )
            elif is_dir or shown.is_dir:
                # A type change to or from a directory is a modification, and a directory
                # over a non-directory hides it: all it holds is new.
                yield Change(path, ChangeKind.MODIFIED)
                if is_dir:
                    yield from self.added(entry.path, path)
            elif not self.same(shown, st, entry.path):
                yield Change(path, ChangeKind.MODIFIED)

    def added(self, upper: str, rel: str) -> Iterator[Change]:
        """Everything below ``upper``, a directory no parent shows: all added."""
        entries = _scan(upper)
        for name in sorted(entries):
            entry = entries[name]
            st = entry.stat(follow_symlinks=False)
            if is_whiteout(st):
                continue  # nothing below to hide (the driver never writes one here)
            path = f"{rel}/{name}"
            yield Change(path, ChangeKind.ADDED)
            if stat.S_ISDIR(st.st_mode):
                yield from self.added(entry.path, path)

    def same(self, shown: Shown, st: os.stat_result, path: str) -> bool:
        """Whether the layer's entry at ``path`` is unchanged from what the parents show.

        The rules of ``laminae.driverkit.naive_changes`` (``_same_file``), on raw layer dirs: the
        attributes overlayfs keeps for itself, and hides from a mount, are left out.
        """
        a = shown.st
        if (a.st_mode, a.st_uid, a.st_gid) != (st.st_mode, st.st_uid, st.st_gid):
            return False
        is_device = stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode)
        if is_device and a.st_rdev != st.st_rdev:
            return False
        # A directory's size and mtime follow its entries, which are compared one by one.
        if not stat.S_ISDIR(a.st_mode) and (a.st_size, a.st_mtime_ns) != (
            st.st_size,
            st.st_mtime_ns,
        ):
            return False
        if stat.S_ISLNK(a.st_mode):
            return os.readlink(shown.path) == os.readlink(path)
        return self.xattrs(shown.path) == self.xattrs(path)

    def xattrs(self, path: str) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = read_xattrs(path)
        if found:
            for name in [n for n in found if n.startswith(self._private)]:
                del found[name]
        return found
