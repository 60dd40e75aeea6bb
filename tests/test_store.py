"""The store: graph bookkeeping, content addressing, incomplete marks, mounts, check/repair."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tarbuild import make_tar

import laminae
from laminae.kernel import _mountinfo, _mounts
from laminae.store._graph import Graph, LayerRow, now


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[laminae.Store]:
    with laminae.open_store(tmp_path / "root", runroot=tmp_path / "run", driver="vfs") as s:
        yield s
        for layer in s.layers():
            if layer.mount_count:
                s.unmount(layer.id, force=True)


def test_chain_id_follows_the_image_spec() -> None:
    a, b = digest(b"a"), digest(b"b")
    assert laminae.chain_id([a]) == a
    assert laminae.chain_id([a, b]) == digest(f"{a} {b}".encode())
    with pytest.raises(laminae.InvalidArgument, match="not-a-digest"):
        laminae.chain_id([a, "not-a-digest"])


def test_applied_layer_is_addressed_by_its_chain_id(store: laminae.Store) -> None:
    base_tar = make_tar({"etc/hostname": b"box\n"}, dirs=("etc",))
    top_tar = make_tar({"etc/motd": b"hi\n"})
    base = store.apply_layer(io.BytesIO(base_tar), names=["base"])
    top = store.apply_layer(io.BytesIO(top_tar), parent="base")
    assert base.id == base.diff_id == digest(base_tar)
    assert base.kind is laminae.LayerKind.COMMITTED
    assert top.id == laminae.chain_id([digest(base_tar), digest(top_tar)])
    assert top.parent == base.id and top.depth == 1
    assert store.layer("base") == store.layer(base.id)
    assert store.layer(base.id.removeprefix("sha256:")[:12]).id == base.id


def test_same_layer_applied_twice_is_stored_once(store: laminae.Store) -> None:
    data = make_tar({"a": b"1"})
    first = store.apply_layer(io.BytesIO(data))
    again = store.apply_layer(io.BytesIO(data), names=["again"], labels={"k": "v"})
    assert again.id == first.id
    assert again.names == ("again",) and dict(again.labels) == {"k": "v"}
    assert len(store.layers()) == 1
    assert list(store.driver.layers()) == [first.storage_id]


def test_compressed_tar_keeps_both_digests(store: laminae.Store, tmp_path: Path) -> None:
    data = make_tar({"a": b"1" * 1000})
    path = tmp_path / "layer.tar.gz"
    with path.open("wb") as out:
        subprocess.run(["gzip", "-c"], input=data, stdout=out, check=True)
    layer = store.apply_layer(path, digest=digest(path.read_bytes()))
    assert layer.diff_id == digest(data)
    assert layer.digest == digest(path.read_bytes())


def test_wrong_diff_id_leaves_nothing(store: laminae.Store) -> None:
    wrong = digest(b"something else")
    with pytest.raises(laminae.CorruptLayer, match="DiffID"):
        store.apply_layer(io.BytesIO(make_tar({"a": b"1"})), diff_id=wrong)
    assert store.layers() == []
    assert list(store.driver.layers()) == []
    assert store.check().ok


def test_malformed_tar_is_refused_naming_it(store: laminae.Store) -> None:
    with pytest.raises(laminae.InvalidArgument, match="tar"):
        store.apply_layer(io.BytesIO(b"this is not a tar archive" * 40))
    assert store.layers() == [] and list(store.driver.layers()) == []


def test_bad_references_and_keys(store: laminae.Store) -> None:
    with pytest.raises(laminae.NotFound, match="nope"):
        store.layer("nope")
    with pytest.raises(laminae.InvalidArgument, match="layer key"):
        store.create_layer("bad\nkey")
    with pytest.raises(laminae.InvalidArgument, match="reserved"):
        store.create_layer("sha256:" + "0" * 64)
    with pytest.raises(laminae.InvalidArgument, match=r"diff_id .md5:abc."):
        store.apply_layer(io.BytesIO(make_tar({})), diff_id="md5:abc")
    store.create_layer("k1")
    with pytest.raises(laminae.AlreadyExists, match="k1"):
        store.create_layer("k1")


def test_only_committed_layers_have_children(store: laminae.Store) -> None:
    store.create_layer("active")
    with pytest.raises(laminae.FailedPrecondition, match="committed"):
        store.create_layer("child", parent="active")


def test_removal_refused_with_children(store: laminae.Store) -> None:
    base = store.apply_layer(io.BytesIO(make_tar({"a": b"1"})))
    store.create_layer("child", parent=base.id)
    with pytest.raises(laminae.FailedPrecondition, match="child"):
        store.remove_layer(base.id)
    store.remove_layer("child")
    store.remove_layer(base.id)
    assert store.layers() == [] and list(store.driver.layers()) == []


def test_labels_are_replaced_and_names_unique(store: laminae.Store) -> None:
    layer = store.create_layer("a", labels={"x": "1", "y": "2"})
    assert dict(store.set_labels("a", {"z": "3"}).labels) == {"z": "3"}
    with pytest.raises(laminae.InvalidArgument, match="exceed"):
        store.set_labels("a", {"big": "v" * 5000})
    base = store.apply_layer(io.BytesIO(make_tar({})), names=["n1"])
    with pytest.raises(laminae.AlreadyExists, match="n1"):
        store.add_names(layer.id, ["n1"])
    assert store.remove_names(base.id, ["n1"]).names == ()


def test_depth_beyond_the_driver_maximum_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with laminae.open_store(tmp_path / "r", runroot=tmp_path / "run", driver="vfs") as store:
        # The driver declares a shallow maximum (and nothing else) from now on.
        shallow = laminae.Capabilities(max_depth=2)
        monkeypatch.setattr(type(store.driver), "capabilities", shallow)
        parent = None
        for i in range(3):
            parent = store.apply_layer(io.BytesIO(make_tar({f"f{i}": b"x"})), parent).id
        with pytest.raises(laminae.FailedPrecondition, match="at most 2"):
            store.apply_layer(io.BytesIO(make_tar({"g": b"x"})), parent)


def test_a_store_remembers_its_driver(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with laminae.open_store(root, runroot=tmp_path / "run", driver="vfs"):
        pass
    with laminae.open_store(root, runroot=tmp_path / "run") as again:
        assert again.driver_name == "vfs"
    with pytest.raises(laminae.FailedPrecondition, match="made by driver 'vfs'"):
        laminae.open_store(root, runroot=tmp_path / "run", driver="overlay")
    with pytest.raises(laminae.InvalidArgument, match="nosuch"):
        laminae.open_store(tmp_path / "other", runroot=tmp_path / "run", driver="nosuch")


def test_incomplete_leftovers_are_removed_on_open(tmp_path: Path) -> None:
    root, run = tmp_path / "root", tmp_path / "run"
    with laminae.open_store(root, runroot=run, driver="vfs") as store:
        store.driver.create("deadbeef" * 4, [], True)
    graph = Graph(root / "graph.db")
    with graph.transaction():
        graph.insert_layer(
            LayerRow(
                "incomplete-x",
                "deadbeef" * 4,
                None,
                "active",
                0,
                None,
                None,
                None,
                now(),
                now(),
                True,
                0,
                None,
            )
        )
    graph.close()
    with laminae.open_store(root, runroot=run) as store:
        assert store.layers() == []
        assert list(store.driver.layers()) == []
        assert store.check().ok


def test_check_finds_and_repair_fixes_orphans(store: laminae.Store) -> None:
    layer = store.apply_layer(io.BytesIO(make_tar({"a": b"1"})), names=["named"])
    store.driver.create("feedface" * 4, [], True)  # storage no layer owns
    report = store.check()
    assert report.orphan_storage == ("feedface" * 4,)
    assert not report.ok and "orphan storage" in report.problems()[0]
    # Storage the graph does not know may be what a lost graph knew: kept unless forced.
    kept = store.repair(report)
    assert kept.orphan_storage == ()
    assert kept.kept == (f"orphan storage {'feedface' * 4}: owned by no layer; --force removes it",)
    assert store.check().orphan_storage == ("feedface" * 4,)
    fixed = store.repair(force=True)
    assert fixed.orphan_storage == ("feedface" * 4,)
    assert store.check().ok
    assert store.layer(layer.id).id == layer.id


def test_missing_storage_is_repaired_by_dropping_the_layer(store: laminae.Store) -> None:
    base = store.apply_layer(io.BytesIO(make_tar({"a": b"1"})))
    store.create_layer("above", parent=base.id)
    store.driver.remove(base.storage_id)
    report = store.check()
    assert report.missing_storage == (base.id,)
    store.repair(report)
    assert store.layers() == []
    assert store.check().ok


@pytest.mark.root
def test_mounts_are_counted_and_reconciled(store: laminae.Store) -> None:
    store.create_layer("c")
    path = store.mount("c")
    assert str(path) in _mountinfo.mount_points()
    (path / "file").write_text("x")
    assert store.mount("c") == path
    assert store.layer("c").mount_count == 2
    with pytest.raises(laminae.FailedPrecondition, match="mounted"):
        store.remove_layer("c")
    store.unmount("c")
    assert str(path) in _mountinfo.mount_points()
    store.unmount("c")
    assert str(path) not in _mountinfo.mount_points()
    with pytest.raises(laminae.FailedPrecondition, match="not mounted"):
        store.unmount("c")
    # Unmounted behind the store's back: the count is found stale, then reset.
    store.mount("c")
    _mounts.umount(str(path), _mounts.MNT_DETACH)
    assert store.check().stale_counts == ("c",)
    store.repair()
    assert store.layer("c").mount_count == 0


@pytest.mark.root
def test_committed_layers_mount_read_only(store: laminae.Store) -> None:
    layer = store.apply_layer(io.BytesIO(make_tar({"a": b"1"})))
    path = store.mount(layer.id)
    try:
        assert (path / "a").read_bytes() == b"1"
        with pytest.raises(OSError) as info:
            (path / "b").write_text("x")
        assert info.value.errno == 30  # EROFS
    finally:
        store.unmount(layer.id)


@pytest.mark.root
def test_commit_gives_the_chain_id_of_the_diff(store: laminae.Store) -> None:
    base = store.apply_layer(io.BytesIO(make_tar({"keep": b"1", "gone": b"2"})))
    store.create_layer("work", parent=base.id)
    path = store.mount("work")
    (path / "new").write_bytes(b"3")
    os.unlink(path / "gone")
    store.unmount("work")
    changes = {(c.path, c.kind) for c in store.changes("work")}
    assert changes == {("/new", laminae.ChangeKind.ADDED), ("/gone", laminae.ChangeKind.DELETED)}
    out = io.BytesIO()
    diff = store.diff("work", out)
    top = store.commit_layer("work", names=["top"])
    assert top.diff_id == diff.diff_id == digest(out.getvalue())
    assert top.id == laminae.chain_id([base.id, diff.diff_id])
    with pytest.raises(laminae.NotFound):
        store.layer("work")
    # The diff applied onto the base elsewhere gives the same layer.
    with laminae.open_store(
        store.root.parent / "r2", runroot=store.runroot.parent / "run2", driver="vfs"
    ) as other:
        b2 = other.apply_layer(io.BytesIO(make_tar({"keep": b"1", "gone": b"2"})))
        t2 = other.apply_layer(io.BytesIO(out.getvalue()), b2.id)
        assert t2.id == top.id


def test_images_and_containers(store: laminae.Store) -> None:
    base = store.apply_layer(io.BytesIO(make_tar({"a": b"1"})))
    config = b'{"rootfs":{"type":"layers"}}'
    image = store.create_image(base.id, names=["example:latest"], config=config)
    assert image.id == digest(config)
    assert store.image("example:latest") == image
    container = store.create_container("example:latest", name="web")
    assert store.layer(container.layer).parent == base.id
    with pytest.raises(laminae.FailedPrecondition):
        store.remove_layer(base.id)
    with pytest.raises(laminae.FailedPrecondition, match="container"):
        store.remove_image(image.id)
    store.remove_container("web")
    # The image's layers go with it, as nothing else holds them.
    assert store.remove_image(image.id) == [base.id]
    assert store.containers() == [] and store.images() == [] and store.layers() == []


@pytest.mark.root
def test_mounts_a_crash_left_behind_are_found_and_removed(tmp_path: Path) -> None:
    root, run = tmp_path / "root", tmp_path / "run"
    with laminae.open_store(root, runroot=run, driver="vfs") as store:
        layer = store.create_layer("c")
        # What a process killed mid-operation leaves: a temporary mount whose owner is gone,
        # and a layer mount the graph never counted.
        for target in (run / "tmp" / "0123abcd", run / "mounts" / layer.storage_id):
            target.mkdir(parents=True)
            _mounts.bind_mount(str(store.driver_home), str(target))
        # The dead process's claim names the store, as every claim on a mount does.
        (run / "tmp" / "0123abcd.lock").write_text(store._graph.store_id)
        report = store.check()
        assert set(report.orphan_mounts) == {
            str(run / "tmp" / "0123abcd"),
            str(run / "mounts" / layer.storage_id),
        }
    with laminae.open_store(root, runroot=run) as store:
        assert store.check().ok
        points = _mountinfo.mount_points()
        assert not [p for p in points if p.startswith(str(run))]


def test_check_finds_and_repair_removes_tar_split_records_of_gone_layers(
    store: laminae.Store,
) -> None:
    layer = store.apply_layer(io.BytesIO(make_tar({"a": b"1"})))
    records = store.root / "tar-split"
    assert (records / f"{layer.storage_id}.tsz").exists()
    # What a crash between removing a layer and its record leaves.
    (records / "feedfacefeedfacefeedfacefeedface.tsz").write_bytes(b"left over")
    report = store.check()
    assert report.orphan_records == ("feedfacefeedfacefeedfacefeedface",)
    assert "tar-split record feedface" in report.problems()[0]
    assert store.repair().orphan_records == ("feedfacefeedfacefeedfacefeedface",)
    assert store.check().ok
    assert (records / f"{layer.storage_id}.tsz").exists()
