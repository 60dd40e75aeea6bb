"""The btrfs driver, called directly on a loop-mounted btrfs: snapshots, read-only layers,
nested subvolumes, quotas and their qgroups, probing."""

from __future__ import annotations

import errno
import io
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fsops import sync_fs, write_mib
from tarbuild import make_tar
from tools import needs

import laminae
from laminae.driverkit import AlreadyExists, DriverUnavailable, InvalidArgument, MountSpec, NotFound
from laminae.drivers.btrfs import BtrfsDriver, loop_btrfs
from laminae.kernel import _btrfs, _filesystems, _mountinfo

pytestmark = pytest.mark.root

# Storage ids are hex, so the layers here are spelt that way: ba5e (a base), c41d (its child),
# 5ec0 (a second child), 1a7e (a layer on its own), f1e0 and e1e0 (views), 0155 (not there).


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A driver home on a fresh loop-mounted btrfs, gone after the test."""
    base = tmp_path / "fs"
    base.mkdir()
    with loop_btrfs(base) as home:
        yield home


@pytest.fixture
def driver(home: Path) -> Iterator[BtrfsDriver]:
    driver = BtrfsDriver(home, {})
    yield driver
    driver.close()


def _layer(home: Path, id: str) -> Path:
    return home / "subvolumes" / id


def _populate(root: Path, files: int) -> None:
    for number in range(files):
        directory = root / f"d{number // 1000}"
        if number % 1000 == 0:
            directory.mkdir()
        (directory / f"f{number}").write_bytes(b"x")


def _enable_quota(home: Path) -> None:
    _btrfs.quota_enable(str(home))
    _btrfs.quota_rescan_wait(str(home))


def test_registered_as_btrfs_with_priority_20() -> None:
    entry = laminae.available_drivers()["btrfs"]
    assert (entry.cls, entry.priority) == (BtrfsDriver, 20)
    assert laminae.Feature.QUOTA in entry.capabilities.features


def _loops_backed_by(image: Path) -> list[str]:
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if backing.read_text().strip() == str(image):
            found.append(backing.parent.parent.name)
    return found


def test_loop_btrfs_leaves_nothing_when_the_block_fails(tmp_path: Path) -> None:
    """The conformance home: a failing test still gets its filesystem unmounted and its
    loop device detached."""
    with pytest.raises(RuntimeError), loop_btrfs(tmp_path) as home:
        assert _filesystems.statfs_type(str(home)) == _filesystems.BTRFS_SUPER_MAGIC
        assert _loops_backed_by(tmp_path / "btrfs.img")
        (home / "file").write_bytes(b"x")
        raise RuntimeError("the test failed")
    assert not _mountinfo.is_mountpoint(str(tmp_path / "mnt"))
    assert _loops_backed_by(tmp_path / "btrfs.img") == []


# --- probe and options --------------------------------------------------------------------------


def test_probe_off_btrfs_names_the_filesystem(tmp_path: Path) -> None:
    if _filesystems.statfs_type(str(tmp_path)) == _filesystems.BTRFS_SUPER_MAGIC:
        pytest.fail("this test needs tmp_path off btrfs")
    with pytest.raises(DriverUnavailable) as caught:
        BtrfsDriver.probe(tmp_path / "not" / "yet", {})
    assert str(tmp_path) in caught.value.reason
    assert "not on btrfs" in caught.value.reason
    fs_type = next(
        entry.fs_type
        for entry in sorted(_mountinfo.mountinfo(), key=lambda e: len(e.mount_point), reverse=True)
        if str(tmp_path).startswith(entry.mount_point.rstrip("/") + "/")
    )
    assert f"is on {fs_type}" in caught.value.reason


def test_probe_on_btrfs(home: Path) -> None:
    BtrfsDriver.probe(home / "not" / "yet", {})
    BtrfsDriver.probe(home, {"size": "10G"})


@pytest.mark.parametrize(
    ("options", "message"),
    [({"sise": "1G"}, "unknown option 'sise'"), ({"size": "lots"}, "option size")],
)
def test_bad_options_are_refused(home: Path, options: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        BtrfsDriver.probe(home, options)
    with pytest.raises(InvalidArgument, match=message):
        BtrfsDriver(home, options)


# --- creating layers ------------------------------------------------------------------------------


def test_base_layer_is_an_empty_subvolume(driver: BtrfsDriver, home: Path) -> None:
    old = os.umask(0o077)
    try:
        driver.create("ba5e", [], writable=True)
    finally:
        os.umask(old)
    path = _layer(home, "ba5e")
    assert _btrfs.is_subvolume(str(path))
    st = os.lstat(path)
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o755, 0, 0)
    assert os.listdir(path) == []
    assert not _btrfs.get_readonly(str(path))
    assert driver.layers() == ["ba5e"]


def test_create_refuses_what_exists_or_is_missing(driver: BtrfsDriver) -> None:
    driver.create("ba5e", [], writable=True)
    with pytest.raises(AlreadyExists):
        driver.create("ba5e", [], writable=True)
    with pytest.raises(NotFound, match="parent layer 0155"):
        driver.create("c41d", ["0155"], writable=True)
    with pytest.raises(InvalidArgument):
        driver.create("../escape", [], writable=True)
    assert driver.layers() == ["ba5e"]


def test_child_is_a_snapshot_sharing_its_parents_extents(driver: BtrfsDriver, home: Path) -> None:
    """The child is a subvolume of its own whose data is all shared with the parent: its
    exclusive bytes stay at a tree block's worth however much the parent holds."""
    _enable_quota(home)
    driver.create("ba5e", [], writable=True)
    write_mib(_layer(home, "ba5e") / "big", 32)
    _populate(_layer(home, "ba5e"), 2000)
    driver.create("c41d", ["ba5e"], writable=True)
    child = _layer(home, "c41d")
    assert _btrfs.is_subvolume(str(child))
    assert (child / "big").stat().st_size == 32 << 20
    assert (child / "d1" / "f1999").read_bytes() == b"x"
    sync_fs(home)
    qgroups = _btrfs.qgroups(str(home))
    numbers = qgroups[_btrfs.subvolume_id(str(child))]
    assert numbers.referenced >= 32 << 20
    assert numbers.exclusive < 1 << 20, numbers


def test_creating_a_child_does_not_grow_with_the_parent(driver: BtrfsDriver, home: Path) -> None:
    """A snapshot of 1,000 files and one of 20,000 take the same time, within noise."""
    timings = {}
    for files in (1000, 20_000):
        parent = f"a{files}"
        driver.create(parent, [], writable=True)
        _populate(_layer(home, parent), files)
        sync_fs(home)
        best = float("inf")
        for attempt in range(3):
            started = time.perf_counter()
            driver.create(f"c{files}f{attempt}", [parent], writable=True)
            best = min(best, time.perf_counter() - started)
        timings[files] = best
    assert timings[20_000] < 5 * timings[1000] + 0.05, timings


def test_child_changes_stay_in_the_child(driver: BtrfsDriver, home: Path) -> None:
    driver.create("ba5e", [], writable=True)
    (_layer(home, "ba5e") / "file").write_bytes(b"base")
    driver.create("c41d", ["ba5e"], writable=True)
    child = _layer(home, "c41d")
    (child / "file").write_bytes(b"child")
    (child / "new").write_bytes(b"new")
    assert (_layer(home, "ba5e") / "file").read_bytes() == b"base"
    assert not (_layer(home, "ba5e") / "new").exists()


# --- read-only layers -----------------------------------------------------------------------------


def test_parent_is_frozen_when_it_gets_a_child(driver: BtrfsDriver, home: Path) -> None:
    """Only committed layers have children: the first child freezes its parent."""
    driver.create("ba5e", [], writable=True)
    (_layer(home, "ba5e") / "file").write_bytes(b"base")
    assert not _btrfs.get_readonly(str(_layer(home, "ba5e")))
    driver.create("c41d", ["ba5e"], writable=True)
    assert _btrfs.get_readonly(str(_layer(home, "ba5e")))
    with pytest.raises(OSError) as caught:
        (_layer(home, "ba5e") / "file").write_bytes(b"changed")
    assert caught.value.errno == errno.EROFS
    assert not _btrfs.get_readonly(str(_layer(home, "c41d")))
    driver.create("5ec0", ["ba5e"], writable=True)  # frozen already: fine
    assert (_layer(home, "5ec0") / "file").read_bytes() == b"base"


def test_commit_freezes(driver: BtrfsDriver, home: Path) -> None:
    driver.create("1a7e", [], writable=True)
    driver.commit("1a7e")
    with pytest.raises(OSError) as caught:
        (_layer(home, "1a7e") / "file").write_bytes(b"")
    assert caught.value.errno == errno.EROFS
    with pytest.raises(NotFound):
        driver.commit("0155")


def test_views_are_readonly_snapshots(driver: BtrfsDriver, home: Path) -> None:
    driver.create("ba5e", [], writable=True)
    (_layer(home, "ba5e") / "file").write_bytes(b"base")
    driver.create("f1e0", ["ba5e"], writable=False)
    driver.create("e1e0", [], writable=False)
    for view in ("f1e0", "e1e0"):
        path = _layer(home, view)
        assert _btrfs.is_subvolume(str(path))
        assert _btrfs.get_readonly(str(path))
    assert (_layer(home, "f1e0") / "file").read_bytes() == b"base"
    assert os.lstat(_layer(home, "e1e0")).st_mode & 0o7777 == 0o755


def test_mounts_are_binds_of_the_subvolume(driver: BtrfsDriver, home: Path) -> None:
    driver.create("1a7e", [], writable=True)
    source = str(_layer(home, "1a7e"))
    assert driver.mounts("1a7e", [], readonly=False) == [
        MountSpec(type="bind", source=source, options=("rbind", "rw"))
    ]
    assert driver.mounts("1a7e", [], readonly=True) == [
        MountSpec(type="bind", source=source, options=("rbind", "ro"))
    ]
    with pytest.raises(NotFound):
        driver.mounts("0155", [], readonly=True)


# --- removing layers ------------------------------------------------------------------------------


def test_remove_deletes_nested_subvolumes_deepest_first(driver: BtrfsDriver, home: Path) -> None:
    """moby TestBtrfsSubvolDelete, harder: subvolumes a container made in its layer, one
    read-only and holding another, in a layer that is itself frozen."""
    driver.create("1a7e", [], writable=True)
    path = _layer(home, "1a7e")
    (path / "var" / "lib").mkdir(parents=True)
    _btrfs.create_subvolume(str(path / "var" / "lib" / "inner"))
    (path / "var" / "lib" / "inner" / "file").write_bytes(b"inner")
    _btrfs.create_subvolume(str(path / "var" / "lib" / "inner" / "deeper"))
    _btrfs.set_readonly(str(path / "var" / "lib" / "inner"), True)
    _btrfs.create_subvolume(str(path / "other"))
    driver.commit("1a7e")

    driver.remove("1a7e")

    assert not os.path.lexists(path)
    assert driver.layers() == []
    assert _btrfs.nested_subvolumes(str(home)) == []
    with pytest.raises(NotFound):
        driver.remove("1a7e")


def test_remove_leaves_parent_and_siblings(driver: BtrfsDriver, home: Path) -> None:
    driver.create("ba5e", [], writable=True)
    (_layer(home, "ba5e") / "file").write_bytes(b"base")
    driver.create("a", ["ba5e"], writable=True)
    driver.create("b", ["ba5e"], writable=True)
    driver.remove("a")
    assert driver.layers() == ["b", "ba5e"]
    assert (_layer(home, "b") / "file").read_bytes() == b"base"


def test_layers_lists_subvolumes_only(driver: BtrfsDriver, home: Path) -> None:
    driver.create("1a7e", [], writable=True)
    (home / "subvolumes" / "stray").mkdir()
    assert driver.layers() == ["1a7e"]


# --- quotas ---------------------------------------------------------------------------------------


def test_set_quota_turns_quota_on_and_refuses_writes_past_it(
    driver: BtrfsDriver, home: Path
) -> None:
    driver.create("1a7e", [], writable=True)
    assert _btrfs.quota_status(str(home)) is None
    driver.set_quota("1a7e", 16 << 20)
    assert _btrfs.quota_status(str(home)) is not None
    path = _layer(home, "1a7e")
    write_mib(path / "fits", 8)
    with pytest.raises(OSError) as caught:
        write_mib(path / "too-much", 16)
    assert caught.value.errno == errno.EDQUOT
    # The driver still works: remove the excess and write again.
    (path / "too-much").unlink()
    write_mib(path / "again", 2)
    with pytest.raises(InvalidArgument):
        driver.set_quota("1a7e", 0)
    with pytest.raises(NotFound):
        driver.set_quota("0155", 1 << 20)


def test_children_do_not_inherit_a_quota(driver: BtrfsDriver, home: Path) -> None:
    """btrfs copies a snapshot source's limit to the snapshot; a layer's quota is its own."""
    driver.create("1a7e", [], writable=True)
    driver.set_quota("1a7e", 16 << 20)
    driver.create("c41d", ["1a7e"], writable=True)
    driver.create("f1e0", ["1a7e"], writable=False)
    qgroups = _btrfs.qgroups(str(home))
    for id, limit in (("1a7e", 16 << 20), ("c41d", None), ("f1e0", None)):
        subvolid = _btrfs.subvolume_id(str(_layer(home, id)))
        assert qgroups[subvolid].max_referenced == limit, id
    write_mib(_layer(home, "c41d") / "more-than-the-parent-may", 24)


def test_size_option_limits_writable_layers(home: Path) -> None:
    driver = BtrfsDriver(home, {"size": "16M"})
    try:
        driver.create("1a7e", [], writable=True)
        driver.create("f1e0", ["1a7e"], writable=False)
        sync_fs(home)
        qgroups = _btrfs.qgroups(str(home))
        for id, limit in (("1a7e", 16 << 20), ("f1e0", None)):
            subvolid = _btrfs.subvolume_id(str(_layer(home, id)))
            assert qgroups[subvolid].max_referenced == limit, id
        driver.create("c41d", ["1a7e"], writable=True)
        with pytest.raises(OSError) as caught:
            write_mib(_layer(home, "c41d") / "too-much", 24)
        assert caught.value.errno == errno.EDQUOT
    finally:
        driver.close()


def test_remove_drops_the_qgroups(driver: BtrfsDriver, home: Path) -> None:
    """No qgroup outlives its layer (moby#29325): the layer's and its nested subvolumes'.
    The kernel refuses while its cleaner has not dropped a subvolume, so the ids wait in
    qgroups-pending until a later removal or close succeeds, or the kernel drops them."""
    driver.create("1a7e", [], writable=True)
    path = _layer(home, "1a7e")
    _btrfs.create_subvolume(str(path / "nested"))
    driver.set_quota("1a7e", 64 << 20)
    write_mib(path / "data", 4)
    ids = [_btrfs.subvolume_id(str(p)) for p in (path, path / "nested")]
    assert all(i in _btrfs.qgroups(str(home)) for i in ids)

    driver.remove("1a7e")

    pending = home / "qgroups-pending"
    if pending.exists():
        assert {int(i) for i in pending.read_text().split()} <= set(ids)
    _btrfs.sync(str(home))
    for subvolid in ids:
        _btrfs.wait_subvolume_cleaned(str(home), subvolid)
    driver.close()
    assert not pending.exists()
    qgroups = _btrfs.qgroups(str(home))
    assert not any(i in qgroups for i in ids), sorted(qgroups)


# --- usage ----------------------------------------------------------------------------------------


def test_usage_walks_without_quota(driver: BtrfsDriver, home: Path) -> None:
    driver.create("1a7e", [], writable=True)
    path = _layer(home, "1a7e")
    (path / "dir").mkdir()
    (path / "dir" / "data").write_bytes(b"y" * 300_000)
    os.link(path / "dir" / "data", path / "link")
    usage = driver.usage("1a7e")
    assert usage.inodes == 3  # root, dir, data (the hardlink once)
    assert 300_000 <= usage.size < 400_000


def test_usage_reads_qgroup_numbers_with_quota(driver: BtrfsDriver, home: Path) -> None:
    _enable_quota(home)
    driver.create("1a7e", [], writable=True)
    path = _layer(home, "1a7e")
    (path / "dir").mkdir()
    write_mib(path / "dir" / "data", 3)
    usage = driver.usage("1a7e")
    assert 3 << 20 <= usage.size < 4 << 20
    assert usage.inodes == 3
    subvolid = _btrfs.subvolume_id(str(path))
    assert usage.size == _btrfs.qgroups(str(home))[subvolid].referenced
    with pytest.raises(NotFound):
        driver.usage("0155")


def test_store_freezes_a_layer_when_it_commits(home: Path, tmp_path: Path) -> None:
    with laminae.open_store(home.parent, runroot=tmp_path / "run", driver="btrfs") as store:
        applied = store.apply_layer(io.BytesIO(make_tar({"a": b"1"})))
        store.create_layer("work", parent=applied.id)
        committed = store.commit_layer("work")
        for layer in (applied, committed):
            assert _btrfs.get_readonly(str(_layer(store.driver_home, layer.storage_id)))
        store.create_layer("active")
        assert not _btrfs.get_readonly(
            str(_layer(store.driver_home, store.layer("active").storage_id))
        )


def test_size_option_does_not_limit_layers_being_applied(home: Path, tmp_path: Path) -> None:
    """``size`` bounds what a container writes, not the image layers an import applies."""
    big = make_tar({"blob": os.urandom(34 << 20)})
    with laminae.open_store(
        home.parent, runroot=tmp_path / "run", driver="btrfs", driver_options={"size": "20M"}
    ) as store:
        applied = store.apply_layer(io.BytesIO(big))
        on_top = store.apply_layer(io.BytesIO(make_tar({"a": b"1"})), parent=applied.id)
        qgroups = _btrfs.qgroups(str(home))
        for layer in (applied, on_top):
            subvolid = _btrfs.subvolume_id(str(_layer(store.driver_home, layer.storage_id)))
            assert qgroups[subvolid].max_referenced is None
        # The limit counts what the layer references, its image's content included (as
        # Moby's btrfs driver counts): a container gets room on an image smaller than it.
        small = store.apply_layer(io.BytesIO(make_tar({"a": b"1"})))
        store.create_layer("work", parent=small.id)
        root = store.mount("work")
        try:
            write_mib(root / "fits", 4)
            with pytest.raises(OSError) as caught:
                write_mib(root / "too-much", 24)
            assert caught.value.errno == errno.EDQUOT
        finally:
            store.unmount("work")


def _make_qgroups_inconsistent(home: Path) -> None:
    """Put a snapshot, which shares its extents, into a level-1 qgroup without the rescan
    that would recount it: the kernel cannot update the numbers cheaply and marks them
    inconsistent (what a crash mid-accounting also leaves)."""
    _enable_quota(home)
    source, copy = home / "qgsource", home / "qgcopy"
    _btrfs.create_subvolume(str(source))
    write_mib(source / "data", 4)
    _btrfs.create_snapshot(str(source), str(copy))
    sync_fs(home)
    subvolid = _btrfs.subvolume_id(str(copy))
    _btrfs.qgroup_create(str(home), _btrfs.qgroup_id(100, level=1))
    # No ioctl wrapper for QGROUP_ASSIGN in laminae: the btrfs tool makes the real state.
    subprocess.run(
        ["btrfs", "qgroup", "assign", "--no-rescan", f"0/{subvolid}", "1/100", str(home)],
        check=True,
        capture_output=True,
    )
    sync_fs(home)
    status = _btrfs.quota_status(str(home))
    assert status is not None and status.inconsistent


@needs("btrfs")
def test_inconsistent_qgroups_are_rescanned_on_open(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _make_qgroups_inconsistent(home)
    with caplog.at_level(logging.WARNING, logger="laminae.drivers.btrfs"):
        driver = BtrfsDriver(home, {})
    try:
        assert "inconsistent" in caplog.text and "rescanning" in caplog.text
        _btrfs.quota_rescan_wait(str(home))
        status = _btrfs.quota_status(str(home))
        assert status is not None and status.consistent
    finally:
        driver.close()


@needs("btrfs")
def test_setting_a_limit_waits_for_consistent_qgroups(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    driver = BtrfsDriver(home, {})
    try:
        driver.create("1a7e", [], writable=True)
        _make_qgroups_inconsistent(home)
        with caplog.at_level(logging.WARNING, logger="laminae.drivers.btrfs"):
            driver.set_quota("1a7e", 8 << 20)
        assert "rescanning" in caplog.text
        status = _btrfs.quota_status(str(home))
        assert status is not None and status.consistent
        with pytest.raises(OSError) as caught:
            write_mib(_layer(home, "1a7e") / "too-much", 16)
        assert caught.value.errno == errno.EDQUOT
    finally:
        driver.close()


def test_quota_status_of_a_fresh_quota_is_consistent(home: Path) -> None:
    _enable_quota(home)
    status = _btrfs.quota_status(str(home))
    assert status is not None and status.consistent and not status.inconsistent
    assert _btrfs.quota_rescan(str(home))
    _btrfs.quota_rescan_wait(str(home))
