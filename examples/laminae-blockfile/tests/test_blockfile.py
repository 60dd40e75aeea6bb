"""The blockfile driver's own tests: option parsing, images on disk, and the size limit.

The conformance suite (``tox -e conformance``) checks the driver contract; these check what
is blockfile's alone. Images are inspected with ``debugfs`` and by reading the superblock, so
only the test that writes through a mount needs root.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import laminae
import pytest
from laminae import driverkit
from laminae.driverkit import (
    AlreadyExists,
    DriverUnavailable,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    MountSpec,
    NotFound,
    Usage,
)

import laminae_blockfile
from laminae_blockfile import _driver
from laminae_blockfile._size import MIN_SIZE, format_size

BASE = "0a" * 32
CHILD = "0b" * 32
VIEW = "0c" * 32


def _debugfs_ls(image: Path) -> list[str]:
    """Names in the image's root directory, read without mounting it."""
    out = subprocess.run(
        ["debugfs", "-R", "ls -p /", str(image)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PATH": os.environ["PATH"] + ":/usr/sbin:/sbin"},
    ).stdout
    # ls -p prints "/inode/mode/uid/gid/name/size/" per entry.
    names = [line.split("/")[5] for line in out.splitlines() if line.startswith("/")]
    return [n for n in names if n not in (".", "..")]


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[_driver.BlockfileDriver]:
    d = laminae_blockfile.BlockfileDriver(tmp_path / "home", {"size": "64M"})
    yield d
    d.close()


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16777216", 16 * 1024**2),
        ("512M", 512 * 1024**2),
        ("512m", 512 * 1024**2),
        ("2G", 2 * 1024**3),
        ("1GiB", 1024**3),
        ("1gb", 1024**3),
        ("1536M", 3 * 512 * 1024**2),
        (" 64 M ", 64 * 1024**2),
        ("1T", 1024**4),
        ("16388K", 16388 * 1024),
        ("16777217", 16 * 1024**2),  # rounded down to whole 4 KiB blocks
    ],
)
def test_size_parses(text: str, size: int) -> None:
    assert laminae_blockfile.layer_size(text) == size


# "1.5G" is no size to laminae (storage.toml refuses it), so it is none here either: a value
# means the same bytes to every driver, or it is refused by all of them.
@pytest.mark.parametrize(
    "text", ["", "G", "abc", "1X", "-1G", "1G1", "0x100M", "1,5G", "1.5G", "0"]
)
def test_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"size=.*expected a"):
        laminae_blockfile.layer_size(text)
    with pytest.raises(InvalidArgument):
        driverkit.parse_size(text)


@pytest.mark.parametrize("text", ["64M", "1G", "2GiB", "16777216", "1T"])
def test_a_size_means_the_same_bytes_as_to_laminae(text: str) -> None:
    assert laminae_blockfile.layer_size(text) == driverkit.parse_size(text)


@pytest.mark.parametrize("text", ["1M", "15M", "16777215"])
def test_size_refuses_below_the_minimum(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"below the minimum of 16M"):
        laminae_blockfile.layer_size(text)


@pytest.mark.parametrize("size", [MIN_SIZE, 3 * 512 * 1024**2, 1024**4, 16388 * 1024])
def test_format_size_reads_back(size: int) -> None:
    assert laminae_blockfile.layer_size(format_size(size)) == size


def test_default_size_is_one_gib() -> None:
    assert laminae_blockfile.parse_options({}).size == 1024**3


def test_unknown_option_is_named() -> None:
    with pytest.raises(InvalidArgument, match=r"'sise'.*unknown.*knows: size"):
        laminae_blockfile.parse_options({"sise": "1G"})


def test_bad_option_fails_the_constructor_and_the_probe(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"size='big'"):
        laminae_blockfile.BlockfileDriver(tmp_path, {"size": "big"})
    with pytest.raises(InvalidArgument, match=r"size='big'"):
        laminae_blockfile.BlockfileDriver.probe(tmp_path, {"size": "big"})


# -- probe --------------------------------------------------------------------------------


@pytest.mark.root
def test_probe_passes_on_this_host(tmp_path: Path) -> None:
    laminae_blockfile.BlockfileDriver.probe(tmp_path / "not-yet", {})
    assert not (tmp_path / "not-yet").exists()


def test_probe_names_the_missing_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_driver, "_SBIN", ())
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(DriverUnavailable, match=r"mkfs\.ext4.*install e2fsprogs"):
        laminae_blockfile.BlockfileDriver.probe(tmp_path, {})


def test_probe_wants_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(DriverUnavailable, match=r"needs root.*uid 1000"):
        laminae_blockfile.BlockfileDriver.probe(tmp_path, {})


def test_registers_itself_below_the_builtin_drivers() -> None:
    entry = laminae.available_drivers()["blockfile"]
    assert entry.cls is laminae_blockfile.BlockfileDriver
    assert entry.priority == 5
    assert entry.origin.startswith("laminae-blockfile ")
    assert entry.capabilities.max_depth == 1000
    assert entry.capabilities.needs_root


# -- images -------------------------------------------------------------------------------


def test_base_layer_is_an_empty_sparse_ext4_image(driver: _driver.BlockfileDriver) -> None:
    driver.create(BASE, [], writable=True)
    image = driver.image(BASE)
    st = image.stat()
    assert st.st_size == 64 * 1024**2
    assert st.st_mode & 0o777 == 0o600
    assert st.st_blocks * 512 < 4 * 1024**2, "a fresh image stays sparse"
    with open(image, "rb") as f:
        f.seek(1024 + 56)
        assert f.read(2) == b"\x53\xef"
    assert _debugfs_ls(image) == [], "lost+found is gone"
    assert driver.usage(BASE) == Usage(size=st.st_blocks * 512, inodes=1)
    assert sorted(p.name for p in image.parent.iterdir()) == [f"{BASE}.img"]


def test_writable_child_is_a_sparse_copy(driver: _driver.BlockfileDriver) -> None:
    driver.create(BASE, [], writable=True)
    driver.create(CHILD, [BASE], writable=True)
    base, child = driver.image(BASE).stat(), driver.image(CHILD).stat()
    assert child.st_ino != base.st_ino
    assert child.st_size == base.st_size
    assert child.st_blocks <= base.st_blocks + 8
    assert driver.image(CHILD).read_bytes() == driver.image(BASE).read_bytes()
    assert driver.mounts(CHILD, [BASE], readonly=False) == [
        MountSpec(type="ext4", source=str(driver.image(CHILD)), options=("loop", "rw"))
    ]


def test_view_shares_its_parents_image_and_mounts_read_only(
    driver: _driver.BlockfileDriver,
) -> None:
    driver.create(BASE, [], writable=True)
    driver.create(VIEW, [BASE], writable=False)
    assert driver.image(VIEW).stat().st_ino == driver.image(BASE).stat().st_ino
    assert driver.mounts(VIEW, [BASE], readonly=True) == [
        MountSpec(type="ext4", source=str(driver.image(VIEW)), options=("loop", "ro"))
    ]
    with pytest.raises(FailedPrecondition, match=r"view.*read-only"):
        driver.mounts(VIEW, [BASE], readonly=False)
    driver.remove(VIEW)
    assert driver.image(BASE).stat().st_nlink == 1


def test_create_twice_is_refused(driver: _driver.BlockfileDriver) -> None:
    driver.create(BASE, [], writable=True)
    with pytest.raises(AlreadyExists, match=BASE):
        driver.create(BASE, [], writable=True)


def test_child_of_a_missing_parent_leaves_nothing(driver: _driver.BlockfileDriver) -> None:
    with pytest.raises(NotFound, match=BASE):
        driver.create(CHILD, [BASE], writable=True)
    assert list(driver.layers()) == []
    assert list(driver.image(CHILD).parent.iterdir()) == []


@pytest.mark.parametrize("bad", ["../escape", "", "ABC", "a/b", "sha256:0a"])
def test_ids_that_are_not_storage_ids_are_refused(
    driver: _driver.BlockfileDriver, bad: str
) -> None:
    with pytest.raises(InvalidArgument, match="storage id"):
        driver.create(bad, [], writable=True)


def test_remove_and_layers(driver: _driver.BlockfileDriver) -> None:
    driver.create(BASE, [], writable=True)
    driver.create(CHILD, [BASE], writable=True)
    assert list(driver.layers()) == [BASE, CHILD]
    driver.remove(CHILD)
    assert list(driver.layers()) == [BASE]
    with pytest.raises(NotFound, match=CHILD):
        driver.remove(CHILD)
    with pytest.raises(NotFound, match=CHILD):
        driver.mounts(CHILD, [BASE], readonly=True)
    with pytest.raises(NotFound, match=CHILD):
        driver.usage(CHILD)


def test_half_made_image_is_listed_and_removed(driver: _driver.BlockfileDriver) -> None:
    # What a process killed in the middle of create leaves behind.
    leftover = driver.image(CHILD).with_name(f"{CHILD}.img.tmp")
    leftover.write_bytes(b"partial")
    (leftover.parent / "unrelated.txt").write_text("not a layer")
    assert list(driver.layers()) == [CHILD]
    driver.remove(CHILD)
    assert not leftover.exists()
    assert list(driver.layers()) == []


def test_close_twice(driver: _driver.BlockfileDriver) -> None:
    driver.close()
    driver.close()


# -- through a store, mounted -------------------------------------------------------------


@pytest.mark.root
def test_a_layer_is_empty_when_mounted_and_full_at_its_size(tmp_path: Path) -> None:
    with laminae.open_store(
        tmp_path / "root",
        runroot=tmp_path / "run",
        driver="blockfile",
        driver_options={"size": "16M"},
    ) as store:
        layer = store.create_layer()
        path = store.mount(layer.id)
        try:
            assert os.listdir(path) == []
            written = 0
            chunk = b"\xa5" * (1024 * 1024)
            with pytest.raises(OSError) as info, open(path / "filler", "wb") as f:
                for _ in range(64):
                    written += f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
            assert info.value.errno == errno.ENOSPC
            assert written <= 16 * 1024 * 1024
        finally:
            store.unmount(layer.id, force=True)
        assert store.layer(layer.id).mount_count == 0
        store.remove_layer(layer.id)
        assert list((tmp_path / "root").rglob("*.img")) == []


# -- quota --------------------------------------------------------------------------------


def _fill(image: Path, tmp_path: Path, size: int) -> None:
    """Write a file of ``size`` bytes into the image without mounting it."""
    data = tmp_path / "data"
    data.write_bytes(b"\x5a" * size)
    subprocess.run(
        ["debugfs", "-w", "-R", f"write {data} data", str(image)],
        capture_output=True,
        check=True,
        env={**os.environ, "PATH": os.environ["PATH"] + ":/usr/sbin:/sbin"},
    )


def test_quota_grows_and_shrinks_the_image(driver: _driver.BlockfileDriver) -> None:
    driver.create(BASE, [], writable=True)
    image = driver.image(BASE)
    driver.set_quota(BASE, 128 * 1024**2)
    assert image.stat().st_size == 128 * 1024**2
    driver.set_quota(BASE, 50 * 1024**2 + 123)
    assert image.stat().st_size == 50 * 1024**2
    with open(image, "rb") as f:
        f.seek(1024 + 4)
        blocks = int.from_bytes(f.read(4), "little")
        f.seek(1024 + 24)
        block_size = 1024 << int.from_bytes(f.read(4), "little")
    assert blocks * block_size == 50 * 1024**2, "the filesystem follows the file"
    assert _debugfs_ls(image) == [], "no lost+found comes back"
    driver.set_quota(BASE, 50 * 1024**2)  # same size: nothing to do


def test_quota_below_the_minimum_is_refused(driver: _driver.BlockfileDriver) -> None:
    driver.create(BASE, [], writable=True)
    with pytest.raises(InvalidArgument, match=r"below the minimum of 16M"):
        driver.set_quota(BASE, 1024**2)


def test_quota_smaller_than_the_files_is_refused(
    driver: _driver.BlockfileDriver, tmp_path: Path
) -> None:
    driver.create(BASE, [], writable=True)
    _fill(driver.image(BASE), tmp_path, 24 * 1024**2)
    with pytest.raises(LimitExceeded, match=r"fit in 16M"):
        driver.set_quota(BASE, 16 * 1024**2)
    assert driver.image(BASE).stat().st_size == 64 * 1024**2
    assert _debugfs_ls(driver.image(BASE)) == ["data"]


def test_quota_of_a_view_is_refused(driver: _driver.BlockfileDriver) -> None:
    driver.create(BASE, [], writable=True)
    driver.create(VIEW, [BASE], writable=False)
    with pytest.raises(FailedPrecondition, match=r"view"):
        driver.set_quota(VIEW, 128 * 1024**2)


@pytest.mark.root
def test_quota_of_a_layer_in_use_is_refused(driver: _driver.BlockfileDriver) -> None:
    driver.create(BASE, [], writable=True)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(driver.image(BASE))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        with pytest.raises(FailedPrecondition, match=rf"in use \({device}\)"):
            driver.set_quota(BASE, 128 * 1024**2)
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)
    assert driver.image(BASE).stat().st_size == 64 * 1024**2
