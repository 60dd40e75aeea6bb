"""Extended attributes through laminae.kernel._xattrs: bytes names end to end, on a real
filesystem."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from laminae.kernel import _xattrs

ODD_NAME = b"user.\xff\xfeodd"
BINARY = bytes(range(256)) + b"\x00\x00"
# A VFS_CAP_REVISION_2 capability set granting cap_net_bind_service (bit 10), as setcap writes.
CAPABILITY = bytes.fromhex("0100000200040000000000000000000000000000")


@pytest.fixture
def file(tmp_path: Path) -> str:
    path = tmp_path / "file"
    path.write_bytes(b"content")
    return str(path)


def test_non_utf8_name_and_binary_value_round_trip(file: str) -> None:
    _xattrs.set_xattr(file, ODD_NAME, BINARY)
    _xattrs.set_xattr(file, b"user.empty", b"")
    assert sorted(_xattrs.list_xattrs(file)) == sorted([ODD_NAME, b"user.empty"])
    assert _xattrs.get_xattr(file, ODD_NAME) == BINARY
    assert _xattrs.get_xattr(file, b"user.empty") == b""
    assert _xattrs.read_xattrs(file) == {ODD_NAME: BINARY, b"user.empty": b""}
    # The stdlib agrees on the bytes: nothing was decoded or re-encoded on the way.
    assert os.getxattr(file, ODD_NAME) == BINARY


def test_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    path = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    Path(path).write_bytes(b"")
    _xattrs.set_xattr(path, ODD_NAME, b"v")
    assert _xattrs.read_xattrs(path) == {ODD_NAME: b"v"}
    _xattrs.remove_xattr(path, ODD_NAME)
    assert _xattrs.list_xattrs(path) == []


def test_fd_target_sees_the_same_attributes(file: str) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        _xattrs.set_xattr(fd, ODD_NAME, b"v")
        assert _xattrs.list_xattrs(fd) == [ODD_NAME]
        assert _xattrs.get_xattr(fd, ODD_NAME) == b"v"
        assert _xattrs.read_xattrs(fd) == {ODD_NAME: b"v"}
        _xattrs.remove_xattr(fd, ODD_NAME)
        assert _xattrs.read_xattrs(fd) == {}
    finally:
        os.close(fd)
    assert _xattrs.list_xattrs(file) == []


def test_value_is_replaced(file: str) -> None:
    _xattrs.set_xattr(file, b"user.k", b"first")
    _xattrs.set_xattr(file, b"user.k", b"second")
    assert _xattrs.get_xattr(file, b"user.k") == b"second"


def test_absent_attribute_is_none(file: str) -> None:
    assert _xattrs.get_xattr(file, b"user.absent") is None
    assert _xattrs.get_xattr(file, b"security.capability") is None
    assert _xattrs.read_xattrs(file) == {}
    with pytest.raises(OSError) as info:
        _xattrs.remove_xattr(file, b"user.absent")
    assert info.value.errno == errno.ENODATA


def test_missing_file_raises(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    for call in (
        lambda: _xattrs.list_xattrs(missing),
        lambda: _xattrs.get_xattr(missing, b"user.x"),
        lambda: _xattrs.set_xattr(missing, b"user.x", b"v"),
    ):
        with pytest.raises(FileNotFoundError):
            call()


@pytest.mark.root
def test_security_capability_round_trips_as_bytes(file: str) -> None:
    _xattrs.set_xattr(file, b"security.capability", CAPABILITY)
    assert _xattrs.get_xattr(file, b"security.capability") == CAPABILITY
    assert b"security.capability" in _xattrs.list_xattrs(file)
    assert _xattrs.read_xattrs(file)[b"security.capability"] == CAPABILITY


@pytest.mark.root
def test_trusted_namespace_round_trips(file: str) -> None:
    _xattrs.set_xattr(file, b"trusted.overlay.opaque", b"y")
    assert _xattrs.read_xattrs(file) == {b"trusted.overlay.opaque": b"y"}


def test_symlink_is_not_followed_by_default(tmp_path: Path, file: str) -> None:
    link = tmp_path / "link"
    link.symlink_to(file)
    _xattrs.set_xattr(file, b"user.on-target", b"t")
    # The link's own attributes: none, and user.* cannot be set on a symlink.
    assert _xattrs.list_xattrs(str(link)) == []
    assert _xattrs.get_xattr(str(link), b"user.on-target") is None
    with pytest.raises(OSError) as info:
        _xattrs.set_xattr(str(link), b"user.x", b"v")
    assert info.value.errno == errno.EPERM
    # follow=True reaches the target.
    assert _xattrs.list_xattrs(str(link), follow=True) == [b"user.on-target"]
    assert _xattrs.get_xattr(str(link), b"user.on-target", follow=True) == b"t"
    _xattrs.set_xattr(str(link), b"user.via-link", b"l", follow=True)
    assert _xattrs.read_xattrs(file) == {b"user.on-target": b"t", b"user.via-link": b"l"}


@pytest.mark.root
def test_symlink_keeps_its_own_trusted_attribute(tmp_path: Path, file: str) -> None:
    link = tmp_path / "link"
    link.symlink_to(file)
    _xattrs.set_xattr(str(link), b"trusted.mark", b"on-link")
    assert _xattrs.read_xattrs(str(link)) == {b"trusted.mark": b"on-link"}
    assert _xattrs.read_xattrs(file) == {}
