"""What overlayfs shows of a stack of layer directories, read without mounting them.

The native changes compare a layer's upper dir with what its parents show together. That
view is computed here from the parents' ``diff/`` dirs with overlayfs's lookup rules, as the
kernel applies them in ``ovl_lookup`` for the mounts this driver makes (no redirects, no
metacopy):

* Within a merged directory the layers are asked top first; the first that has the name
  decides what the name is.
* A whiteout (a ``0:0`` character device) hides the name and everything below it.
* A non-directory ends the stack: nothing below it shows, not even a directory.
* A directory merges with the same name in the layers below it, until one of them is not
  a directory, or until a directory carrying the opaque flag, which is the last one.
* The opaque flag on a layer's root means nothing (measured on Linux 6.18: the kernel lists
  the lower roots' entries anyway).

Paths are joined as strings: the layer dirs are the driver's own, and every component is
checked with ``lstat`` to be a real directory in the layer it is read from before a path
goes through it, so no symlink is ever followed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

import attrs

from laminae.driverkit import get_xattr

__all__ = ["Shown", "StackView", "is_whiteout"]


def is_whiteout(st: os.stat_result) -> bool:
    """Whether ``st`` is an overlayfs whiteout: a character device numbered ``0:0``."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@attrs.frozen
class Shown:
    """One name as the stack shows it.

    :param path: where the entry that shows lives (in the topmost layer that has it).
    :param st: its ``lstat``.
    :param stack: for a directory, the directories merged into it, top first; else empty.
    """

    path: str
    st: os.stat_result
    stack: tuple[str, ...] = ()

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


class StackView:
    """The merged view of layer directories, top first (overlayfs's lowerdir order)."""

    __slots__ = ("_opaque", "roots")

    def __init__(self, roots: Sequence[str], opaque_xattr: bytes) -> None:
        """:param roots: the layer dirs, top first.
        :param opaque_xattr: the attribute marking an opaque directory
            (``trusted.overlay.opaque``, or ``user.overlay.opaque`` under ``userxattr``).
        """
        self.roots = tuple(roots)
        self._opaque = opaque_xattr

    def is_opaque(self, path: str) -> bool:
        """Whether the directory at ``path`` carries the opaque flag."""
        return get_xattr(path, self._opaque) == b"y"

    def lookup(self, stack: Sequence[str], name: str) -> Shown | None:
        """What the merged directory made of ``stack`` shows as ``name``, if anything."""
        found: tuple[str, os.stat_result] | None = None
        below: list[str] = []
        for directory in stack:
            path = f"{directory}/{name}"
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if is_whiteout(st):
                break
            if found is None:
                found = (path, st)
            if not stat.S_ISDIR(st.st_mode):
                break
            below.append(path)
            if self.is_opaque(path):
                break
        if found is None:
            return None
        return Shown(found[0], found[1], tuple(below) if stat.S_ISDIR(found[1].st_mode) else ())

    def names(self, stack: Sequence[str]) -> set[str]:
        """Every name some directory of ``stack`` holds (hidden ones too: see :meth:`lookup`)."""
        result: set[str] = set()
        for directory in stack:
            result.update(os.listdir(directory))
        return result
