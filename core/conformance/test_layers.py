"""Layers: create, stat, commit, remove and list them (the lifecycle cases of Moby's and
containers/storage's graphtest and of containerd's snapshotter suite), and bad input to the
layer API."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import laminae
from laminae import LayerKind
from laminae.conformance._fixtures import StoreFactory
from laminae.conformance._layers import apply, commit_written, mounted
from laminae.conformance._tars import LayerTar
from laminae.conformance._tree import assert_same_tree, snapshot


def write_base(root: Path) -> None:
    """graphtest's ``createBase``: a sticky 0705 dir owned 1:2, a setuid 0222 file."""
    subdir = root / "a subdir"
    subdir.mkdir()
    os.chown(subdir, 1, 2)
    os.chmod(subdir, 0o705 | stat.S_ISVTX)
    file = root / "a file"
    file.write_bytes(b"Some data")
    os.chmod(file, 0o222 | stat.S_ISUID)


def verify_base(root: Path) -> None:
    """graphtest's ``verifyBase``: exactly the two entries, with their modes and owners."""
    assert sorted(os.listdir(root)) == ["a file", "a subdir"]
    subdir = os.lstat(root / "a subdir")
    assert stat.S_ISDIR(subdir.st_mode)
    assert stat.S_IMODE(subdir.st_mode) == 0o705 | stat.S_ISVTX, oct(subdir.st_mode)
    assert (subdir.st_uid, subdir.st_gid) == (1, 2)
    file = os.lstat(root / "a file")
    assert stat.S_ISREG(file.st_mode)
    assert stat.S_IMODE(file.st_mode) == 0o222 | stat.S_ISUID, oct(file.st_mode)
    assert (root / "a file").read_bytes() == b"Some data"


def twenty_files(prefix: str) -> LayerTar:
    layer = LayerTar().dir(prefix)
    for number in range(20):
        layer.file(f"{prefix}/file-{number}", f"{prefix} {number}\n".encode())
    return layer


@pytest.mark.laminae_area("layers")
class TestLayers:
    def test_create_empty(self, store: laminae.Store) -> None:
        layer = store.create_layer("empty")
        assert (layer.id, layer.kind, layer.parent, layer.depth) == (
            "empty",
            LayerKind.ACTIVE,
            None,
            0,
        )
        with mounted(store, "empty") as root:
            st = os.lstat(root)
            assert stat.S_ISDIR(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o755, f"root of an empty layer: {oct(st.st_mode)}"
            assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
            assert os.listdir(root) == []
        store.remove_layer("empty")
        assert store.layers() == []
        with pytest.raises(laminae.NotFound):
            store.layer("empty")

    def test_root_permission(self, store: laminae.Store) -> None:
        """containerd RootPermission: a fresh base layer's root is 0755."""
        layer = store.create_layer()
        with mounted(store, layer.id) as root:
            assert stat.S_IMODE(os.lstat(root).st_mode) == 0o755

    def test_create_base(self, store: laminae.Store) -> None:
        base = commit_written(store, None, write_base)
        view = store.create_layer("view", parent=base.id, view=True)
        with mounted(store, view.id) as root:
            verify_base(root)
        with mounted(store, base.id) as root:
            verify_base(root)

    def test_create_snap(self, store: laminae.Store) -> None:
        base = commit_written(store, None, write_base)
        snap = store.create_layer("snap", parent=base.id)
        assert snap.parent == base.id and snap.depth == 1
        with mounted(store, snap.id) as root:
            verify_base(root)

    def test_create_from_template(self, store: laminae.Store) -> None:
        """graphtest CreateFromTemplate: a writable and a read-only layer on one parent."""
        base = commit_written(store, None, write_base)
        snap = commit_written(
            store, base, lambda root: (root / "testfile.txt").write_bytes(b"test")
        )
        assert store.changes(snap.id) == [laminae.Change("/testfile.txt", laminae.ChangeKind.ADDED)]
        for key, view in (("from-template-rw", False), ("from-template-ro", True)):
            layer = store.create_layer(key, parent=snap.id, view=view)
            with mounted(store, layer.id) as root:
                assert set(os.listdir(root)) == {"a file", "a subdir", "testfile.txt"}
                assert (root / "testfile.txt").read_bytes() == b"test"
            assert store.changes(layer.id) == []

    def test_stat_active(self, store: laminae.Store) -> None:
        store.create_layer("prepare-stat")
        layer = store.layer("prepare-stat")
        assert (layer.id, layer.kind, layer.parent) == ("prepare-stat", LayerKind.ACTIVE, None)
        assert layer.diff_id is None

    def test_stat_committed(self, store: laminae.Store) -> None:
        store.create_layer("prepare-stat")
        committed = store.commit_layer("prepare-stat")
        layer = store.layer(committed.id)
        assert layer.kind is LayerKind.COMMITTED and layer.parent is None
        assert layer.id.startswith("sha256:") and layer.id == layer.diff_id
        with pytest.raises(laminae.NotFound):
            store.layer("prepare-stat")

    def test_transitivity(self, store: laminae.Store) -> None:
        a = commit_written(store, None, lambda root: (root / "a").write_bytes(b"a"))
        b = commit_written(store, a, lambda root: (root / "b").write_bytes(b"b"))
        assert b.parent == a.id
        assert store.layer(b.parent).parent is None
        assert b.depth == 1 and a.depth == 0

    @pytest.mark.parametrize(
        ("first_view", "second_view"),
        [(False, False), (False, True), (True, False), (True, True)],
        ids=["active-then-active", "active-then-view", "view-then-active", "view-then-view"],
    )
    def test_key_in_use_is_refused(
        self, store: laminae.Store, first_view: bool, second_view: bool
    ) -> None:
        """containerd PreareViewFailingtest: a key names one layer at a time."""
        base = commit_written(store, None, lambda root: (root / "f").write_bytes(b"f"))
        store.create_layer("taken", parent=base.id, view=first_view)
        with pytest.raises(laminae.AlreadyExists, match="taken"):
            store.create_layer("taken", parent=base.id, view=second_view)
        assert [layer.id for layer in store.layers()] == [base.id, "taken"]

    def test_remove_then_reuse_key(self, store: laminae.Store) -> None:
        """containerd Remove: a removed key can be used again, as another kind."""
        base = commit_written(store, None, lambda root: (root / "f").write_bytes(b"f"))
        store.create_layer("reused", parent=base.id)
        store.remove_layer("reused")
        assert store.create_layer("reused", parent=base.id, view=True).kind is LayerKind.VIEW
        store.remove_layer("reused")
        assert store.create_layer("reused").kind is LayerKind.ACTIVE

    def test_remove_then_commit_same_content_again(self, store: laminae.Store) -> None:
        """A committed layer removed can be committed again with the same id."""

        def write(root: Path) -> None:
            (root / "f").write_bytes(b"same")
            os.utime(root / "f", ns=(1_700_000_000_000_000_000,) * 2)  # ids hash mtimes too

        first = commit_written(store, None, write)
        store.remove_layer(first.id)
        assert store.layers() == []
        again = commit_written(store, None, write)
        assert again.id == first.id
        with mounted(store, again.id) as root:
            assert (root / "f").read_bytes() == b"same"

    def test_remove_intermediate_is_refused(self, store: laminae.Store) -> None:
        """containerd RemoveIntermediateSnapshot: only a layer without children goes."""
        base = commit_written(store, None, lambda root: (root / "a").write_bytes(b"a"))
        inter = commit_written(store, base, lambda root: (root / "b").write_bytes(b"b"))
        top = store.create_layer("top", parent=inter.id)
        for ref in (base.id, inter.id):
            with pytest.raises(laminae.FailedPrecondition, match="remove"):
                store.remove_layer(ref)
        assert len(store.layers()) == 3
        for ref in (top.id, inter.id, base.id):
            store.remove_layer(ref)
        assert store.layers() == []

    def test_remove_mounted_is_refused(self, store: laminae.Store) -> None:
        layer = store.create_layer("mounted")
        store.mount(layer.id)
        try:
            with pytest.raises(laminae.FailedPrecondition, match="mounted"):
                store.remove_layer(layer.id)
        finally:
            store.unmount(layer.id)
        store.remove_layer(layer.id)
        assert store.layers() == []

    def test_remove_leaves_no_storage(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        """What none of the peers checks: removing every layer leaves nothing of them."""
        base = apply(store, tar().dir("etc").file("etc/a", b"a"))
        top = apply(store, tar().file("etc/b", b"b"), base)
        active = store.create_layer(parent=top.id)
        view = store.create_layer(parent=top.id, view=True)
        storage_ids = {layer.storage_id for layer in (base, top, active, view)}
        for layer in (active, view, top, base):
            store.remove_layer(layer.id)
        assert store.layers() == []
        report = store.check()
        assert report.ok, report.problems()
        leftovers = [
            os.path.join(dirpath, name)
            for dirpath, dirnames, filenames in os.walk(store.root)
            for name in dirnames + filenames
            if any(sid in name for sid in storage_ids)
        ]
        assert leftovers == [], f"removed layers left files behind: {leftovers}"

    def test_basic(self, store: laminae.Store, scratch: Path) -> None:
        """containerd Basic: prepare, commit, child, commit, stat, walk, view, remove."""
        flat = scratch / "flat"
        flat.mkdir()

        def first(root: Path) -> None:
            (root / "foo").write_bytes(b"foo\n")
            os.chmod(root / "foo", 0o777)
            for path in ("a", "a/b", "a/b/c"):
                (root / path).mkdir()
                os.chmod(root / path, 0o755)

        def second(root: Path) -> None:
            (root / "bar").write_bytes(b"bar\n")
            (root / "foo").write_bytes(b"foo1\n")
            for path in ("a/b/c", "a/b"):
                os.rmdir(root / path)

        store.create_layer("preparing", labels={"suite": "basic"})
        with mounted(store, "preparing") as root:
            first(root)
        first(flat)
        committed = store.commit_layer("preparing", labels={"suite": "basic"})
        assert store.layer(committed.id).kind is LayerKind.COMMITTED
        with pytest.raises(laminae.NotFound):
            store.layer("preparing")

        store.create_layer("next-preparing", parent=committed.id)
        with mounted(store, "next-preparing") as root:
            assert_same_tree(flat, root, what="child before any change")
            second(root)
        second(flat)
        next_committed = store.commit_layer("next-preparing")
        assert store.layer(next_committed.id).parent == committed.id
        assert store.layer(next_committed.id).kind is LayerKind.COMMITTED
        with pytest.raises(laminae.NotFound):
            store.layer("next-preparing")
        assert {layer.id for layer in store.layers()} == {committed.id, next_committed.id}

        view = store.create_layer("view", parent=next_committed.id, view=True)
        with mounted(store, view.id) as root:
            assert_same_tree(flat, root, what="view of the top")
        with pytest.raises(laminae.FailedPrecondition, match="remove"):
            store.remove_layer(committed.id)
        for ref in (view.id, next_committed.id, committed.id):
            store.remove_layer(ref)
        assert store.layers() == []

    def test_list_layers(self, store: laminae.Store) -> None:
        """graphtest ListLayers: exactly the layers made, 20 files each."""
        base = apply(store, twenty_files("base"))
        mid = apply(store, twenty_files("mid"), base)
        upper = apply(store, twenty_files("upper"), mid)
        assert [layer.id for layer in store.layers()] == [base.id, mid.id, upper.id]
        with mounted(store, upper.id) as root:
            assert len(snapshot(root)) == 1 + 3 * 21

    def test_close_twice(self, make_store: StoreFactory) -> None:
        store = make_store()
        store.create_layer("before-close")
        store.close()
        store.close()
        with pytest.raises(laminae.FailedPrecondition):
            store.layers()
        reopened = make_store()
        assert [layer.id for layer in reopened.layers()] == ["before-close"]

    def test_unknown_ref_is_not_found(self, store: laminae.Store) -> None:
        unknown = "sha256:" + "0" * 64
        for call in (
            lambda: store.layer(unknown),
            lambda: store.layer("no-such-layer"),
            lambda: store.remove_layer(unknown),
            lambda: store.mount("no-such-layer"),
            lambda: store.commit_layer("no-such-layer"),
            lambda: store.create_layer("child", parent=unknown),
            lambda: store.changes("no-such-layer"),
        ):
            with pytest.raises(laminae.NotFound):
                call()
        assert store.layers() == []

    @pytest.mark.parametrize(
        "key",
        ["", " padded ", "new\nline", "nul\x00byte", "x" * 257, "sha256:" + "a" * 64],
        ids=["empty", "padded", "newline", "nul", "too-long", "sha256-reserved"],
    )
    def test_bad_key_is_invalid_argument(self, store: laminae.Store, key: str) -> None:
        with pytest.raises(laminae.InvalidArgument) as caught:
            store.create_layer(key)
        assert repr(key)[:40] in str(caught.value) or "layer key" in str(caught.value)
        assert store.layers() == []
        assert store.check().ok

    def test_parent_must_be_committed(self, store: laminae.Store) -> None:
        store.create_layer("active-parent")
        with pytest.raises(laminae.FailedPrecondition, match="active-parent"):
            store.create_layer("child", parent="active-parent")
        assert [layer.id for layer in store.layers()] == ["active-parent"]

    def test_commit_refuses_what_is_not_active(self, store: laminae.Store) -> None:
        base = commit_written(store, None, lambda root: (root / "f").write_bytes(b"f"))
        store.create_layer("a-view", parent=base.id, view=True)
        for ref in (base.id, "a-view"):
            with pytest.raises(laminae.FailedPrecondition):
                store.commit_layer(ref)

    def test_commit_mounted_is_refused(self, store: laminae.Store) -> None:
        store.create_layer("busy")
        with mounted(store, "busy"), pytest.raises(laminae.FailedPrecondition, match="mounted"):
            store.commit_layer("busy")
        assert store.commit_layer("busy").kind is LayerKind.COMMITTED

    def test_usage(self, store: laminae.Store) -> None:
        """Usage counts what a layer holds itself, its parent excluded."""
        size = 1 << 20
        base = commit_written(store, None, lambda root: (root / "big").write_bytes(b"x" * size))
        child = store.create_layer("child", parent=base.id)
        with mounted(store, child.id) as root:
            (root / "small").write_bytes(b"y" * 1000)
            (root / "dir").mkdir()
        base_usage = store.usage(base.id)
        assert base_usage.size >= size and base_usage.inodes >= 2, base_usage
        child_usage = store.usage(child.id)
        assert child_usage.size >= 1000 and child_usage.inodes >= 3, child_usage

    def test_set_quota(self, store: laminae.Store, capabilities: laminae.Capabilities) -> None:
        """graphtest SetQuota: 25 MiB fit under a 50 MiB quota, 50 MiB more do not. A driver
        without quota support refuses to set one (``Unsupported``), whatever the layer."""
        layer = store.create_layer("quota")
        if laminae.Feature.QUOTA not in capabilities.features:
            with pytest.raises(laminae.Unsupported):
                store.set_quota(layer.id, 50 << 20)
            return
        store.set_quota(layer.id, 50 << 20)
        chunk = b"\0" * (1 << 20)
        with mounted(store, layer.id) as root:
            with open(root / "fits", "wb") as file:
                for _ in range(25):
                    file.write(chunk)
            with pytest.raises(OSError) as caught, open(root / "too-much", "wb") as file:
                for _ in range(50):
                    file.write(chunk)
                    file.flush()
                    os.fsync(file.fileno())
            assert caught.value.errno in (28, 122), caught.value  # ENOSPC, EDQUOT
