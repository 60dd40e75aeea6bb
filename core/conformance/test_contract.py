"""The driver tier: the driver contract called directly, as containerd's snapshotter
testsuite calls a snapshotter, with no store in between.

Every other area drives a :class:`laminae.Store`, so a failure there may come from the core
as well as from the driver. Here the test holds the driver itself (made in a home of its
own, as a store would make it), calls ``create``, ``mounts``, ``apply``, ``changes``,
``commit``, ``usage``, ``set_quota``, ``layers`` and ``remove``, and performs the mount specs
it gets with the same executor a store uses. A failure here is the driver's; its message
names the contract call.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import laminae
from laminae.conformance._tars import LayerTar
from laminae.driverkit import _contract
from laminae.driverkit._mount import mount_all, unmount_all

_BIG = 1 << 20

# Storage ids are hex, as the store makes them.
BASE = "ba5eba5eba5eba5eba5eba5eba5eba5e"
CHILD = "c41dc41dc41dc41dc41dc41dc41dc41d"
ONCE = "0ce00ce00ce00ce00ce00ce00ce00ce0"
VIEW = "7e1e7e1e7e1e7e1e7e1e7e1e7e1e7e1e"
APPLIED = "a991a991a991a991a991a991a991a991"
LIMITED = "11b111b111b111b111b111b111b111b1"
NEVER_MADE = "deaddeaddeaddeaddeaddeaddeaddead"


@pytest.fixture
def driver(driver_entry: laminae.DriverEntry, driver_home: Path) -> Iterator[_contract.Driver]:
    """The driver under test in a home of its own; every layer it holds is removed after."""
    home = driver_home / "contract"
    home.mkdir(mode=0o700)
    made: _contract.Driver = driver_entry.cls(home, {})
    try:
        yield made
    finally:
        # Children before parents: a driver may refuse to remove a parent first.
        for storage_id in sorted(made.layers(), reverse=True):
            with contextlib.suppress(laminae.LaminaeError, OSError):
                made.remove(storage_id)
        made.close()


@contextlib.contextmanager
def performed(
    driver: _contract.Driver, id: str, parents: Sequence[str], readonly: bool, target: Path
) -> Iterator[Path]:
    """Perform ``driver.mounts(id, parents, readonly)`` at ``target`` for the block."""
    specs = driver.mounts(id, list(parents), readonly)
    assert specs, f"driver.mounts({id!r}, readonly={readonly}): no mount specs"
    mount_all(specs, target)
    try:
        yield target
    finally:
        unmount_all(target)


def _refuses_writes(root: Path, what: str) -> None:
    try:
        (root / "must-not-land").write_bytes(b"x")
    except OSError as exc:
        assert exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM), (
            f"{what}: a write failed with {exc!r}, expected EROFS"
        )
        return
    pytest.fail(f"{what}: a write through a read-only mount succeeded")


def _content(size: int) -> bytes:
    block = bytes(range(256)) * 16
    return (block * (size // len(block) + 1))[:size]


def _write_base(driver: _contract.Driver, scratch: Path) -> None:
    """Layer ``base``: ``etc/hostname``, a 1 MiB ``big`` file and a symlink."""
    driver.create(BASE, [], True)
    with performed(driver, BASE, [], False, scratch / "m-base") as root:
        (root / "etc").mkdir()
        (root / "etc" / "hostname").write_bytes(b"base\n")
        (root / "big").write_bytes(_content(_BIG))
        os.symlink("etc/hostname", root / "link")


@pytest.mark.laminae_area("contract")
class TestContract:
    def test_create_mount_usage_and_remove(self, driver: _contract.Driver, scratch: Path) -> None:
        _write_base(driver, scratch)
        assert BASE in set(driver.layers()), "driver.layers(): a created layer is missing"
        usage = driver.usage(BASE)
        assert usage.size >= _BIG, (
            f"driver.usage(base): {usage.size} bytes, but the layer holds a {_BIG} byte file"
        )
        assert usage.inodes >= 4, f"driver.usage(base): {usage.inodes} inodes, expected >= 4"
        with performed(driver, BASE, [], True, scratch / "m-ro") as root:
            assert (root / "big").read_bytes() == _content(_BIG), (
                "driver.mounts(base): content lost"
            )
            assert os.readlink(root / "link") == "etc/hostname", "driver.mounts: link target"
            _refuses_writes(root, "driver.mounts(base, readonly=True)")
        driver.remove(BASE)
        assert BASE not in set(driver.layers()), "driver.remove: the layer is still listed"
        with pytest.raises(laminae.NotFound):
            driver.remove(BASE)

    def test_create_twice_and_remove_unknown(self, driver: _contract.Driver) -> None:
        driver.create(ONCE, [], True)
        with pytest.raises(laminae.AlreadyExists):
            driver.create(ONCE, [], True)
        assert ONCE in set(driver.layers()), "driver.create: a refused create removed it"
        with pytest.raises(laminae.NotFound):
            driver.remove(NEVER_MADE)

    def test_a_child_sees_its_parent_and_the_parent_not_the_child(
        self, driver: _contract.Driver, scratch: Path
    ) -> None:
        _write_base(driver, scratch)
        driver.create(CHILD, [BASE], True)
        with performed(driver, CHILD, [BASE], False, scratch / "m-child") as root:
            assert (root / "etc" / "hostname").read_bytes() == b"base\n", (
                "driver.create(child, [base]): the parent's file is not visible"
            )
            (root / "etc" / "hostname").write_bytes(b"child\n")
            (root / "big").unlink()
            (root / "added").write_bytes(b"new\n")
        with performed(driver, BASE, [], True, scratch / "m-base-again") as root:
            assert (root / "etc" / "hostname").read_bytes() == b"base\n", (
                "driver.mounts(base): a write through the child changed the parent"
            )
            assert (root / "big").exists(), "driver: a delete in the child reached the parent"
            assert not (root / "added").exists(), "driver: a child's new file is in the parent"
        with performed(driver, CHILD, [BASE], True, scratch / "m-child-ro") as root:
            assert sorted(os.listdir(root)) == ["added", "etc", "link"], (
                "driver.mounts(child): the child's tree is not what was written"
            )
            assert (root / "etc" / "hostname").read_bytes() == b"child\n"

    def test_a_read_only_layer_refuses_writes(
        self, driver: _contract.Driver, scratch: Path
    ) -> None:
        _write_base(driver, scratch)
        driver.create(VIEW, [BASE], False)
        with performed(driver, VIEW, [BASE], True, scratch / "m-view") as root:
            assert (root / "etc" / "hostname").read_bytes() == b"base\n"
            _refuses_writes(root, "driver.create(view, writable=False) then mounts(readonly)")

    @pytest.mark.laminae_requires(laminae.Feature.APPLY)
    def test_apply_writes_the_tar_and_reads_it_to_the_end(
        self, driver: _contract.Driver, scratch: Path, tar: type[LayerTar]
    ) -> None:
        assert isinstance(driver, _contract.Applier)
        data = tar().dir("etc").file("etc/os-release", b"ID=laminae\n").build()
        stream = io.BytesIO(data)
        driver.create(APPLIED, [], True)
        driver.apply(APPLIED, [], stream, laminae.Limits())
        assert stream.tell() == len(data), (
            f"driver.apply: read {stream.tell()} of the tar's {len(data)} bytes; the store "
            "hashes what is read, so apply must read to the end"
        )
        with performed(driver, APPLIED, [], True, scratch / "m-applied") as root:
            assert (root / "etc" / "os-release").read_bytes() == b"ID=laminae\n", (
                "driver.apply: the tar's file is not in the layer"
            )

    @pytest.mark.laminae_requires(laminae.Feature.CHANGES)
    def test_changes_against_the_parent(self, driver: _contract.Driver, scratch: Path) -> None:
        assert isinstance(driver, _contract.ChangeReporter)
        _write_base(driver, scratch)
        driver.create(CHILD, [BASE], True)
        with performed(driver, CHILD, [BASE], False, scratch / "m-child") as root:
            (root / "etc" / "hostname").write_bytes(b"child\n")
            (root / "big").unlink()
            (root / "added").write_bytes(b"new\n")
        # Whether /etc, whose entry changed but whose own metadata did not, is listed is
        # the driver's choice (the store lists parents of changes itself): left out here.
        found = [(c.path, c.kind) for c in driver.changes(CHILD, [BASE]) if c.path != "/etc"]
        expected = [
            ("/added", laminae.ChangeKind.ADDED),
            ("/big", laminae.ChangeKind.DELETED),
            ("/etc/hostname", laminae.ChangeKind.MODIFIED),
        ]
        assert found == expected, f"driver.changes(child, [base]): {found}"

    @pytest.mark.laminae_requires(laminae.Feature.COMMIT)
    def test_commit_freezes_the_layer(self, driver: _contract.Driver, scratch: Path) -> None:
        assert isinstance(driver, _contract.Committer)
        _write_base(driver, scratch)
        driver.commit(BASE)
        with performed(driver, BASE, [], False, scratch / "m-frozen") as root:
            _refuses_writes(root, "driver.commit(base) then mounts(readonly=False)")

    @pytest.mark.laminae_requires(laminae.Feature.QUOTA)
    def test_quota_stops_writes_past_it(self, driver: _contract.Driver, scratch: Path) -> None:
        assert isinstance(driver, _contract.QuotaSetter)
        quota = 50 * _BIG  # above every driver's minimum (a filesystem image's metadata)
        driver.create(LIMITED, [], True)
        driver.set_quota(LIMITED, quota)
        written = 0
        with performed(driver, LIMITED, [], False, scratch / "m-limited") as root:
            try:
                with open(root / "fill", "wb") as out:
                    chunk = _content(4 * _BIG)
                    while written < 2 * quota:
                        out.write(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                        written += len(chunk)
            except OSError as exc:
                assert exc.errno in (errno.EDQUOT, errno.ENOSPC), (
                    f"driver.set_quota: writing past it failed with {exc!r}"
                )
            else:
                pytest.fail(f"driver.set_quota(limited, {quota}): {written} bytes were written")
