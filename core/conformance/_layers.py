"""Steps the tests share: mount a layer for a while, write a layer through a mount and
commit it, build a chain whose every step is compared with a flat directory.

Writing goes through a real mount of an active layer (what a container runtime does), and
reading through a real mount of a view or a committed layer; the driver is only ever asked
for what the store asks it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import laminae

from ._tars import LayerTar
from ._tree import assert_same_tree

__all__ = [
    "Writer",
    "apply",
    "assert_read_only",
    "build_checked_chain",
    "commit_written",
    "mounted",
    "remove_tree",
]

Writer = Callable[[Path], object]
"""Writes a change into a root directory: the mounted layer, or a flat copy (what it
returns is ignored, so a lambda may return what ``write_bytes`` returns)."""


@contextlib.contextmanager
def mounted(store: laminae.Store, ref: str, *, readonly: bool = False) -> Iterator[Path]:
    """Mount ``ref`` for the block and unmount it after, even on failure."""
    path = store.mount(ref, readonly=readonly)
    try:
        yield path
    finally:
        store.unmount(ref)


def apply(
    store: laminae.Store, layer: LayerTar | bytes, parent: laminae.Layer | str | None = None
) -> laminae.Layer:
    """Apply an uncompressed layer tar on ``parent``."""
    data = layer.build() if isinstance(layer, LayerTar) else layer
    parent_id = parent.id if isinstance(parent, laminae.Layer) else parent
    return store.apply_layer(io.BytesIO(data), parent=parent_id)


def commit_written(
    store: laminae.Store,
    parent: laminae.Layer | None,
    *writers: Writer,
    key: str | None = None,
) -> laminae.Layer:
    """Create an active layer on ``parent``, run ``writers`` on its mount, commit it."""
    active = store.create_layer(key, parent=None if parent is None else parent.id)
    with mounted(store, active.id) as root:
        for write in writers:
            write(root)
    return store.commit_layer(active.id)


def remove_tree(path: Path) -> None:
    """Remove a file, a symlink or a directory tree, as ``rm -rf`` would."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def build_checked_chain(
    store: laminae.Store,
    flat: Path,
    steps: Sequence[Sequence[Writer]],
    *,
    base: laminae.Layer | None = None,
) -> list[laminae.Layer]:
    """Commit one layer per step, checking every layer against ``flat`` (containerd's
    ``checkSnapshots``).

    Each step's writers run on the mount of a new active layer and on the flat directory;
    the active mount must equal the flat directory before commit, and a view of the
    committed layer after.
    """
    flat.mkdir(exist_ok=True)
    layers = []
    parent = base
    for number, writers in enumerate(steps):
        active = store.create_layer(parent=None if parent is None else parent.id)
        with mounted(store, active.id) as root:
            for write in writers:
                write(root)
                write(flat)
            assert_same_tree(flat, root, what=f"active layer of step {number} (before commit)")
        parent = store.commit_layer(active.id)
        layers.append(parent)
        view = store.create_layer(parent=parent.id, view=True)
        with mounted(store, view.id) as root:
            assert_same_tree(flat, root, what=f"view of committed step {number}")
        store.remove_layer(view.id)
    return layers


def assert_read_only(root: Path) -> None:
    """Fail unless writing below ``root`` fails with ``EROFS``, for a file and a directory."""
    for attempt, action in (
        ("create a file", lambda: (root / "written-through-ro").write_bytes(b"x")),
        ("make a directory", lambda: (root / "dir-through-ro").mkdir()),
    ):
        try:
            action()
        except OSError as exc:
            assert exc.errno == errno.EROFS, (
                f"{attempt} in a read-only mount failed with {errno.errorcode.get(exc.errno or 0)}"
                ", expected EROFS"
            )
        else:
            raise AssertionError(f"{attempt} in a read-only mount ({root}) succeeded")
    assert not os.path.lexists(root / "written-through-ro")
