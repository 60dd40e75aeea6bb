"""The btrfs ioctls of laminae.kernel._btrfs, against a real loop-mounted btrfs."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from pathlib import Path

import pytest
from fsops import sync_fs, write_mib

from laminae.kernel import _btrfs, _filesystems

# --- layouts and request numbers ----------------------------------------------------------------


def test_struct_sizes_are_the_uapi_sizes() -> None:
    assert ctypes.sizeof(_btrfs._BtrfsVolArgsV2) == 4096
    assert ctypes.sizeof(_btrfs._BtrfsInoLookupArgs) == 4096
    assert ctypes.sizeof(_btrfs._BtrfsSearchArgs) == 4096
    assert ctypes.sizeof(_btrfs._BtrfsSearchKey) == 104
    assert ctypes.sizeof(_btrfs._BtrfsQgroupLimitArgs) == 48
    assert ctypes.sizeof(_btrfs._BtrfsSubvolWait) == 16
    assert _btrfs._BtrfsVolArgsV2.name.offset == 56  # fd, transid, flags, unused[4]


@pytest.mark.parametrize(
    ("request_name", "number"),
    [
        # The values btrfs-progs (and systemd, mkosi) use on x86_64 and aarch64.
        ("_BTRFS_IOC_SYNC", 0x9408),
        ("_BTRFS_IOC_TREE_SEARCH", 0xD0009411),
        ("_BTRFS_IOC_INO_LOOKUP", 0xD0009412),
        ("_BTRFS_IOC_SNAP_CREATE_V2", 0x50009417),
        ("_BTRFS_IOC_SUBVOL_CREATE_V2", 0x50009418),
        ("_BTRFS_IOC_SUBVOL_GETFLAGS", 0x80089419),
        ("_BTRFS_IOC_SUBVOL_SETFLAGS", 0x4008941A),
        ("_BTRFS_IOC_QUOTA_CTL", 0xC0109428),
        ("_BTRFS_IOC_QGROUP_CREATE", 0x4010942A),
        ("_BTRFS_IOC_QGROUP_LIMIT", 0x8030942B),
        ("_BTRFS_IOC_QUOTA_RESCAN_WAIT", 0x942E),
        ("_BTRFS_IOC_SNAP_DESTROY_V2", 0x5000943F),
        ("_BTRFS_IOC_SUBVOL_SYNC_WAIT", 0x40109441),
    ],
)
def test_request_numbers(request_name: str, number: int) -> None:
    assert getattr(_btrfs, request_name) == number


def test_qgroup_id_packs_the_level_in_the_top_bits() -> None:
    assert _btrfs.qgroup_id(257) == 257
    assert _btrfs.qgroup_id(100, level=1) == (1 << 48) | 100


def test_not_a_subvolume_off_btrfs(tmp_path: Path) -> None:
    assert not _btrfs.is_subvolume(str(tmp_path))
    assert not _btrfs.is_subvolume(str(tmp_path / "missing"))


@pytest.mark.root
def test_create_subvolume_off_btrfs_names_the_path(tmp_path: Path) -> None:
    if _filesystems.statfs_type(str(tmp_path)) == _filesystems.BTRFS_SUPER_MAGIC:
        pytest.fail("this test needs tmp_path off btrfs")
    target = tmp_path / "sub"
    with pytest.raises(OSError) as caught:
        _btrfs.create_subvolume(str(target))
    assert caught.value.errno == errno.ENOTTY
    assert caught.value.filename == str(target)


# --- subvolumes and snapshots -------------------------------------------------------------------


@pytest.mark.root
def test_create_subvolume(btrfs: Path) -> None:
    sub = btrfs / "sub"
    _btrfs.create_subvolume(str(sub))
    assert _btrfs.is_subvolume(str(sub))
    assert os.lstat(sub).st_ino == _btrfs.FIRST_FREE_OBJECTID
    assert _btrfs.subvolume_id(str(sub)) == 256  # the first one after the top level (5)
    assert _btrfs.subvolume_id(str(btrfs)) == 5
    (sub / "dir").mkdir()
    assert not _btrfs.is_subvolume(str(sub / "dir"))
    assert _btrfs.subvolume_id(str(sub / "dir")) == 256  # the subvolume holding it
    with pytest.raises(FileExistsError) as caught:
        _btrfs.create_subvolume(str(sub))
    assert caught.value.filename == str(sub)


@pytest.mark.root
@pytest.mark.parametrize("name", [".", "..", "x" * 256])
def test_create_subvolume_refuses_bad_names(btrfs: Path, name: str) -> None:
    with pytest.raises(OSError) as caught:
        _btrfs.create_subvolume(f"{btrfs}/{name}")
    assert caught.value.errno == errno.EINVAL


@pytest.mark.root
def test_snapshot_shares_content_and_then_diverges(btrfs: Path) -> None:
    source = btrfs / "source"
    _btrfs.create_subvolume(str(source))
    (source / "file").write_bytes(b"original")
    _btrfs.create_snapshot(str(source), str(btrfs / "snap"))
    snap = btrfs / "snap"
    assert _btrfs.is_subvolume(str(snap))
    assert _btrfs.subvolume_id(str(snap)) != _btrfs.subvolume_id(str(source))
    assert not _btrfs.get_readonly(str(snap))
    assert (snap / "file").read_bytes() == b"original"
    (snap / "file").write_bytes(b"changed")
    (snap / "new").write_bytes(b"new")
    assert (source / "file").read_bytes() == b"original"
    assert not (source / "new").exists()


@pytest.mark.root
def test_readonly_snapshot_refuses_writes(btrfs: Path) -> None:
    source = btrfs / "source"
    _btrfs.create_subvolume(str(source))
    (source / "file").write_bytes(b"x")
    _btrfs.create_snapshot(str(source), str(btrfs / "ro"), readonly=True)
    assert _btrfs.get_readonly(str(btrfs / "ro"))
    with pytest.raises(OSError) as caught:
        (btrfs / "ro" / "new").write_bytes(b"y")
    assert caught.value.errno == errno.EROFS
    with pytest.raises(OSError) as caught:
        os.unlink(btrfs / "ro" / "file")
    assert caught.value.errno == errno.EROFS


@pytest.mark.root
def test_set_readonly_round_trip(btrfs: Path) -> None:
    sub = btrfs / "sub"
    _btrfs.create_subvolume(str(sub))
    _btrfs.set_readonly(str(sub), True)
    _btrfs.set_readonly(str(sub), True)  # already: nothing to do
    assert _btrfs.get_readonly(str(sub))
    with pytest.raises(OSError) as caught:
        (sub / "f").write_bytes(b"")
    assert caught.value.errno == errno.EROFS
    _btrfs.set_readonly(str(sub), False)
    assert not _btrfs.get_readonly(str(sub))
    (sub / "f").write_bytes(b"")


@pytest.mark.root
def test_flags_of_a_plain_directory_are_refused(btrfs: Path) -> None:
    (btrfs / "plain").mkdir()
    with pytest.raises(OSError) as caught:
        _btrfs.get_readonly(str(btrfs / "plain"))
    assert caught.value.errno == errno.EINVAL
    assert caught.value.filename == str(btrfs / "plain")


@pytest.mark.root
def test_snapshot_of_a_plain_directory_is_refused(btrfs: Path) -> None:
    (btrfs / "plain").mkdir()
    with pytest.raises(OSError) as caught:
        _btrfs.create_snapshot(str(btrfs / "plain"), str(btrfs / "snap"))
    assert caught.value.errno == errno.EINVAL
    assert not (btrfs / "snap").exists()


@pytest.mark.root
def test_nested_subvolumes_parents_first(btrfs: Path) -> None:
    top = btrfs / "top"
    _btrfs.create_subvolume(str(top))
    (top / "a" / "b").mkdir(parents=True)
    _btrfs.create_subvolume(str(top / "a" / "b" / "n1"))
    _btrfs.create_subvolume(str(top / "a" / "b" / "n1" / "n2"))
    (top / "a" / "b" / "n1" / "deep").mkdir()
    _btrfs.create_subvolume(str(top / "a" / "b" / "n1" / "deep" / "n3"))
    _btrfs.create_subvolume(str(top / "side"))
    ids = {p: _btrfs.subvolume_id(str(top / p)) for p in ("", "a/b/n1", "side")}

    found = _btrfs.nested_subvolumes(str(top))

    by_path = {os.path.relpath(sub.path, top): sub for sub in found}
    assert set(by_path) == {"a/b/n1", "a/b/n1/n2", "a/b/n1/deep/n3", "side"}
    for rel, sub in by_path.items():
        assert sub.id == _btrfs.subvolume_id(str(top / rel))
    assert by_path["a/b/n1"].parent_id == ids[""]
    assert by_path["side"].parent_id == ids[""]
    assert by_path["a/b/n1/n2"].parent_id == ids["a/b/n1"]
    assert by_path["a/b/n1/deep/n3"].parent_id == ids["a/b/n1"]
    order = [os.path.relpath(sub.path, top) for sub in found]
    assert order.index("a/b/n1") < order.index("a/b/n1/n2")
    assert order.index("a/b/n1") < order.index("a/b/n1/deep/n3")
    assert _btrfs.nested_subvolumes(str(top / "side")) == []


@pytest.mark.root
def test_delete_subvolume(btrfs: Path) -> None:
    sub = btrfs / "sub"
    _btrfs.create_subvolume(str(sub))
    (sub / "file").write_bytes(b"x" * 100_000)
    _btrfs.create_subvolume(str(sub / "nested"))
    with pytest.raises(OSError) as caught:
        _btrfs.delete_subvolume(str(sub))
    assert caught.value.errno == errno.ENOTEMPTY
    _btrfs.set_readonly(str(sub / "nested"), True)
    _btrfs.delete_subvolume(str(sub / "nested"))  # read-only ones go too
    assert _btrfs.nested_subvolumes(str(sub)) == []
    _btrfs.delete_subvolume(str(sub))
    assert not os.path.lexists(sub)


@pytest.mark.root
def test_delete_refuses_a_plain_directory(btrfs: Path) -> None:
    (btrfs / "plain").mkdir()
    with pytest.raises(OSError) as caught:
        _btrfs.delete_subvolume(str(btrfs / "plain"))
    assert caught.value.errno == errno.EINVAL
    assert (btrfs / "plain").is_dir()


# --- quotas ---------------------------------------------------------------------------------------


@pytest.mark.root
def test_quota_is_off_until_enabled(btrfs: Path) -> None:
    assert _btrfs.quota_status(str(btrfs)) is None
    assert _btrfs.qgroups(str(btrfs)) == {}
    _btrfs.create_subvolume(str(btrfs / "before"))
    _btrfs.quota_enable(str(btrfs))
    _btrfs.quota_enable(str(btrfs))  # already on: harmless
    _btrfs.quota_rescan_wait(str(btrfs))
    sync_fs(btrfs)
    status = _btrfs.quota_status(str(btrfs))
    assert status is not None and status.consistent and not status.rescanning
    # Every subvolume has its level-0 qgroup, those made before quota was on too.
    _btrfs.create_subvolume(str(btrfs / "after"))
    qgroups = _btrfs.qgroups(str(btrfs))
    for name in ("before", "after"):
        assert _btrfs.subvolume_id(str(btrfs / name)) in qgroups


@pytest.mark.root
def test_qgroup_limit_refuses_writes_past_it(btrfs: Path) -> None:
    _btrfs.quota_enable(str(btrfs))
    _btrfs.quota_rescan_wait(str(btrfs))
    sub = btrfs / "sub"
    _btrfs.create_subvolume(str(sub))
    qgroup = _btrfs.qgroup_id(_btrfs.subvolume_id(str(sub)))
    _btrfs.qgroup_limit(str(btrfs), qgroup, 8 << 20)
    assert _btrfs.qgroups(str(btrfs))[qgroup].max_referenced == 8 << 20

    write_mib(sub / "fits", 4)
    with pytest.raises(OSError) as caught:
        write_mib(sub / "too-much", 8)
    assert caught.value.errno == errno.EDQUOT
    sync_fs(btrfs)
    numbers = _btrfs.qgroups(str(btrfs))[qgroup]
    assert 4 << 20 <= numbers.referenced <= 8 << 20
    assert numbers.exclusive <= numbers.referenced

    _btrfs.qgroup_limit(str(btrfs), qgroup, None)
    assert _btrfs.qgroups(str(btrfs))[qgroup].max_referenced is None
    write_mib(sub / "now-it-fits", 8)


@pytest.mark.root
def test_qgroup_create_and_destroy(btrfs: Path) -> None:
    _btrfs.quota_enable(str(btrfs))
    higher = _btrfs.qgroup_id(100, level=1)
    _btrfs.qgroup_create(str(btrfs), higher)
    assert higher in _btrfs.qgroups(str(btrfs))
    with pytest.raises(FileExistsError):
        _btrfs.qgroup_create(str(btrfs), higher)
    _btrfs.qgroup_destroy(str(btrfs), higher)
    assert higher not in _btrfs.qgroups(str(btrfs))
    with pytest.raises(FileNotFoundError):
        _btrfs.qgroup_destroy(str(btrfs), higher)


@pytest.mark.root
def test_qgroup_of_a_deleted_subvolume_goes_once_it_is_cleaned(btrfs: Path) -> None:
    _btrfs.quota_enable(str(btrfs))
    _btrfs.quota_rescan_wait(str(btrfs))
    sub = btrfs / "sub"
    _btrfs.create_subvolume(str(sub))
    (sub / "file").write_bytes(b"x" * 100_000)
    subvolid = _btrfs.subvolume_id(str(sub))
    qgroup = _btrfs.qgroup_id(subvolid)
    with pytest.raises(OSError) as caught:  # not while its subvolume exists
        _btrfs.qgroup_destroy(str(btrfs), qgroup)
    assert caught.value.errno == errno.EBUSY

    _btrfs.delete_subvolume(str(sub))
    _btrfs.sync(str(btrfs))  # wakes the cleaner now, not at the next 30 s commit
    _btrfs.wait_subvolume_cleaned(str(btrfs), subvolid)
    _btrfs.wait_subvolume_cleaned(str(btrfs), subvolid)  # gone: returns at once
    # Linux 6.10+ removes a dropped subvolume's qgroup itself; older ones leave it to us.
    with contextlib.suppress(FileNotFoundError):
        _btrfs.qgroup_destroy(str(btrfs), qgroup)
    assert qgroup not in _btrfs.qgroups(str(btrfs))


@pytest.mark.root
def test_qgroup_calls_with_quota_off(btrfs: Path) -> None:
    with pytest.raises(OSError) as caught:
        _btrfs.qgroup_create(str(btrfs), _btrfs.qgroup_id(1, level=1))
    assert caught.value.errno == errno.ENOTCONN
    _btrfs.quota_rescan_wait(str(btrfs))  # nothing to wait for
