"""Metadata a layer copy loses quietly: extended attributes of symlinks, FIFOs and device
nodes, and the modification times of directories.

The kernel refuses ``user.*`` xattrs on anything but regular files and directories, so a
symlink or a device node can only carry ``trusted.*`` (and ``security.*``) ones, which need
``CAP_SYS_ADMIN`` in the initial user namespace: those tests are skipped, saying so, where the
filesystem under the driver's home refuses them (rootless runs). ``user.*`` is checked on a
regular file and a directory. Directory mtimes are easy to lose, since adding an entry moves
a directory's mtime: a copy must set them after everything below exists.

Each property is followed through every step that could drop it: apply, then a mount of the
layer and of a child (a copy, a snapshot or a stack of it), and a write through an active
layer's mount, then commit, a child, and the layer's diff tar (whose entries must carry what
the layer holds).
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import Mapping
from pathlib import Path

import pytest

import laminae
from laminae.conformance._layers import apply, mounted
from laminae.conformance._tars import UNOWNED_MAJOR, LayerTar, _entry_header
from laminae.conformance._tree import read_xattrs

NS = 1_000_000_000

# The suite's one major no driver owns (see laminae.conformance._tars): opening a node made
# with it fails at once instead of reaching hardware.
DEVICE_MAJOR = UNOWNED_MAJOR

Xattrs = Mapping[str, bytes]

USER_XATTRS: Mapping[str, Xattrs] = {
    "meta/dir": {"user.laminae.dir": b"on a directory"},
    "meta/file": {"user.laminae.file": b"\x00binary\xff value", "user.laminae.more": b"2"},
}
TRUSTED_XATTRS: Mapping[str, Xattrs] = {
    "meta/link": {"trusted.laminae.link": b"on a symlink"},
    "meta/fifo": {"trusted.laminae.fifo": b"on a fifo"},
    "meta/char": {"trusted.laminae.char": b"on a character device"},
    "meta/block": {"trusted.laminae.block": b"on a block device"},
}

# Directory mtimes with nanoseconds, none of them "now".
DIR_MTIMES: Mapping[str, int] = {
    "a": 1_500_000_000 * NS + 111_111_111,
    "a/b": 1_500_000_100 * NS + 222_222_222,
    "a/b/c": 1_500_000_200 * NS + 333_333_333,
    "empty": 1_400_000_000 * NS,
}


def _probe(scratch: Path) -> tuple[str | None, bool]:
    """Whether ``trusted.*`` xattrs can be set on a symlink and a FIFO beside the driver's
    home (``None``, or why not), and whether device nodes can be made there."""
    probe = scratch / "metadata-probe"
    probe.mkdir()
    try:
        os.symlink("target", probe / "link")
        os.mkfifo(probe / "fifo")
        why = None
        for name, kind in (("link", "symlink"), ("fifo", "fifo")):
            try:
                os.setxattr(probe / name, "trusted.laminae-probe", b"1", follow_symlinks=False)
            except OSError as exc:
                why = (
                    f"trusted.* xattrs cannot be set on a {kind} here "
                    f"({errno.errorcode.get(exc.errno or 0, exc.errno)}: needs CAP_SYS_ADMIN in "
                    "the initial user namespace and a filesystem that keeps them)"
                )
                break
        try:
            os.mknod(probe / "char", stat.S_IFCHR | 0o600, os.makedev(DEVICE_MAJOR, 0))
            devices = True
        except PermissionError:
            devices = False
        return why, devices
    finally:
        for name in os.listdir(probe):
            os.unlink(probe / name)
        probe.rmdir()


def special_files(scratch: Path) -> Mapping[str, Xattrs]:
    """The ``trusted.*`` cases this host can hold; skip if it can hold none."""
    why, devices = _probe(scratch)
    if why is not None:
        pytest.skip(why)
    if devices:
        return TRUSTED_XATTRS
    return {p: x for p, x in TRUSTED_XATTRS.items() if p not in ("meta/char", "meta/block")}


def cases(kind: str, scratch: Path) -> Mapping[str, Xattrs]:
    return USER_XATTRS if kind == "user" else special_files(scratch)


def add_to_tar(layer: LayerTar, path: str, xattrs: Xattrs) -> LayerTar:
    """Add ``path``, of the type its name says, with ``xattrs``."""
    name = path.encode()
    kind = os.path.basename(path)
    records: dict[str | bytes, bytes] = {name: value for name, value in xattrs.items()}
    if kind == "dir":
        return layer.dir(path, xattrs=records)
    if kind == "file":
        return layer.file(path, b"content", xattrs=records)
    # LayerTar's symlink, fifo and device entries take no xattrs: write their headers here.
    if kind == "link":
        header = _entry_header(name, tarfile.SYMTYPE, mode=0o777, linkname=b"file", xattrs=records)
    elif kind == "fifo":
        header = _entry_header(name, tarfile.FIFOTYPE, mode=0o600, xattrs=records)
    else:
        header = _entry_header(
            name,
            tarfile.CHRTYPE if kind == "char" else tarfile.BLKTYPE,
            mode=0o600,
            devmajor=DEVICE_MAJOR,
            devminor=1 if kind == "char" else 2,
            xattrs=records,
        )
    return layer.raw(header)


def make_in(root: Path, path: str, xattrs: Xattrs) -> None:
    """Make ``path`` below ``root``, of the type its name says, and set ``xattrs`` on it."""
    full = root / path
    kind = os.path.basename(path)
    if kind == "dir":
        full.mkdir()
    elif kind == "file":
        full.write_bytes(b"content")
    elif kind == "link":
        os.symlink("file", full)
    elif kind == "fifo":
        os.mkfifo(full, 0o600)
    else:
        mode = stat.S_IFCHR if kind == "char" else stat.S_IFBLK
        os.mknod(full, mode | 0o600, os.makedev(DEVICE_MAJOR, 1 if kind == "char" else 2))
    for name, value in xattrs.items():
        os.setxattr(full, name, value, follow_symlinks=False)


def assert_xattrs(root: Path, expected: Mapping[str, Xattrs], step: str) -> None:
    """Fail unless each path below ``root`` carries exactly its expected xattrs."""
    problems = []
    for path, want in expected.items():
        full = root / path
        if not os.path.lexists(full):
            problems.append(f"/{path}: missing")
            continue
        got = read_xattrs(full)
        if got != dict(want):
            problems.append(
                f"/{path} ({_kind_name(full)}): xattrs expected {dict(want)}, got {got}"
            )
    assert not problems, f"xattrs lost or changed after {step}:\n  " + "\n  ".join(problems)


def _kind_name(path: Path) -> str:
    mode = os.lstat(path).st_mode
    for test, name in (
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return "regular file"


def diff_members(store: laminae.Store, ref: str, out: Path) -> dict[str, tarfile.TarInfo]:
    """The entries of ``ref``'s diff tar by path (no ``./``, no trailing ``/``)."""
    with open(out, "wb") as stream:
        store.diff(ref, stream)
    with tarfile.open(out) as archive:
        return {m.name.removeprefix("./").rstrip("/"): m for m in archive.getmembers()}


def tar_xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    prefix = "SCHILY.xattr."
    return {
        key.removeprefix(prefix): value.encode("utf-8", "surrogateescape")
        for key, value in member.pax_headers.items()
        if key.startswith(prefix)
    }


def tar_mtime_ns(member: tarfile.TarInfo) -> int:
    """A tar entry's mtime in nanoseconds, exactly as its PAX record (or header) says."""
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime) * NS
    seconds, _, fraction = text.partition(".")
    return int(seconds) * NS + int((fraction + "0" * 9)[:9])


def dir_mtimes(root: Path, paths: Mapping[str, int] | list[str]) -> dict[str, int]:
    return {path: os.lstat(root / path).st_mtime_ns for path in paths}


def assert_dir_mtimes(root: Path, expected: Mapping[str, int], step: str) -> None:
    """Fail unless each directory below ``root`` has its expected mtime, to the nanosecond."""
    got = dir_mtimes(root, dict(expected))
    problems = [
        f"/{path}: directory mtime expected {want}, got {got[path]}"
        for path, want in expected.items()
        if got[path] != want
    ]
    assert not problems, f"after {step}:\n  " + "\n  ".join(problems)


def _set_dir_mtimes(root: Path, mtimes: Mapping[str, int]) -> None:
    # Deepest first, so that setting one does not move its parent's (it would not: a utime
    # changes the directory's own inode only; the order only reads naturally).
    for path in sorted(mtimes, key=lambda p: -p.count("/")):
        os.utime(root / path, ns=(mtimes[path], mtimes[path]), follow_symlinks=False)


@pytest.mark.laminae_area("metadata")
class TestMetadata:
    @pytest.mark.parametrize("kind", ["user", "trusted"])
    def test_xattrs_through_apply_and_children(
        self, store: laminae.Store, tar: type[LayerTar], scratch: Path, kind: str
    ) -> None:
        """``user.*`` on a file and a directory, ``trusted.*`` on a symlink, a FIFO and
        device nodes: applied, and kept in a child layer and in that child's commit."""
        expected = cases(kind, scratch)
        layer = tar().dir("meta")
        for path, xattrs in expected.items():
            layer = add_to_tar(layer, path, xattrs)
        applied = apply(store, layer)
        with mounted(store, applied.id) as root:
            assert_xattrs(root, expected, "apply (the layer's mount)")
        child = store.create_layer(parent=applied.id)
        with mounted(store, child.id) as root:
            assert_xattrs(root, expected, "create from parent (the child's mount)")
            (root / "unrelated").write_bytes(b"a change")
        committed = store.commit_layer(child.id)
        view = store.create_layer(parent=committed.id, view=True)
        with mounted(store, view.id) as root:
            assert_xattrs(root, expected, "commit of the child, then a view of it")

    @pytest.mark.parametrize("kind", ["user", "trusted"])
    def test_xattrs_through_commit_and_diff(
        self, store: laminae.Store, scratch: Path, kind: str
    ) -> None:
        """xattrs set through an active layer's mount survive its commit and a child, and
        its diff tar carries them (``SCHILY.xattr.*``)."""
        expected = cases(kind, scratch)
        active = store.create_layer(parent=None)
        with mounted(store, active.id) as root:
            (root / "meta").mkdir()
            if kind == "trusted":
                (root / "meta/file").write_bytes(b"a symlink's target")
            for path, xattrs in expected.items():
                make_in(root, path, xattrs)
            assert_xattrs(root, expected, "writing them (the active layer's mount)")
        committed = store.commit_layer(active.id)
        with mounted(store, committed.id) as root:
            assert_xattrs(root, expected, "commit (the committed layer's mount)")
        child = store.create_layer(parent=committed.id)
        with mounted(store, child.id) as root:
            assert_xattrs(root, expected, "create from parent (the child's mount)")
        members = diff_members(store, committed.id, scratch / "diff.tar")
        problems = []
        for path, want in expected.items():
            if path not in members:
                problems.append(f"/{path}: missing")
            elif tar_xattrs(members[path]) != dict(want):
                got = tar_xattrs(members[path])
                problems.append(f"/{path}: xattrs expected {dict(want)}, got {got}")
        assert not problems, "xattrs in the diff tar:\n  " + "\n  ".join(problems)

    def test_directory_mtimes_through_apply_and_children(
        self, store: laminae.Store, tar: type[LayerTar]
    ) -> None:
        """Directory entries' mtimes (with nanoseconds) are kept although their children
        come after them in the tar, and a child layer and its commit keep them."""
        layer = tar()
        for path, mtime in DIR_MTIMES.items():
            layer.dir(path, mtime_ns=mtime)
        layer.file("a/file", b"x").file("a/b/file", b"y").file("a/b/c/file", b"z")
        applied = apply(store, layer)
        with mounted(store, applied.id) as root:
            assert_dir_mtimes(root, DIR_MTIMES, "apply (the layer's mount)")
        child = store.create_layer(parent=applied.id)
        with mounted(store, child.id) as root:
            assert_dir_mtimes(root, DIR_MTIMES, "create from parent (the child's mount)")
            (root / "unrelated").write_bytes(b"a change outside every checked directory")
        committed = store.commit_layer(child.id)
        view = store.create_layer(parent=committed.id, view=True)
        with mounted(store, view.id) as root:
            assert_dir_mtimes(root, DIR_MTIMES, "commit of the child, then a view of it")

    def test_directory_mtimes_through_commit_and_diff(
        self, store: laminae.Store, scratch: Path
    ) -> None:
        """Directory mtimes set through an active layer's mount survive commit and a child;
        a directory changed in the child takes its new mtime; every directory entry of each
        diff tar carries the mtime the layer has."""
        active = store.create_layer(parent=None)
        with mounted(store, active.id) as root:
            for path in DIR_MTIMES:
                (root / path).mkdir(parents=True, exist_ok=True)
            for path in ("a/file", "a/b/file", "a/b/c/file"):
                (root / path).write_bytes(b"content")
            _set_dir_mtimes(root, DIR_MTIMES)
        base = store.commit_layer(active.id)
        with mounted(store, base.id) as root:
            assert_dir_mtimes(root, DIR_MTIMES, "commit (the committed layer's mount)")
        self._check_diff(store, base, scratch / "base.tar", list(DIR_MTIMES))

        changed = dict(DIR_MTIMES)
        changed["a/b"] = 1_600_000_000 * NS + 444_444_444
        child = store.create_layer(parent=base.id)
        with mounted(store, child.id) as root:
            assert_dir_mtimes(root, DIR_MTIMES, "create from parent (the child's mount)")
            (root / "a/b/new").write_bytes(b"moves a/b's mtime")
            _set_dir_mtimes(root, {"a/b": changed["a/b"]})
        top = store.commit_layer(child.id)
        view = store.create_layer(parent=top.id, view=True)
        with mounted(store, view.id) as root:
            assert_dir_mtimes(root, changed, "commit of a child that changed /a/b, then a view")
        self._check_diff(store, top, scratch / "top.tar", ["a/b"])

    @staticmethod
    def _check_diff(
        store: laminae.Store, layer: laminae.Layer, out: Path, required: list[str]
    ) -> None:
        """Every directory entry of ``layer``'s diff has the layer's mtime; ``required``
        directories are there."""
        members = diff_members(store, layer.id, out)
        with mounted(store, layer.id) as root:
            problems = [
                f"/{path}: directory entry missing" for path in required if path not in members
            ]
            for path, member in sorted(members.items()):
                if not member.isdir() or path in ("", "."):
                    continue
                have = os.lstat(root / path).st_mtime_ns
                if tar_mtime_ns(member) != have:
                    problems.append(
                        f"/{path}: directory mtime expected {have} (the layer's), "
                        f"got {tar_mtime_ns(member)}"
                    )
        assert not problems, f"diff of layer {layer.id}:\n  " + "\n  ".join(problems)
