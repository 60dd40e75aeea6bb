"""Changes between a layer and its parent, and the naive way to find them.

A :class:`Change` names one path (absolute, ``/`` separated, as the layer's root sees it) and
whether it was added, modified or deleted. :func:`naive_changes` finds them by walking the
parent's tree and the layer's tree side by side; a driver that knows its changes cheaper
(overlay's upper dir) provides its own ``changes``.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import attrs

from laminae.kernel._xattrs import read_xattrs

__all__ = ["Change", "ChangeKind", "naive_changes"]


class ChangeKind(enum.Enum):
    """What happened to a path."""

    ADDED = "added"
    MODIFIED = "modified"
    DELETED = "deleted"


@attrs.frozen(order=True)
class Change:
    """One changed path.

    :param path: absolute within the layer, ``/`` separated, never ``/`` itself.
        Kept as ``str``; a name that is not UTF-8 is carried with ``surrogateescape``.
    :param kind: added, modified or deleted. A deleted directory is reported once, not with
        its children.
    """

    path: str
    kind: ChangeKind = attrs.field(order=False)


def _same_file(a: os.stat_result, b: os.stat_result, a_path: str, b_path: str) -> bool:
    """Whether the layer's entry ``b`` is unchanged from the parent's ``a``.

    Compares type, mode, owner, device number, size, mtime (nanoseconds) and symlink targets,
    as containerd's walking differ does, and every xattr (containerd compares only
    ``security.capability``, so a changed ACL or label never reached its diffs).
    """
    if (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid):
        return False
    is_device = stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode)
    if is_device and a.st_rdev != b.st_rdev:
        return False
    # A directory's size and mtime follow its entries, which are compared one by one.
    if not stat.S_ISDIR(a.st_mode) and (a.st_size, a.st_mtime_ns) != (b.st_size, b.st_mtime_ns):
        return False
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(a_path) == os.readlink(b_path)
    return read_xattrs(a_path) == read_xattrs(b_path)


def _scan(path: str) -> dict[str, os.DirEntry[str]]:
    with os.scandir(path) as it:
        return {entry.name: entry for entry in it}


def naive_changes(parent_root: Path | None, layer_root: Path) -> Iterator[Change]:
    """Yield the changes from ``parent_root`` to ``layer_root``, depth first.

    Names are sorted within each directory and a directory comes before its children, so a
    parent is always seen before anything below it (what the tar writer needs).

    Both trees are read with ``os.*`` calls only; neither is changed. With no parent every
    path of the layer is added. A directory whose metadata is unchanged is not reported, but
    its children are compared; a path whose type changed is modified.
    """
    yield from _walk(None if parent_root is None else str(parent_root), str(layer_root), "")


def _walk(parent: str | None, layer: str, rel: str) -> Iterator[Change]:
    lower = _scan(parent) if parent is not None else {}
    upper = _scan(layer)
    for name in sorted(lower.keys() | upper.keys()):
        path = f"{rel}/{name}"
        before = lower.get(name)
        after = upper.get(name)
        if after is None:
            yield Change(path, ChangeKind.DELETED)
            continue
        after_stat = after.stat(follow_symlinks=False)
        after_is_dir = stat.S_ISDIR(after_stat.st_mode)
        if before is None:
            yield Change(path, ChangeKind.ADDED)
            if after_is_dir:
                yield from _walk(None, after.path, path)
            continue
        before_stat = before.stat(follow_symlinks=False)
        before_is_dir = stat.S_ISDIR(before_stat.st_mode)
        if after_is_dir and before_is_dir:
            if before_stat.st_ino == after_stat.st_ino and before_stat.st_dev == after_stat.st_dev:
                # The same inode on both sides (a bind of the parent): nothing below changed.
                continue
            if not _same_file(before_stat, after_stat, before.path, after.path):
                yield Change(path, ChangeKind.MODIFIED)
            yield from _walk(before.path, after.path, path)
        elif after_is_dir or before_is_dir:
            # A type change to or from a directory is a modification: applying the entry
            # replaces whatever the parent had (image-spec "Applying changesets").
            yield Change(path, ChangeKind.MODIFIED)
            if after_is_dir:
                yield from _walk(None, after.path, path)
        elif not _same_file(before_stat, after_stat, before.path, after.path):
            yield Change(path, ChangeKind.MODIFIED)
