"""The vfs driver, called directly: layout, copy fidelity, usage, removal, probing."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from laminae.driverkit import (
    AlreadyExists,
    Capabilities,
    DriverUnavailable,
    InvalidArgument,
    MountSpec,
    NotFound,
    ResourceExhausted,
)
from laminae.drivers.vfs import VfsDriver
from laminae.kernel import _filesystems, _mounts
from laminae.kernel._xattrs import read_xattrs, set_xattr

ODD_XATTR = b"user.\xff\xfe"
ODD_NAME = os.fsdecode(b"caf\xe9-latin1")  # a file name that is not UTF-8
CAPABILITY = bytes.fromhex("0100000200040000000000000000000000000000")
ATIME_NS = 1_111_111_111_123_456_789
MTIME_NS = 1_222_222_222_987_654_321


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def driver(home: Path) -> VfsDriver:
    return VfsDriver(home, {})


def _times(path: Path, offset: int = 0) -> None:
    os.utime(path, ns=(ATIME_NS + offset, MTIME_NS + offset), follow_symlinks=False)


def _populate(root: Path) -> None:
    """A tree with every kind of entry and metadata a layer can hold (needs root)."""
    (root / "bin").mkdir()
    (root / "tmp").mkdir()
    (root / "proc").mkdir()
    (root / "dev").mkdir()
    (root / "usr" / "lib").mkdir(parents=True)

    suid = root / "bin" / "suid"
    suid.write_bytes(b"#!/bin/sh\n")
    os.chown(suid, 1, 2)
    os.chmod(suid, 0o4755)
    sgid = root / "bin" / "sgid"
    sgid.write_bytes(b"sgid")
    os.chmod(sgid, 0o2711)
    ping = root / "bin" / "ping"
    ping.write_bytes(b"\x7fELF" + os.urandom(3000))
    set_xattr(str(ping), b"security.capability", CAPABILITY)

    big = root / "usr" / "lib" / "big"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "usr" / "lib" / "empty").write_bytes(b"")
    odd = root / "usr" / ODD_NAME
    odd.write_bytes(b"latin-1 name")
    set_xattr(str(odd), ODD_XATTR, b"\x00\xffbinary")
    set_xattr(str(root / "usr"), b"user.on-dir", b"d")
    set_xattr(str(root / "usr"), b"trusted.overlay.opaque", b"y")

    os.link(big, root / "bin" / "big-link")
    os.link(suid, root / "usr" / "suid-link")

    (root / "bin" / "sh").symlink_to("/bin/busybox")
    os.chown(root / "bin" / "sh", 1, 2, follow_symlinks=False)
    set_xattr(str(root / "bin" / "sh"), b"trusted.link", b"on-symlink")
    (root / "usr" / "rel").symlink_to("../bin/suid")
    os.link(root / "usr" / "rel", root / "usr" / "rel-link", follow_symlinks=False)

    os.mknod(root / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "dev" / "loop9", stat.S_IFBLK | 0o660, os.makedev(7, 9))
    os.chown(root / "dev" / "loop9", 0, 6)
    os.mkfifo(root / "dev" / "fifo", 0o620)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "dev" / "socket"))
    server.close()

    os.chmod(root / "tmp", 0o1777)
    os.chown(root / "proc", 1, 2)
    (root / "proc" / "inside").write_bytes(b"x")
    os.chmod(root / "proc", 0o555)

    # Times last, deepest first, so that no later change moves them.
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        _times(path, offset=len(path.parts))
    _times(root)


def _snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything that must survive a copy, by relative path; hardlinks by group."""
    inode_names: dict[tuple[int, int], str] = {}
    result: dict[str, tuple[object, ...]] = {}
    for path in sorted([root, *root.rglob("*")]):
        rel = os.fsencode(path.relative_to(root)).decode("latin-1")
        st = os.lstat(path)
        first = inode_names.setdefault((st.st_dev, st.st_ino), rel)
        if stat.S_ISREG(st.st_mode):
            content: object = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        else:
            content = None
        result[rel] = (
            stat.filemode(st.st_mode),
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
            content,
            read_xattrs(str(path)),
            first,
        )
    return result


# --- create, layers, remove -----------------------------------------------------------------------


def test_capabilities_and_name() -> None:
    assert VfsDriver.name == "vfs"
    assert VfsDriver.capabilities == Capabilities(
        features=frozenset(), max_depth=1000, needs_root=False, independent_layers=False
    )


def test_create_base_layer_is_an_empty_0755_dir_whatever_the_umask(
    driver: VfsDriver, home: Path
) -> None:
    old = os.umask(0o077)
    try:
        driver.create("a1", [], writable=True)
    finally:
        os.umask(old)
    root = home / "dir" / "a1"
    st = os.lstat(root)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert list(root.iterdir()) == []
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (0, 0)
    assert driver.layers() == ["a1"]
    assert stat.S_IMODE(os.lstat(home).st_mode) == 0o700


def test_create_refuses_a_taken_id_and_a_missing_parent(driver: VfsDriver) -> None:
    driver.create("a1", [], writable=True)
    with pytest.raises(AlreadyExists, match="a1"):
        driver.create("a1", [], writable=True)
    with pytest.raises(NotFound, match="b2"):
        driver.create("c3", ["b2"], writable=True)
    assert driver.layers() == ["a1"]


@pytest.mark.parametrize(
    "bad", ["", "..", ".", "a/b", "tmp/../x", "a\x00b", "x" * 129, "ABC", "tmp-a1", "rm-a1"]
)
def test_invalid_ids_are_refused(driver: VfsDriver, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        driver.create(bad, [], writable=True)


def test_child_is_a_copy_not_a_share(driver: VfsDriver, home: Path) -> None:
    driver.create("a1", [], writable=True)
    (home / "dir" / "a1" / "file").write_text("parent")
    driver.create("b2", ["a1"], writable=False)
    (home / "dir" / "b2" / "file").write_text("child")
    assert (home / "dir" / "a1" / "file").read_text() == "parent"
    assert driver.layers() == ["a1", "b2"]


def test_remove_deletes_the_layer_and_only_it(driver: VfsDriver, home: Path) -> None:
    driver.create("a1", [], writable=True)
    driver.create("b2", ["a1"], writable=True)
    (home / "dir" / "b2" / "sub" / "deeper").mkdir(parents=True)
    (home / "dir" / "b2" / "sub" / "link").symlink_to(home / "dir" / "a1")
    driver.remove("b2")
    assert driver.layers() == ["a1"]
    assert not (home / "dir" / "b2").exists()
    assert (home / "dir" / "a1").is_dir()  # the symlink was not followed
    assert sorted(os.listdir(home)) == ["dir"]
    with pytest.raises(NotFound, match="b2"):
        driver.remove("b2")


def test_crash_leftovers_are_not_layers_and_do_not_block(driver: VfsDriver, home: Path) -> None:
    driver.create("a1", [], writable=True)
    (home / "tmp-b2" / "half").mkdir(parents=True)  # a create that died mid-copy
    (home / "rm-c3" / "half").mkdir(parents=True)  # a remove that died mid-delete
    assert driver.layers() == ["a1"]
    driver.create("b2", ["a1"], writable=True)
    assert list((home / "dir" / "b2").iterdir()) == []
    assert not (home / "tmp-b2").exists()
    driver.create("c3", [], writable=True)
    driver.remove("c3")
    assert sorted(os.listdir(home)) == ["dir"]


def test_layers_ignores_stray_files(driver: VfsDriver, home: Path) -> None:
    driver.create("a1", [], writable=True)
    (home / "dir" / "stray-file").write_text("")
    (home / "dir" / "not-a-layer").symlink_to("a1")
    assert driver.layers() == ["a1"]


def test_mounts_is_one_rbind(driver: VfsDriver, home: Path) -> None:
    driver.create("a1", [], writable=True)
    source = str(home / "dir" / "a1")
    assert driver.mounts("a1", [], readonly=False) == [
        MountSpec(type="bind", source=source, options=("rbind", "rw"))
    ]
    (spec,) = driver.mounts("a1", [], readonly=True)
    assert spec.readonly
    assert spec.options == ("rbind", "ro")
    with pytest.raises(NotFound):
        driver.mounts("ff", [], readonly=True)


@pytest.mark.root
def test_readonly_mount_refuses_writes(driver: VfsDriver, tmp_path: Path) -> None:
    driver.create("a1", [], writable=True)
    (spec,) = driver.mounts("a1", [], readonly=True)
    target = tmp_path / "mnt"
    target.mkdir()
    _mounts.bind_mount(spec.source, str(target), readonly=spec.readonly, recursive=True)
    try:
        with pytest.raises(OSError) as info:
            (target / "x").write_text("x")
        assert info.value.errno == errno.EROFS
    finally:
        _mounts.umount(str(target))


def test_close_twice_is_fine(driver: VfsDriver) -> None:
    driver.close()
    driver.close()


# --- copy fidelity --------------------------------------------------------------------------------


@pytest.mark.root
def test_copy_keeps_everything_a_layer_holds(driver: VfsDriver, home: Path) -> None:
    driver.create("a1", [], writable=True)
    parent = home / "dir" / "a1"
    _populate(parent)
    expected = _snapshot(parent)
    driver.create("b2", ["a1"], writable=True)
    child = home / "dir" / "b2"
    copied = _snapshot(child)

    del expected["dev/socket"]  # sockets are skipped
    assert copied == expected
    # Spot checks that read better than a dict diff when they fail.
    assert stat.S_IMODE(os.lstat(child / "bin" / "suid").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(child / "bin" / "sgid").st_mode) == 0o2711
    assert stat.S_IMODE(os.lstat(child / "tmp").st_mode) == 0o1777
    assert os.lstat(child / "bin" / "suid").st_uid == 1
    assert os.lstat(child / "bin" / "suid").st_gid == 2
    assert os.getxattr(child / "bin" / "ping", "security.capability") == CAPABILITY
    assert read_xattrs(str(child / "usr" / ODD_NAME)) == {ODD_XATTR: b"\x00\xffbinary"}
    assert os.lstat(child / "bin" / "big-link").st_ino == os.lstat(child / "usr/lib/big").st_ino
    assert os.lstat(child / "usr" / "rel-link").st_ino == os.lstat(child / "usr" / "rel").st_ino
    assert os.lstat(child / "bin" / "big-link").st_ino != os.lstat(parent / "usr/lib/big").st_ino
    assert stat.S_ISCHR(os.lstat(child / "dev" / "null").st_mode)
    assert os.lstat(child / "dev" / "loop9").st_rdev == os.makedev(7, 9)
    assert stat.S_ISFIFO(os.lstat(child / "dev" / "fifo").st_mode)
    assert not os.path.lexists(child / "dev" / "socket")
    # Nanosecond times, directories included (set after their contents were made).
    depth = len((parent / "usr" / "lib" / "empty").parts)
    assert os.lstat(child / "usr" / "lib" / "empty").st_mtime_ns == MTIME_NS + depth
    # Atimes of entries nothing read (reading a file moves its atime under relatime).
    depth = len((parent / "dev" / "null").parts)
    assert os.lstat(child / "dev" / "null").st_atime_ns == ATIME_NS + depth
    depth = len((parent / "usr" / "lib").parts)
    assert os.lstat(child / "usr" / "lib").st_mtime_ns == MTIME_NS + depth
    assert os.lstat(child / "usr" / "rel").st_mtime_ns == MTIME_NS + depth  # a symlink
    assert os.lstat(child).st_mtime_ns == MTIME_NS


@pytest.mark.root
def test_copy_of_a_copy_is_still_exact(driver: VfsDriver, home: Path) -> None:
    driver.create("a1", [], writable=True)
    _populate(home / "dir" / "a1")
    driver.create("b2", ["a1"], writable=True)
    driver.create("c3", ["b2"], writable=True)
    assert _snapshot(home / "dir" / "c3") == _snapshot(home / "dir" / "b2")


def test_copy_keeps_the_holes_of_a_sparse_file(driver: VfsDriver, home: Path) -> None:
    driver.create("a1", [], writable=True)
    with open(home / "dir" / "a1" / "sparse", "wb") as file:
        file.write(b"start")
        file.seek(32 << 20)
        file.write(b"middle")
        file.truncate(64 << 20)
    driver.create("b2", ["a1"], writable=True)
    copy = home / "dir" / "b2" / "sparse"
    with open(copy, "rb") as file:
        assert file.read(5) == b"start"
        file.seek(32 << 20)
        assert file.read(6) == b"middle"
    st = copy.stat()
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 <= 1 << 20, "the holes stay holes"


@pytest.mark.root
def test_a_failed_copy_leaves_nothing_behind(tmp_path: Path) -> None:
    home = tmp_path / "small"
    home.mkdir()
    _mounts.mount("tmpfs", str(home), "tmpfs", 0, "size=2m")
    try:
        driver = VfsDriver(home, {})
        driver.create("a1", [], writable=True)
        (home / "dir" / "a1" / "big").write_bytes(b"x" * (1536 * 1024))
        with pytest.raises(ResourceExhausted, match="b2") as info:
            driver.create("b2", ["a1"], writable=True)
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.ENOSPC
        assert driver.layers() == ["a1"]
        assert sorted(os.listdir(home)) == ["dir"]
    finally:
        _mounts.umount(str(home))


@pytest.fixture
def btrfs_home(btrfs: Path) -> Path:
    """A driver home on a fresh loop-mounted btrfs."""
    return btrfs / "vfs-home"


def _exclusive_bytes(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        _filesystems.syncfs(fd)
    finally:
        os.close(fd)
    out = subprocess.run(
        ["btrfs", "filesystem", "du", "--raw", "-s", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.splitlines()[1].split()[1])


@pytest.mark.root
def test_copy_on_btrfs_shares_extents(btrfs_home: Path) -> None:
    driver = VfsDriver(btrfs_home, {})
    driver.create("a1", [], writable=True)
    (btrfs_home / "dir" / "a1" / "data").write_bytes(os.urandom(4 * 1024 * 1024))
    driver.create("b2", ["a1"], writable=True)
    copy = btrfs_home / "dir" / "b2" / "data"
    assert copy.read_bytes() == (btrfs_home / "dir" / "a1" / "data").read_bytes()
    assert _exclusive_bytes(copy) == 0  # a reflink: every extent shared with the parent


# --- usage ----------------------------------------------------------------------------------------


def _du(path: Path, *flags: str) -> int:
    out = subprocess.run(["du", "-s", *flags, str(path)], check=True, capture_output=True)
    return int(out.stdout.split()[0])


def test_usage_counts_hardlinks_once_like_du(driver: VfsDriver, home: Path) -> None:
    driver.create("a1", [], writable=True)
    root = home / "dir" / "a1"
    (root / "sub").mkdir()
    (root / "file").write_bytes(os.urandom(100_000))
    os.link(root / "file", root / "sub" / "hardlink")
    (root / "sub" / "link").symlink_to("../file")
    (root / "small").write_bytes(b"x")
    usage = driver.usage("a1")
    assert usage.inodes == 5  # root, sub, file (once), link, small
    assert usage.inodes == _du(root, "--inodes")
    assert usage.size == _du(root, "-B1")
    assert usage.size >= 100_000
    with pytest.raises(NotFound):
        driver.usage("ff")


# --- probe and options ----------------------------------------------------------------------------


def test_probe_accepts_a_home_that_does_not_exist_yet(tmp_path: Path) -> None:
    VfsDriver.probe(tmp_path / "not" / "yet", {})
    assert not (tmp_path / "not").exists()  # probing leaves nothing behind


def test_probe_refuses_a_home_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(DriverUnavailable, match="not a directory"):
        VfsDriver.probe(tmp_path / "file" / "home", {})


@pytest.mark.root
def test_probe_refuses_a_read_only_filesystem(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "ro"
    source.mkdir()
    target.mkdir()
    _mounts.bind_mount(str(source), str(target), readonly=True)
    try:
        with pytest.raises(DriverUnavailable, match="not writable"):
            VfsDriver.probe(target / "home", {})
    finally:
        _mounts.umount(str(target))


def test_unknown_options_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="'size'"):
        VfsDriver.probe(tmp_path, {"size": "10G"})
    with pytest.raises(InvalidArgument, match="'mountopt'"):
        VfsDriver(tmp_path / "home", {"mountopt": "nodev"})


# --- without root ---------------------------------------------------------------------------------

_AS_NOBODY = """
import os, sys
from pathlib import Path
from laminae.drivers.vfs import VfsDriver
home = Path(sys.argv[1])
VfsDriver.probe(home, {})
driver = VfsDriver(home, {})
driver.create("a1", [], writable=True)
root = home / "dir" / "a1"
(root / "proc").mkdir()
(root / "proc" / "file").write_text("x")
(root / "usr" / "bin").mkdir(parents=True)
(root / "usr" / "bin" / "tool").write_text("y")
os.chmod(root / "usr" / "bin" / "tool", 0o755)
os.chmod(root / "usr" / "bin", 0o555)
os.chmod(root / "proc", 0o555)
driver.create("b2", ["a1"], writable=True)
assert (home / "dir" / "b2" / "proc" / "file").read_text() == "x"
assert os.stat(home / "dir" / "b2" / "usr" / "bin").st_mode & 0o777 == 0o555
driver.remove("b2")
driver.remove("a1")
print(driver.layers())
"""


@pytest.mark.root
def test_works_without_root_including_read_only_dirs() -> None:
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is missing")
    base = Path(tempfile.mkdtemp(prefix="laminae-vfs-nobody-"))
    try:
        os.chown(base, 65534, 65534)
        result = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                _AS_NOBODY,
                str(base / "home"),
            ],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]"
    finally:
        shutil.rmtree(base)
