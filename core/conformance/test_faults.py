"""Faults a driver must not hide: write errors during an apply, committed layers writable
underneath, and mounts without the flags the store asked for.

A driver that swallows ``EFBIG``, ``ENOSPC`` or ``EIO`` while writing commits a truncated file
under the tar's DiffID; here the kernel itself makes the writes fail, two ways: a file size
limit (``RLIMIT_FSIZE``, on every filesystem, for every driver) and a store on a tmpfs too
small for the layer (where the driver runs on tmpfs). The apply must fail with a laminae error
and leave nothing.

A committed layer of a driver that declares :attr:`laminae.Feature.COMMIT` must refuse writes
in its own storage, not only through the store's read-only mounts: its mount specs are
performed writable here, by the suite, and a write through them must fail.

Every mount the store makes carries ``nodev``, committed layers and views are read-only, and
active layers are writable, as ``/proc/self/mountinfo`` reports them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import laminae
from laminae.conformance._fixtures import StoreFactory
from laminae.conformance._layers import apply, mounted
from laminae.conformance._tars import LayerTar
from laminae.driverkit._mount import mount_all, unmount_all

_LIMIT = 1 << 20  # the file size limit, and the tmpfs size: far below the layer's file
_BIG = 4 << 20


def _big_layer(tar: type[LayerTar]) -> LayerTar:
    # Not zeros: a driver (or a filesystem) could keep zeros as a hole and never write them.
    block = bytes(range(256)) * 4096
    return tar().dir("data").file("data/big", (block * (_BIG // len(block) + 1))[:_BIG])


def _assert_left_nothing(store: laminae.Store, how: str) -> None:
    assert store.layers() == [], f"{how}: the failed apply left a layer in the graph"
    left = sorted(store.driver.layers())
    assert left == [], f"{how}: the failed apply left storage {left} in the driver"
    report = store.check()
    assert report.ok, f"{how}: the store does not check clean: {report.problems()}"


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """``RLIMIT_FSIZE`` for this process (and the children it starts) during the block.

    Python ignores ``SIGXFSZ``, so a write past the limit fails with ``EFBIG`` instead of
    killing the process.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _mount_options(point: Path) -> set[str]:
    """The per-mount options of the topmost mount at ``point`` (mountinfo's field 6)."""
    found: set[str] | None = None
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table:
            fields = line.split(b" ")
            mount_point = fields[4].replace(b"\\040", b" ").decode(errors="surrogateescape")
            if mount_point == str(point):
                found = set(fields[5].decode().split(","))  # the last one is on top
    assert found is not None, f"{point}: not a mount point"
    return found


@pytest.mark.laminae_area("faults")
class TestWriteErrors:
    def test_a_write_past_the_file_size_limit_fails_the_apply(
        self, store: laminae.Store, tar: type[LayerTar]
    ) -> None:
        """EFBIG in the middle of a file's data: the apply fails and leaves nothing."""
        layer = _big_layer(tar).build()
        with _file_size_limit(_LIMIT):
            try:
                swallowed = apply(store, layer)
            except laminae.LaminaeError:
                pass
            else:
                pytest.fail(
                    f"apply: a write failed (EFBIG past a {_LIMIT} byte file size limit) and "
                    f"the apply still committed layer {swallowed.id}: a driver must not "
                    "swallow write errors"
                )
        _assert_left_nothing(store, "apply under a 1 MiB file size limit")
        assert apply(store, layer).diff_id, "apply: the same layer fails without the limit"

    def test_a_full_filesystem_fails_the_apply(
        self,
        make_store: StoreFactory,
        scratch: Path,
        tar: type[LayerTar],
        driver_entry: laminae.DriverEntry,
    ) -> None:
        """ENOSPC: a store on a 1 MiB tmpfs, and a layer of 4 MiB."""
        small = scratch / "small"
        small.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={_LIMIT},nodev", "laminae-full", str(small)],
            check=True,
        )
        try:
            reason = driver_entry.probe(small / "root" / driver_entry.name, {})
            if reason is not None:
                pytest.skip(f"the driver cannot run on tmpfs, where this test fills it: {reason}")
            store = make_store(small)
            try:
                swallowed = apply(store, _big_layer(tar))
            except laminae.ResourceExhausted:
                pass
            else:
                pytest.fail(
                    f"apply: the filesystem filled up (ENOSPC) and the apply still committed "
                    f"layer {swallowed.id}: a driver must not swallow write errors"
                )
            _assert_left_nothing(store, "apply on a full filesystem")
            store.close()
        finally:
            unmount_all(small, remove_dir=False)


@pytest.mark.laminae_area("faults")
class TestCommittedStorage:
    @pytest.mark.laminae_requires(laminae.Feature.COMMIT)
    def test_committed_storage_refuses_writes_when_mounted_writable(
        self, store: laminae.Store, tar: type[LayerTar], scratch: Path
    ) -> None:
        """The driver said committed layers are frozen: their storage refuses writes even
        through a writable mount of its own specs (a btrfs subvolume without the read-only
        flag would take them)."""
        layer = apply(store, tar().file("kept", b"kept\n"))
        specs = store.driver.mounts(layer.storage_id, [], False)
        target = scratch / "writable"
        mount_all(specs, target)
        try:
            try:
                (target / "new-file").write_bytes(b"must not land\n")
            except OSError as refused:
                assert refused.errno in (errno.EROFS, errno.EPERM, errno.EACCES), (
                    f"commit: writing into committed storage failed with {refused!r}, "
                    "expected EROFS"
                )
            else:
                pytest.fail(
                    f"commit: layer {layer.id} is committed, but a file could be written "
                    "into its storage through a writable mount of the driver's own specs: "
                    "the driver declares commit and must freeze the storage"
                )
        finally:
            unmount_all(target)
        with mounted(store, layer.id) as root:
            assert sorted(os.listdir(root)) == ["kept"], "commit: the committed layer changed"


@pytest.mark.laminae_area("faults")
class TestMountFlags:
    def test_every_mount_is_nodev_and_read_only_where_it_must_be(
        self, store: laminae.Store, tar: type[LayerTar]
    ) -> None:
        base = apply(store, tar().file("f", b"f\n"))
        store.create_layer("active", parent=base.id)
        store.create_layer("view", parent=base.id, view=True)
        for ref, writable in ((base.id, False), ("active", True), ("view", False)):
            with mounted(store, ref) as root:
                options = _mount_options(root)
                assert "nodev" in options, (
                    f"mount of {ref}: options {sorted(options)} lack nodev, which the store "
                    "asked for"
                )
                mode = "rw" if writable else "ro"
                assert mode in options, (
                    f"mount of {ref}: options {sorted(options)}, expected {mode}"
                )
