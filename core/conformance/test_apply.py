"""Content fidelity through real layer tars: every file type, owners, modes, times,
hardlinks, extended attributes, long and non-UTF-8 names, whiteouts and opaque directories,
type changes, compression and digests. Applied with ``store.apply_layer``; read back with
``os.*`` from a real mount of the layer, and of a child layer (where a driver copies or
stacks its parent)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import hashlib
import io
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import zstandard

import laminae
from laminae import driverkit
from laminae.conformance._fixtures import StoreFactory
from laminae.conformance._layers import apply, mounted
from laminae.conformance._tars import UNOWNED_MAJOR, UNREGISTRABLE_MAJOR, LayerTar
from laminae.conformance._tree import (
    assert_same_tree,
    expect_entry,
    hardlink_groups,
    read_xattrs,
    snapshot,
)
from laminae.driverkit._mount import mount_all, unmount_all

NS = 1_000_000_000
MTIME_NS = 1_234_567_890 * NS + 123_456_789
# VFS_CAP_REVISION_2 (0x02000000) | VFS_CAP_FLAGS_EFFECTIVE, permitted = CAP_NET_BIND_SERVICE.
FILE_CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
NON_UTF8_XATTR = b"user.\xff\xfe-not-utf8"
XATTRS: dict[str | bytes, bytes] = {
    "user.text": b"plain value",
    "user.binary": b"\x00\x01\xff\x00nul inside",
    NON_UTF8_XATTR: b"a name that is not UTF-8",
    "trusted.laminae": b"needs CAP_SYS_ADMIN to read",
}


@contextmanager
def layer_and_child(store: laminae.Store, layer: laminae.Layer) -> Iterator[list[tuple[str, Path]]]:
    """The committed layer's mount and a mount of a new active layer on it, each with the
    step that made it, for messages."""
    child = store.create_layer(parent=layer.id)
    with mounted(store, layer.id) as root, mounted(store, child.id) as child_root:
        yield [("apply", root), ("create from parent", child_root)]


def assert_absent(root: Path, path: str, why: str) -> None:
    full = root / path
    if os.path.lexists(full):
        kind = stat.filemode(os.lstat(full).st_mode)
        raise AssertionError(f"{why}: {path} is still there ({kind})")


def no_whiteout_names(root: Path) -> list[str]:
    return [p for p in snapshot(root) if os.path.basename(p).startswith(".wh.")]


@pytest.mark.laminae_area("apply")
class TestApply:
    def test_regular_files(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        big = os.urandom(1 << 20)
        layer = apply(
            store,
            tar()
            .file("empty", b"")
            .file("plain", b"plain\n", mode=0o644, mtime_ns=MTIME_NS)
            .file("big", big, mode=0o600, uid=1000, gid=1000)
            .file("setuid", b"#!/bin/true\n", mode=0o4755)
            .file("setgid", b"#!/bin/true\n", mode=0o2711, gid=50)
            .file("sticky", b"x", mode=0o1644)
            .file("large-ids", b"x", uid=3_000_000, gid=3_000_001),
        )
        with layer_and_child(store, layer) as roots:
            for step, root in roots:
                tree = snapshot(root, mtimes=True)
                expected = {
                    "/empty": (0o644, 0, 0, b""),
                    "/plain": (0o644, 0, 0, b"plain\n"),
                    "/big": (0o600, 1000, 1000, big),
                    "/setuid": (0o4755, 0, 0, b"#!/bin/true\n"),
                    "/setgid": (0o2711, 0, 50, b"#!/bin/true\n"),
                    "/sticky": (0o1644, 0, 0, b"x"),
                    "/large-ids": (0o644, 3_000_000, 3_000_001, b"x"),
                }
                for path, (mode, uid, gid, data) in expected.items():
                    expect_entry(
                        tree,
                        path,
                        step=step,
                        kind="file",
                        mode=mode,
                        uid=uid,
                        gid=gid,
                        sha256=hashlib.sha256(data).hexdigest(),
                    )
                expect_entry(tree, "/plain", step=step, mtime_ns=MTIME_NS)

    def test_directories(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        layer = apply(
            store,
            tar()
            .dir("tmp", mode=0o1777)
            .dir("srv", mode=0o2775, uid=1000, gid=1001)
            .dir("private", mode=0o700, uid=33, gid=33)
            .file("implied/parents/file", b"x"),
        )
        with layer_and_child(store, layer) as roots:
            for step, root in roots:
                tree = snapshot(root)
                expect_entry(tree, "/tmp", step=step, kind="dir", mode=0o1777)
                expect_entry(tree, "/srv", step=step, mode=0o2775, uid=1000, gid=1001)
                expect_entry(tree, "/private", step=step, mode=0o700, uid=33)
                for implied in ("/implied", "/implied/parents"):
                    expect_entry(tree, implied, step=step, kind="dir")
                expect_entry(tree, "/implied/parents/file", step=step, kind="file")

    def test_symlinks(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        layer = apply(
            store,
            tar()
            .dir("etc")
            .file("etc/real", b"real")
            .symlink("relative", "etc/real", mtime_ns=MTIME_NS)
            .symlink("absolute", "/etc/real")
            .symlink("dangling", "/no/such/target")
            .symlink("to-dir", "etc", uid=1, gid=2)
            .symlink("etc/up", "../etc/real"),
        )
        with layer_and_child(store, layer) as roots:
            for step, root in roots:
                tree = snapshot(root, mtimes=True)
                targets = {p: tree[p].target for p in tree if tree[p].kind == "symlink"}
                assert targets == {
                    "/relative": "etc/real",
                    "/absolute": "/etc/real",
                    "/dangling": "/no/such/target",
                    "/to-dir": "etc",
                    "/etc/up": "../etc/real",
                }
                expect_entry(tree, "/to-dir", step=step, uid=1, gid=2)
                expect_entry(tree, "/relative", step=step, mtime_ns=MTIME_NS)
                assert (root / "relative").read_bytes() == b"real"

    def test_hardlinks_within_a_layer(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        layer = apply(
            store,
            tar()
            .dir("bin")
            .file("bin/busybox", b"multi-call binary", mode=0o755)
            .hardlink("bin/sh", "bin/busybox")
            .hardlink("bin/ls", "bin/busybox")
            .dir("sbin")
            .hardlink("sbin/init", "bin/busybox")
            .file("single", b"alone"),
        )
        with layer_and_child(store, layer) as roots:
            for step, root in roots:
                groups = hardlink_groups(root)
                assert groups == {
                    frozenset({"/bin/busybox", "/bin/sh", "/bin/ls", "/sbin/init"})
                }, f"{step}: hardlinks not kept as one inode: {groups}"
                assert os.lstat(root / "bin" / "sh").st_nlink == 4, f"{step}: /bin/sh link count"
                assert (root / "sbin" / "init").read_bytes() == b"multi-call binary"

    def test_hardlink_to_a_lower_layer(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        """A hardlink whose target came with a parent layer."""
        base = apply(store, tar().dir("usr").file("usr/python3.11", b"interpreter", mode=0o755))
        top = apply(store, tar().dir("usr").hardlink("usr/python3", "usr/python3.11"), base)
        with layer_and_child(store, top) as roots:
            for step, root in roots:
                assert (root / "usr" / "python3").read_bytes() == b"interpreter"
                assert os.path.samefile(root / "usr" / "python3", root / "usr" / "python3.11"), (
                    f"{step}: hardlink to a lower layer's file is not the same file"
                )
                expect_entry(snapshot(root), "/usr/python3", step=step, mode=0o755)

    def test_devices(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        # Numbers no host driver owns: a driver that opens a node fails at once.
        layer = apply(
            store,
            tar()
            .dir("dev")
            .chardev("dev/chr0", UNOWNED_MAJOR, 3, mode=0o666)
            .chardev("dev/chr1", UNOWNED_MAJOR, 4, mode=0o620, gid=5)
            .blockdev("dev/blk0", UNOWNED_MAJOR, 8, mode=0o660, gid=6)
            .blockdev("dev/blk-wide", UNREGISTRABLE_MAJOR, 65536, mode=0o600),
        )
        with layer_and_child(store, layer) as roots:
            for step, root in roots:
                tree = snapshot(root)
                expect_entry(
                    tree, "/dev/chr0", step=step, kind="char", rdev=(UNOWNED_MAJOR, 3), mode=0o666
                )
                expect_entry(tree, "/dev/chr1", step=step, rdev=(UNOWNED_MAJOR, 4), gid=5)
                expect_entry(
                    tree,
                    "/dev/blk0",
                    step=step,
                    kind="block",
                    rdev=(UNOWNED_MAJOR, 8),
                    mode=0o660,
                    gid=6,
                )
                expect_entry(tree, "/dev/blk-wide", step=step, rdev=(UNREGISTRABLE_MAJOR, 65536))

    def test_fifos(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        layer = apply(
            store, tar().fifo("pipe", mode=0o600, uid=1, gid=1).fifo("public-pipe", mode=0o666)
        )
        with layer_and_child(store, layer) as roots:
            for step, root in roots:
                tree = snapshot(root)
                expect_entry(tree, "/pipe", step=step, kind="fifo", mode=0o600, uid=1, gid=1)
                expect_entry(tree, "/public-pipe", step=step, kind="fifo", mode=0o666)

    def test_xattrs(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        """``SCHILY.xattr.*`` records: text and binary values, a name that is not UTF-8,
        ``trusted.*``, and ``security.capability`` on an executable."""
        layer = apply(
            store,
            tar()
            .dir("etc", xattrs={"user.on-a-dir": b"dir value"})
            .file("etc/config", b"x", xattrs=XATTRS)
            .file("ping", b"\x7fELF", mode=0o755, xattrs={"security.capability": FILE_CAPABILITY}),
        )
        with mounted(store, layer.id) as root:
            self._check_xattrs(root, "the layer")

    def test_xattrs_in_child_layers(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        """Extended attributes survive into child layers, applied and written ones alike."""
        base = apply(
            store,
            tar()
            .dir("etc", xattrs={"user.on-a-dir": b"dir value"})
            .file("etc/config", b"x", xattrs=XATTRS)
            .file("ping", b"\x7fELF", mode=0o755, xattrs={"security.capability": FILE_CAPABILITY}),
        )
        applied = apply(store, tar().file("unrelated", b"y"), base)
        active = store.create_layer("active", parent=applied.id)
        with mounted(store, active.id) as root:
            (root / "written-in-active").write_bytes(b"z")
            self._check_xattrs(root, "an active child layer")
        committed = store.commit_layer(active.id)
        view = store.create_layer("view", parent=committed.id, view=True)
        for ref, what in ((applied.id, "an applied child layer"), (view.id, "a view two up")):
            with mounted(store, ref) as root:
                self._check_xattrs(root, what)

    @staticmethod
    def _check_xattrs(root: Path, what: str) -> None:
        expected = {os.fsdecode(k) if isinstance(k, bytes) else k: v for k, v in XATTRS.items()}
        got = read_xattrs(root / "etc" / "config")
        assert got == expected, f"xattrs of /etc/config in {what}: lost or changed"
        assert read_xattrs(root / "etc") == {"user.on-a-dir": b"dir value"}, (
            f"xattrs of directory /etc in {what}: lost or changed"
        )
        assert read_xattrs(root / "ping") == {"security.capability": FILE_CAPABILITY}, (
            f"xattr security.capability of /ping in {what}: lost or changed"
        )

    def test_whiteout_removes_a_lower_file(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        base = apply(store, tar().dir("etc").file("etc/gone", b"x").file("etc/kept", b"y"))
        top = apply(store, tar().whiteout("etc/gone"), base)
        with layer_and_child(store, top) as roots:
            for step, root in roots:
                assert_absent(
                    root, "etc/gone", f"{step}: whiteout .wh.gone did not delete the lower file"
                )
                assert (root / "etc" / "kept").read_bytes() == b"y"
                assert no_whiteout_names(root) == [], "whiteout markers are visible"

    def test_whiteout_removes_a_lower_directory(
        self, store: laminae.Store, tar: type[LayerTar]
    ) -> None:
        base = apply(
            store, tar().dir("var").dir("var/cache").file("var/cache/a/b/c", b"x").dir("var/lib")
        )
        top = apply(store, tar().whiteout("var/cache"), base)
        with layer_and_child(store, top) as roots:
            for step, root in roots:
                assert_absent(
                    root, "var/cache", f"{step}: whiteout .wh.cache did not delete the lower dir"
                )
                assert sorted(os.listdir(root / "var")) == ["lib"]
                assert no_whiteout_names(root) == [], "whiteout markers are visible"

    def test_whiteout_of_a_missing_path(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        """A whiteout of something no lower layer has is harmless."""
        base = apply(store, tar().file("present", b"x"))
        top = apply(store, tar().whiteout("never-existed").whiteout("no/such/dir"), base)
        with mounted(store, top.id) as root:
            assert os.listdir(root) == ["present"]

    @pytest.mark.parametrize("marker", ["marker-first", "marker-last"])
    def test_opaque_whiteout_hides_lower_children(
        self, store: laminae.Store, tar: type[LayerTar], marker: str
    ) -> None:
        """``.wh..wh..opq`` hides every lower child, wherever it is in the tar."""
        base = apply(
            store,
            tar().dir("d").file("d/old", b"old").dir("d/sub").file("d/sub/deep", b"deep"),
        )
        top = tar().dir("d", mode=0o750)
        if marker == "marker-first":
            top.opaque("d")
        top.file("d/new", b"new").dir("d/sub").file("d/sub/fresh", b"fresh")
        if marker == "marker-last":
            top.opaque("d")
        layer = apply(store, top, base)
        with layer_and_child(store, layer) as roots:
            for step, root in roots:
                listing = sorted(p for p in snapshot(root) if p.startswith("/d/"))
                assert listing == ["/d/new", "/d/sub", "/d/sub/fresh"], (
                    f"{step}: opaque whiteout did not hide the lower children of /d: {listing}"
                )
                expect_entry(snapshot(root), "/d", step=step, mode=0o750)
                assert no_whiteout_names(root) == [], "whiteout markers are visible"

    @pytest.mark.parametrize("how", ["replace", "whiteout-then-create"])
    @pytest.mark.parametrize(
        ("before", "after"),
        [
            ("file", "dir"),
            ("dir", "file"),
            ("file", "symlink"),
            ("symlink", "file"),
            ("dir", "symlink"),
            ("symlink", "dir"),
            ("file", "fifo"),
        ],
    )
    def test_type_change(
        self, store: laminae.Store, tar: type[LayerTar], before: str, after: str, how: str
    ) -> None:
        """A path changes type in an upper layer, replaced directly, or whited out and made
        again in the same layer."""

        def add(layer: LayerTar, kind: str, content: str) -> LayerTar:
            if kind == "file":
                return layer.file("x", content.encode())
            if kind == "dir":
                return layer.dir("x").file("x/child", content.encode())
            if kind == "fifo":
                return layer.fifo("x")
            return layer.symlink("x", f"target-{content}")

        base = apply(store, add(tar().file("keep", b"k"), before, "lower"))
        upper = tar()
        if how == "whiteout-then-create":
            upper.whiteout("x")
        top = apply(store, add(upper, after, "upper"), base)
        with layer_and_child(store, top) as roots:
            for step, root in roots:
                tree = snapshot(root)
                expect_entry(tree, "/x", step=step, kind=after)
                if after == "dir":
                    assert sorted(p for p in tree if p.startswith("/x/")) == ["/x/child"]
                    assert (root / "x" / "child").read_bytes() == b"upper"
                elif after == "file":
                    assert (root / "x").read_bytes() == b"upper"
                elif after == "symlink":
                    expect_entry(tree, "/x", step=step, target="target-upper")
                assert "/keep" in tree
                assert no_whiteout_names(root) == [], "whiteout markers are visible"

    def test_directory_takes_the_upper_attributes(
        self, store: laminae.Store, tar: type[LayerTar]
    ) -> None:
        """image-spec: a directory entry over a directory changes its attributes and keeps
        the lower children."""
        base = apply(store, tar().dir("d", mode=0o755).file("d/lower", b"l"))
        top = apply(store, tar().dir("d", mode=0o700, uid=7, gid=8, xattrs={"user.k": b"v"}), base)
        with layer_and_child(store, top) as roots:
            for step, root in roots:
                tree = snapshot(root)
                expect_entry(
                    tree, "/d", step=step, mode=0o700, uid=7, gid=8, xattrs={"user.k": b"v"}
                )
                assert (root / "d" / "lower").read_bytes() == b"l"

    def test_long_and_non_utf8_names(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        component = "c" * 255
        deep = "/".join(["deep"] * 40) + "/file"
        latin1 = b"caf\xe9-latin1"
        target = "t" * 1000
        layer = apply(
            store,
            tar()
            .file(component, b"255 bytes")
            .file(deep, b"deep")
            .file(latin1, b"not utf-8")
            .symlink("long-link", target)
            .file("utf8-\u00e9\u4e2d", b"utf-8"),
        )
        with layer_and_child(store, layer) as roots:
            for step, root in roots:
                assert (root / component).read_bytes() == b"255 bytes"
                assert (root / deep).read_bytes() == b"deep"
                assert (
                    Path(os.fsdecode(os.path.join(os.fsencode(root), latin1)))
                ).read_bytes() == (b"not utf-8")
                assert os.readlink(root / "long-link") == target, f"{step}: /long-link target"
                assert (root / "utf8-\u00e9\u4e2d").read_bytes() == b"utf-8"

    def test_empty_layer(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        data = tar().build()
        layer = store.apply_layer(io.BytesIO(data))
        assert layer.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
        with mounted(store, layer.id) as root:
            assert os.listdir(root) == []

    def test_layer_ids_are_chain_ids(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        base_tar = tar().file("a", b"a").build()
        top_tar = tar().file("b", b"b").build()
        base = store.apply_layer(io.BytesIO(base_tar))
        top = store.apply_layer(io.BytesIO(top_tar), parent=base.id)
        base_diff = "sha256:" + hashlib.sha256(base_tar).hexdigest()
        top_diff = "sha256:" + hashlib.sha256(top_tar).hexdigest()
        assert (base.id, base.diff_id, base.size) == (base_diff, base_diff, len(base_tar))
        assert top.diff_id == top_diff and top.id == laminae.chain_id([base_diff, top_diff])
        assert top.parent == base.id and top.depth == 1

    def test_same_tar_twice_is_stored_once(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        data = tar().file("a", b"a").build()
        first = store.apply_layer(io.BytesIO(data))
        again = store.apply_layer(io.BytesIO(data))
        assert again.id == first.id and again.storage_id == first.storage_id
        assert len(store.layers()) == 1
        assert store.check().ok

    @pytest.mark.parametrize("compression", ["gzip", "zstd"])
    def test_compressed_layers(
        self, make_store: StoreFactory, tar: type[LayerTar], scratch: Path, compression: str
    ) -> None:
        """A compressed layer has the DiffID of its uncompressed tar, and its own digest."""
        data = tar().dir("etc").file("etc/os-release", b"ID=laminae\n").build()
        packed = gzip.compress(data) if compression == "gzip" else zstandard.compress(data)
        plain_store = make_store(scratch / "plain")
        packed_store = make_store(scratch / "packed")
        plain = plain_store.apply_layer(io.BytesIO(data))
        layer = packed_store.apply_layer(
            io.BytesIO(packed), digest="sha256:" + hashlib.sha256(packed).hexdigest()
        )
        assert layer.id == plain.id == "sha256:" + hashlib.sha256(data).hexdigest()
        assert layer.digest == "sha256:" + hashlib.sha256(packed).hexdigest()
        with mounted(packed_store, layer.id) as root:
            assert (root / "etc" / "os-release").read_bytes() == b"ID=laminae\n"

    @pytest.mark.parametrize("which", ["diff_id", "digest"])
    def test_digest_mismatch_leaves_nothing(
        self, store: laminae.Store, tar: type[LayerTar], which: str
    ) -> None:
        data = tar().file("a", b"a").build()
        wrong = "sha256:" + "0" * 64
        with pytest.raises(laminae.CorruptLayer):
            store.apply_layer(io.BytesIO(data), **{which: wrong})  # type: ignore[arg-type]
        assert store.layers() == []
        report = store.check()
        assert report.ok, report.problems()

    def test_bare_whiteout_name_is_refused(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        """image-spec: a bare ``.wh.`` is invalid (opencontainers/image-spec#1314)."""
        with pytest.raises(laminae.InvalidArgument, match=r"\.wh\."):
            apply(store, tar().dir("d").file("d/.wh.", b""))
        assert store.layers() == []
        assert store.check().ok

    @pytest.mark.laminae_requires(laminae.Feature.APPLY_DETACHED)
    def test_detached_apply_equals_sequential(
        self,
        store: laminae.Store,
        tar: type[LayerTar],
        scratch: Path,
        driver_entry: laminae.DriverEntry,
    ) -> None:
        """Three layers written side by side (``apply_detached`` in threads) and settled base
        first hold what the same tars applied one after the other hold, read through real
        mounts; a layer that needs its parents falls back to ``apply``."""
        tars = [
            tar()
            .dir("etc")
            .file("etc/gone", b"g")
            .dir("opt")
            .file("opt/old", b"o")
            .dir("tmp", mode=0o1777, mtime_ns=MTIME_NS, xattrs={"user.k": b"lower"})
            .file("f", b"shared")
            .build(),
            tar()
            .dir("etc")
            .whiteout("etc/gone")
            .whiteout("etc/never-there")
            .dir("opt")
            .opaque("opt")
            .file("opt/new", b"n")
            .file("tmp/cache/file", b"made parents")
            .dir("srv")
            .opaque("srv")
            .file("srv/a", b"a")
            .dir("new")
            .whiteout("new/ghost")  # in a directory no parent has: nothing to hide
            .build(),
            tar().hardlink("again", "f").whiteout("opt/new").whiteout("tmp").build(),
        ]
        sequential: list[laminae.Layer] = []
        for data in tars:
            parent = sequential[-1] if sequential else None
            sequential.append(apply(store, data, parent))

        home = scratch / "detached"
        driver_entry.cls.probe(home, {})
        driver: driverkit.Driver = driver_entry.cls(home, {})
        assert isinstance(driver, driverkit.DetachedApplier)
        assert isinstance(driver, driverkit.Applier)
        ids = [f"{n:02x}" * 8 for n in range(len(tars))]
        chains = [list(reversed(ids[:n])) for n in range(len(ids))]
        try:
            for id, parents in zip(ids, chains, strict=True):
                driver.create(id, parents, True)

            def detached(n: int) -> object:
                try:
                    return driver.apply_detached(ids[n], io.BytesIO(tars[n]), laminae.Limits())
                except driverkit.ParentsNeeded as exc:
                    return exc

            with concurrent.futures.ThreadPoolExecutor(max_workers=len(tars)) as pool:
                pending = list(pool.map(detached, range(len(tars))))
            for n, (id, parents) in enumerate(zip(ids, chains, strict=True)):
                state = pending[n]
                if not isinstance(state, driverkit.ParentsNeeded):
                    try:
                        driver.settle(id, parents, state)
                        continue
                    except driverkit.ParentsNeeded:
                        pass
                driver.remove(id)
                driver.create(id, parents, True)
                driver.apply(id, parents, io.BytesIO(tars[n]), laminae.Limits())

            for n, (id, parents) in enumerate(zip(ids, chains, strict=True)):
                target = scratch / "mnt"
                mount_all(driver.mounts(id, parents, readonly=True), target)
                try:
                    with mounted(store, sequential[n].id, readonly=True) as want:
                        assert_same_tree(want, target, mtimes=True, what=f"detached layer {n}")
                        assert hardlink_groups(target) == hardlink_groups(want)
                finally:
                    unmount_all(target)
        finally:
            for id in reversed(ids):
                with contextlib.suppress(laminae.NotFound):
                    driver.remove(id)
            driver.close()
