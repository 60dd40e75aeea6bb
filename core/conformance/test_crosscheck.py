"""Second checks: each property the other areas read through a mount, read again another way.

A fault caught by exactly one test slips through the day that test is skipped, declared a
known failure, or itself wrong. Here the same properties are checked through routes that
share nothing with the first:

- **a copy changes nothing**: a child layer made from a rich parent (owners, modes with
  setuid, capabilities and other xattrs, symlink targets, a fifo, a device node, hard links,
  nanosecond mtimes) and left untouched has no changes, and its diff is an empty tar, as the
  store's change walker and tar writer see it; a driver that rewrites a symlink target, drops
  a capability or resets an owner while copying makes the child differ from its parent.
- **usage follows the data**: what ``usage()`` reports grows by what is written into a
  layer, and the parent's does not (a driver that always says 0, or counts the parent, is
  caught by the size of the change rather than its mere presence). It need not shrink when
  a file is removed: a layer kept in a filesystem image still holds those blocks.
- **a view takes nothing new**: creating a file, a directory or a symlink, renaming and
  changing a mode in a mounted view all fail, and the view has no changes after.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

import laminae
from laminae.conformance._layers import apply, mounted
from laminae.conformance._tars import UNOWNED_MAJOR, LayerTar

_CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # cap_net_raw, effective
_MTIME_NS = 1_600_000_000_123_456_789


def _plain(tar: type[LayerTar]) -> LayerTar:
    """What any run can make, a user namespace's included: root's files and symlinks,
    setuid, a capability, ``user.*`` xattrs, hard links, a fifo, nanosecond mtimes."""
    return (
        tar()
        .dir("etc", mode=0o750, mtime_ns=_MTIME_NS)
        .file("etc/shadow", b"root:*:\n", mode=0o640, mtime_ns=_MTIME_NS)
        .file("ping", b"\x7fELF", mode=0o4755, xattrs={"security.capability": _CAPABILITY})
        .file("labelled", b"x", xattrs={"user.note": b"kept"})
        .hardlink("ping-again", "ping")
        .symlink("relative", "etc/shadow", mtime_ns=_MTIME_NS)
        .symlink("absolute", "/etc/shadow")
        .symlink("dangling", "/no/such/target")
        .fifo("pipe", mode=0o600)
    )


def _rich(tar: type[LayerTar]) -> LayerTar:
    """What only a run as root in the initial user namespace can make: other owners,
    ``trusted.*`` xattrs and a device node, besides what :func:`_plain` holds."""
    return (
        tar()
        .dir("etc", mode=0o750, uid=1, gid=2, mtime_ns=_MTIME_NS)
        .file("etc/shadow", b"root:*:\n", mode=0o640, uid=0, gid=42, mtime_ns=_MTIME_NS)
        .file("ping", b"\x7fELF", mode=0o4755, xattrs={"security.capability": _CAPABILITY})
        .file("labelled", b"x", xattrs={"user.note": b"kept", "trusted.mark": b"t"})
        .hardlink("ping-again", "ping")
        .symlink("relative", "etc/shadow", mtime_ns=_MTIME_NS)
        .symlink("absolute", "/etc/shadow")
        .symlink("dangling", "/no/such/target", uid=3, gid=4)
        .fifo("pipe", mode=0o600, uid=5)
        .chardev("node", UNOWNED_MAJOR, 7, mode=0o620, gid=5)
    )


def _tar_members(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return archive.getnames()


@pytest.mark.laminae_area("crosscheck")
class TestCrossChecks:
    def test_an_untouched_child_has_no_changes(
        self, store: laminae.Store, tar: type[LayerTar]
    ) -> None:
        """Every property the copy must keep, compared by the change walker, not a mount."""
        self._check_untouched_child(store, _rich(tar))

    def test_an_untouched_child_of_plain_files_has_no_changes(
        self, store: laminae.Store, tar: type[LayerTar]
    ) -> None:
        """The same with what a user namespace can make, so that rootless runs check it."""
        self._check_untouched_child(store, _plain(tar))

    @staticmethod
    def _check_untouched_child(store: laminae.Store, layer: LayerTar) -> None:
        base = apply(store, layer)
        store.create_layer("untouched", parent=base.id)
        changes = [f"{c.kind.value} {c.path}" for c in store.changes("untouched")]
        assert changes == [], (
            "create from parent: the child differs from its parent before anything was "
            f"written to it (what the copy changed: {changes})"
        )
        out = io.BytesIO()
        store.diff("untouched", out)
        members = _tar_members(out.getvalue())
        assert members == [], f"diff of an untouched child: the tar holds {members}"
        committed = store.commit_layer("untouched")
        empty = laminae.chain_id([base.id, committed.diff_id or ""])
        assert committed.id == empty, "commit of an untouched child: not the empty layer"

    def test_usage_follows_the_data(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        size = 8 << 20
        base = apply(store, tar().file("base-file", b"b" * 4096))
        layer = store.create_layer("growing", parent=base.id)
        before = store.usage(layer.id).size
        with mounted(store, layer.id) as root:
            (root / "big").write_bytes(os.urandom(size))
            os.sync()
        grown = store.usage(layer.id).size
        assert grown - before >= size * 0.9, (
            f"usage: {size} bytes written into layer 'growing', but its usage went from "
            f"{before} to {grown} bytes"
        )
        assert store.usage(base.id).size < size, (
            "usage of the parent: it counts what its child wrote"
        )

    def test_a_view_takes_nothing_new(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        base = apply(store, tar().dir("d").file("d/f", b"f", mode=0o644))
        store.create_layer("view", parent=base.id, view=True)
        attempts: dict[str, Callable[[Path], object]] = {
            "create a file": lambda root: (root / "new").write_bytes(b"x"),
            "make a directory": lambda root: (root / "newdir").mkdir(),
            "make a symlink": lambda root: os.symlink("d/f", root / "newlink"),
            "rename": lambda root: os.rename(root / "d" / "f", root / "d" / "g"),
            "change a mode": lambda root: os.chmod(root / "d" / "f", 0o600),
            "remove a file": lambda root: (root / "d" / "f").unlink(),
        }
        with mounted(store, "view") as root:
            for what, attempt in attempts.items():
                try:
                    attempt(root)
                except OSError as exc:
                    assert exc.errno == errno.EROFS, f"view: {what} failed with {exc!r}"
                else:
                    pytest.fail(f"view: {what} succeeded in a mounted view")
        changes = [f"{c.kind.value} {c.path}" for c in store.changes("view")]
        assert changes == [], f"view: it has changes after every write was refused: {changes}"
