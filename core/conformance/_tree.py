"""The suite's oracle: what a directory tree holds, read with ``os.*`` calls only.

Results are read from a real mount of a layer, never through the driver under test, and
compared with what the test wrote (a flat directory written by the same steps, or values the
test states). Differences are reported by path and field, so a failure names the fault:
``xattrs``, ``mode``, ``target`` ...
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

__all__ = [
    "Entry",
    "assert_same_tree",
    "describe_differences",
    "expect_entry",
    "hardlink_groups",
    "read_xattrs",
    "snapshot",
]

# Labels a host adds on its own; they are not layer content.
_HOST_XATTRS = frozenset({"security.selinux"})


def read_xattrs(path: str | Path) -> dict[str, bytes]:
    """Every extended attribute of ``path`` itself (symlinks not followed).

    Names that are not UTF-8 come back as ``str`` with ``surrogateescape``.
    """
    result = {}
    for name in os.listxattr(path, follow_symlinks=False):
        if name in _HOST_XATTRS:
            continue
        result[name] = os.getxattr(path, name, follow_symlinks=False)
    return result


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "unknown"


def _digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


@attrs.frozen
class Entry:
    """One path of a tree, as ``lstat`` and friends see it.

    :param kind: ``file``, ``dir``, ``symlink``, ``char``, ``block``, ``fifo`` or ``socket``.
    :param mode: permission bits with setuid, setgid and sticky.
    :param size: bytes of a regular file, else ``None``.
    :param sha256: the content digest of a regular file, else ``None``.
    :param target: a symlink's target, else ``None``.
    :param rdev: ``(major, minor)`` of a device node, else ``None``.
    :param xattrs: extended attributes, sorted by name.
    :param mtime_ns: modification time, for anything but a directory (``None`` for a
        directory: applying children changes it), and ``None`` unless asked for.
    """

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None = None
    sha256: str | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    mtime_ns: int | None = None


def _entry(path: str, st: os.stat_result, *, mtimes: bool) -> Entry:
    kind = _kind(st.st_mode)
    return Entry(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind == "file" else None,
        sha256=_digest(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
        xattrs=tuple(sorted(read_xattrs(path).items())),
        mtime_ns=st.st_mtime_ns if mtimes and kind != "dir" else None,
    )


def snapshot(root: str | Path, *, mtimes: bool = False) -> dict[str, Entry]:
    """Every path below ``root`` (``"/"`` is ``root`` itself) with what it is.

    :param mtimes: record modification times of everything but directories.
    """
    top = os.fspath(root)
    result = {"/": _entry(top, os.lstat(top), mtimes=mtimes)}
    todo = [("", top)]
    while todo:
        rel, path = todo.pop()
        with os.scandir(path) as it:
            for item in it:
                st = item.stat(follow_symlinks=False)
                key = f"{rel}/{item.name}"
                result[key] = _entry(item.path, st, mtimes=mtimes)
                if stat.S_ISDIR(st.st_mode):
                    todo.append((key, item.path))
    return result


def hardlink_groups(root: str | Path) -> set[frozenset[str]]:
    """Paths below ``root`` that share an inode, in groups of two or more."""
    top = os.fspath(root)
    by_inode: dict[tuple[int, int], set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                rel = "/" + os.path.relpath(path, top)
                by_inode.setdefault((st.st_dev, st.st_ino), set()).add(rel)
    return {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def describe_differences(
    expected: Mapping[str, Entry], actual: Mapping[str, Entry], *, limit: int = 20
) -> list[str]:
    """One line per difference: a path missing, unexpected, or a field that differs."""
    lines = []
    for path in sorted(expected.keys() - actual.keys()):
        lines.append(f"{path}: missing ({expected[path].kind} expected)")
    for path in sorted(actual.keys() - expected.keys()):
        lines.append(f"{path}: unexpected {actual[path].kind}")
    for path in sorted(expected.keys() & actual.keys()):
        want, got = expected[path], actual[path]
        if want == got:
            continue
        for field in attrs.fields(Entry):
            a, b = getattr(want, field.name), getattr(got, field.name)
            if a != b:
                shown = (oct(a), oct(b)) if field.name == "mode" else (_show(a), _show(b))
                lines.append(f"{path}: {field.name} expected {shown[0]}, got {shown[1]}")
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
    return lines


def assert_same_tree(
    expected: str | Path | Mapping[str, Entry],
    actual: str | Path,
    *,
    mtimes: bool = False,
    what: str = "layer",
    ignore: Iterable[str] = (),
) -> None:
    """Fail, naming every difference, unless ``actual`` holds what ``expected`` holds.

    :param expected: a directory written by the same steps, or a :func:`snapshot`.
    :param actual: the mounted layer.
    :param ignore: paths left out of the comparison on both sides.
    """
    want = dict(expected) if isinstance(expected, Mapping) else snapshot(expected, mtimes=mtimes)
    got = snapshot(actual, mtimes=mtimes)
    for path in ignore:
        want.pop(path, None)
        got.pop(path, None)
    differences = describe_differences(want, got)
    assert not differences, f"{what} differs from what was written:\n  " + "\n  ".join(differences)


def expect_entry(tree: Mapping[str, Entry], path: str, *, step: str, **fields: object) -> None:
    """Fail unless ``tree`` has ``path`` with every field as given, naming the step, the
    path, and each property that differs with its expected and actual value (modes in
    octal, xattrs as a dict).

    :param step: what was done before the tree was read ("apply", "create from parent" ...).
    :param fields: :class:`Entry` fields and their expected values.
    """
    entry = tree.get(path)
    if entry is None:
        raise AssertionError(f"{step}: {path} is missing")
    wrong = []
    for name, want in fields.items():
        got = getattr(entry, name)
        if name == "xattrs":
            got = dict(got)
        if got != want:
            if name == "mode" and isinstance(want, int) and isinstance(got, int):
                shown = (oct(want), oct(got))
            else:
                shown = (_show(want), _show(got))
            wrong.append(f"{name} expected {shown[0]}, got {shown[1]}")
    if wrong:
        raise AssertionError(f"{step}: {path} ({entry.kind}): " + "; ".join(wrong))
