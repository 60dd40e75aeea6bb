"""Reading what a tree holds, for comparisons: plain ``os`` calls, never through laminae.

Two forms: :func:`contents` (type, mode, owner and bytes per path: what most image and
container tests compare) and :func:`read_tree` (the conformance suite's full entries plus
hard-link groups: what the interop tests compare against umoci).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import attrs

import laminae
from laminae.conformance._tree import Entry, hardlink_groups, snapshot

T = TypeVar("T")


def contents(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under ``root`` with its type, mode, owner and content (or link target)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                body: object = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            else:
                body = None
            rel = str(path.relative_to(root))
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, body)
    return out


@attrs.frozen
class Tree:
    """The entries of a tree by relative path (the root itself left out), and its groups of
    paths that share an inode."""

    entries: dict[str, Entry]
    hardlinks: frozenset[frozenset[str]]


def read_tree(root: Path) -> Tree:
    """The conformance snapshot of ``root``, keyed ``a/b`` rather than ``/a/b``."""
    entries = {path[1:]: entry for path, entry in snapshot(root).items() if path != "/"}
    groups = frozenset(frozenset(p[1:] for p in group) for group in hardlink_groups(root))
    return Tree(entries, groups)


@contextlib.contextmanager
def mounted_view(store: laminae.Store, layer: str) -> Iterator[Path]:
    """A read-only view of committed ``layer``, mounted for the block, removed after."""
    view = store.create_layer(parent=layer, view=True)
    try:
        yield store.mount(view.id, readonly=True)
    finally:
        store.unmount(view.id)
        store.remove_layer(view.id)


def image_read(store: laminae.Store, ref: str, read: Callable[[Path], T]) -> T:
    """``read`` of image ``ref``'s tree, from a mounted view of its top layer."""
    top = store.image(ref).top_layer
    assert top is not None
    with mounted_view(store, top) as root:
        return read(root)
