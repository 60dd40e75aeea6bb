"""The lower trees of an apply: the layers below the one being written, read and never changed.

A tar applied onto a layer may need what is below it. A parent directory the tar does not carry
takes the attributes of the same directory in the nearest lower tree (containerd's
``WithParents``). On an overlayfs upper dir (:attr:`~laminae.archive._apply.WhiteoutMode.OVERLAY`)
the applier also asks what overlayfs would show at a path over the lowers, with overlayfs's
lookup rules (:meth:`Lowers.shown`): whether a whiteout would hide anything, whether an opaque
flag would, whether a hard link's target must be copied up.

Used by the applier (:mod:`laminae.archive._apply`) and the settle step of the detached apply
(:mod:`laminae.archive._overlayformat`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from laminae.archive._tree import O_LIST_DIR, Tree
from laminae.archive._whiteouts import is_whiteout
from laminae.kernel._xattrs import get_xattr

__all__ = ["Lowers"]


class Lowers:
    """The lower trees below a target tree, nearest first.

    :param upper: the target's root (in OVERLAY mode, the overlay's upper dir), as bytes; read
        by :meth:`shown` with ``upper=True``, never written here.
    :param roots: the lower trees, nearest first.
    :param opaque_xattr: the xattr that marks an opaque directory (``trusted.overlay.opaque``,
        or ``user.overlay.opaque`` with ``userxattr``).
    """

    def __init__(self, upper: bytes, roots: Sequence[Path], opaque_xattr: bytes) -> None:
        self._upper = upper
        self._opaque_xattr = opaque_xattr
        self.trees: list[Tree] = []
        try:
            for root in roots:
                self.trees.append(Tree(root))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close every tree."""
        trees, self.trees = self.trees, []
        for tree in trees:
            tree.close()

    def release(self) -> None:
        """Close the fds each tree dropped from its cache."""
        for tree in self.trees:
            tree.release()

    def path(self, index: int, path: bytes) -> bytes:
        """The path of ``path`` in lower ``index`` (``-1``: the upper tree), for ``*stat``."""
        root = self._upper if index < 0 else self.trees[index].root_path
        return root + b"/" + path

    def root_names(self) -> set[bytes]:
        """Every name at the root of any lower tree."""
        names: set[bytes] = set()
        for tree in self.trees:
            names.update(os.listdir(tree.root_path))
        return names

    def shown(
        self, path: bytes, *, upper: bool, beneath: bool = False
    ) -> tuple[int, os.stat_result] | None:
        """What overlayfs shows at ``path`` over the lowers, and over the upper tree if ``upper``.

        With ``beneath``, the upper tree's own entry at ``path`` itself is passed over: what the
        lowers show there, through the upper tree's directories above it.

        Read with overlayfs's lookup rules: in each directory the first layer with the name
        decides; a whiteout hides it, a non-directory ends the stack, an opaque directory
        ends it below itself; layer roots are never opaque. Lower trees are committed layers
        and every component is checked to be a real directory in the layer it is read from,
        so the joined paths follow no symlink.

        :returns: ``(layer, lstat)`` where layer is ``-1`` for the upper tree, else the index
            in the lower trees; ``None`` when nothing shows there.
        """
        names = [n for n in path.split(b"/") if n]
        stack = [(-1, b"")] if upper else []
        stack.extend((index, b"") for index in range(len(self.trees)))
        for depth, name in enumerate(names):
            last = depth == len(names) - 1
            found: tuple[int, os.stat_result] | None = None
            below: list[tuple[int, bytes]] = []
            for index, above in stack:
                if last and beneath and index < 0:
                    continue
                relative = above + b"/" + name if above else name
                try:
                    st = os.lstat(self.path(index, relative))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                if is_whiteout(st):
                    break
                if found is None:
                    found = (index, st)
                if not stat.S_ISDIR(st.st_mode) or last:
                    break
                below.append((index, relative))
                opaque = get_xattr(os.fsdecode(self.path(index, relative)), self._opaque_xattr)
                if opaque == b"y":
                    break
            if found is None or last:
                return found
            if not stat.S_ISDIR(found[1].st_mode):
                return None
            stack = below
        return None

    def hide_a_dir(self, path: bytes) -> bool:
        """Whether a directory of the upper tree at ``path`` would merge with a lower one.

        Only then is an opaque flag needed; anywhere else it would be a stray xattr, and
        visible where the layer is mounted as a plain bind (a base layer).
        """
        shown = self.shown(path, upper=True, beneath=True)
        return shown is not None and stat.S_ISDIR(shown[1].st_mode)

    def open_dir(self, path: bytes, *, overlay: bool) -> int | None:
        """Open the directory at ``path`` in the nearest lower tree that has one.

        With ``overlay``, "nearest" is what overlayfs shows at ``path``, through the upper
        tree's directories above: under one made opaque, or made over a whiteout, the lowers
        show nothing.
        """
        if overlay:
            shown = self.shown(path, upper=True, beneath=True)
            if shown is None or not stat.S_ISDIR(shown[1].st_mode):
                return None
            return os.open(self.path(shown[0], path), O_LIST_DIR)
        above, _, name = path.rpartition(b"/")
        for tree in self.trees:
            found = tree.lookup(above)
            if found is None:
                continue
            try:
                return os.open(name, O_LIST_DIR, dir_fd=found[0])
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
        return None
