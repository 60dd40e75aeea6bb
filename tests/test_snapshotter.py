"""The containerd snapshotter: every call of the Snapshots service over a real unix socket,
on vfs and overlay, with the error codes containerd's errdefs expects; and containerd 1.6
itself (tests/test_snapshotter_containerd.py) importing, running and removing an image through
it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")

from google.protobuf import field_mask_pb2  # noqa: E402

import laminae  # noqa: E402
from laminae.snapshotter._filters import parse_filter  # noqa: E402
from laminae.snapshotter._proto import snapshots_pb2 as pb  # noqa: E402
from laminae.snapshotter._proto import snapshots_pb2_grpc  # noqa: E402
from laminae.snapshotter._server import start_server  # noqa: E402

pytestmark = pytest.mark.root

HELLO = Path(__file__).parent.parent / "examples" / "images" / "hello-layer.tar.gz"


class Client:
    """The service's stub, with the calls the tests make spelled short."""

    def __init__(self, stub: snapshots_pb2_grpc.SnapshotsStub, store: laminae.Store) -> None:
        self.stub = stub
        self.store = store

    def prepare(self, key: str, parent: str = "", **labels: str) -> list[object]:
        request = pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels)
        return list(self.stub.Prepare(request).mounts)

    def view(self, key: str, parent: str = "") -> list[object]:
        return list(self.stub.View(pb.ViewSnapshotRequest(key=key, parent=parent)).mounts)

    def commit(self, name: str, key: str, **labels: str) -> None:
        self.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels))

    def stat(self, key: str) -> pb.Info:
        return self.stub.Stat(pb.StatSnapshotRequest(key=key)).info

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(key=key))

    def names(self, *filters: str) -> list[str]:
        replies = self.stub.List(pb.ListSnapshotsRequest(filters=filters))
        return sorted(info.name for reply in replies for info in reply.info)

    def code(self, call: object, request: object) -> object:
        with pytest.raises(grpc.RpcError) as caught:
            result = call(request)  # type: ignore[operator]
            if hasattr(result, "__iter__"):
                list(result)
        return caught.value.code()


@pytest.fixture(params=["vfs", "overlay"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Client]:
    with (
        laminae.open_store(
            tmp_path / "root", runroot=tmp_path / "run", driver=request.param
        ) as store,
        start_server(store, tmp_path / "snapshotter.sock") as _,
        grpc.insecure_channel(f"unix://{tmp_path}/snapshotter.sock") as channel,
    ):
        yield Client(snapshots_pb2_grpc.SnapshotsStub(channel), store)


def test_prepare_commit_view_and_mounts_describe_the_layers(client: Client) -> None:
    (base,) = client.prepare("base-work")
    assert base.type == "bind" and "rbind" in base.options and "ro" not in base.options
    client.commit("base", "base-work", role="base")
    mounts = client.prepare("top", "base")
    if client.store.driver_name == "overlay":
        (overlay,) = mounts
        options = {o.split("=")[0]: o for o in overlay.options}
        assert overlay.type == "overlay"
        assert {"lowerdir", "upperdir", "workdir"} <= set(options)
    else:
        assert [m.type for m in mounts] == ["bind"]
    (view,) = client.view("look", "base")
    assert view.type == "bind" and {"ro", "rbind"} <= set(view.options)
    assert [m.type for m in client.stub.Mounts(pb.MountsRequest(key="top")).mounts] == [
        m.type for m in mounts
    ]
    info = client.stat("top")
    assert (info.name, info.parent, info.kind) == ("top", "base", pb.ACTIVE)
    assert info.created_at == info.updated_at
    base_info = client.stat("base")
    assert base_info.kind == pb.COMMITTED and dict(base_info.labels) == {"role": "base"}
    assert client.stat("look").kind == pb.VIEW
    usage = client.stub.Usage(pb.UsageRequest(key="top"))
    assert usage.inodes >= 1


def test_errors_have_the_codes_containerd_expects(client: Client) -> None:
    stub, code = client.stub, grpc.StatusCode
    client.prepare("work")
    client.commit("base", "work")
    client.prepare("active", "base")
    client.view("view", "base")
    assert client.code(stub.Stat, pb.StatSnapshotRequest(key="nope")) == code.NOT_FOUND
    assert client.code(stub.Usage, pb.UsageRequest(key="nope")) == code.NOT_FOUND
    assert client.code(stub.Remove, pb.RemoveSnapshotRequest(key="nope")) == code.NOT_FOUND
    assert (
        client.code(stub.Prepare, pb.PrepareSnapshotRequest(key="x", parent="nope"))
        == code.NOT_FOUND
    )
    assert client.code(stub.Prepare, pb.PrepareSnapshotRequest(key="active")) == code.ALREADY_EXISTS
    assert (
        client.code(stub.Prepare, pb.PrepareSnapshotRequest(key="x", parent="active"))
        == code.INVALID_ARGUMENT
    )
    assert client.code(stub.Prepare, pb.PrepareSnapshotRequest(key="")) == code.INVALID_ARGUMENT
    assert (
        client.code(stub.Commit, pb.CommitSnapshotRequest(name="c", key="view"))
        == code.FAILED_PRECONDITION
    )
    assert (
        client.code(stub.Commit, pb.CommitSnapshotRequest(name="base", key="active"))
        == code.ALREADY_EXISTS
    )
    assert (
        client.code(stub.Commit, pb.CommitSnapshotRequest(name="c", key="nope")) == code.NOT_FOUND
    )
    assert client.code(stub.Mounts, pb.MountsRequest(key="base")) == code.FAILED_PRECONDITION
    assert (
        client.code(stub.Remove, pb.RemoveSnapshotRequest(key="base")) == code.FAILED_PRECONDITION
    )
    immutable = pb.UpdateSnapshotRequest(
        info=pb.Info(name="active", parent="other"),
        update_mask=field_mask_pb2.FieldMask(paths=["parent"]),
    )
    assert client.code(stub.Update, immutable) == code.INVALID_ARGUMENT
    assert (
        client.code(stub.List, pb.ListSnapshotsRequest(filters=["kind=="])) == code.INVALID_ARGUMENT
    )
    # Nothing the refused calls touched changed.
    assert client.names() == ["active", "base", "view"]


def test_update_sets_labels_by_field_mask(client: Client) -> None:
    client.prepare("s", l1="v1", l2="v2", l3="v3")
    before = client.stat("s")

    def update(labels: dict[str, str], *paths: str) -> dict[str, str]:
        request = pb.UpdateSnapshotRequest(
            info=pb.Info(name="s", labels=labels),
            update_mask=field_mask_pb2.FieldMask(paths=list(paths)) if paths else None,
        )
        return dict(client.stub.Update(request).info.labels)

    # labels.<key>: set from the request, or removed when the request has none; others kept.
    assert update({"l1": "new", "l3": "ignored"}, "labels.l1", "labels.l2") == {
        "l1": "new",
        "l3": "v3",
    }
    assert update({"only": "this"}) == {"only": "this"}
    assert update({"a": "b"}, "labels") == {"a": "b"}
    after = client.stat("s")
    assert after.created_at == before.created_at
    assert after.updated_at.ToDatetime() > after.created_at.ToDatetime()
    assert (after.name, after.kind) == ("s", pb.ACTIVE)


def test_list_filters(client: Client) -> None:
    client.prepare("w1")
    client.commit("one", "w1", team="a")
    client.prepare("w2", "one")
    client.commit("two", "w2", team="b")
    client.prepare("active", "two", team="a")
    client.view("view", "one")
    assert client.names() == ["active", "one", "two", "view"]
    assert client.names("kind==committed") == ["one", "two"]
    assert client.names("parent==one") == ["two", "view"]
    assert client.names('labels."team"==a') == ["active", "one"]
    assert client.names("labels.team==a,kind==active") == ["active"]
    assert client.names("kind==view", "name==two") == ["two", "view"]
    assert client.names("labels.team") == ["active", "one", "two"]
    assert client.names("name~=^t", "kind!=committed") == ["active", "two", "view"]


def test_filter_parser_reads_quotes_and_refuses_garbage() -> None:
    snapshot_filter = parse_filter(r'labels."a.b"=="x,y\"z", name!=n')
    assert [s.fieldpath for s in snapshot_filter.selectors] == [("labels", "a.b"), ("name",)]
    assert snapshot_filter.selectors[0].value == 'x,y"z'
    for bad in ("", "name==", "name=x", 'labels."open', "name~=(", "==x"):
        with pytest.raises(laminae.InvalidArgument):
            parse_filter(bad)


def test_names_sharing_a_layer_keep_their_own_labels_and_parents(client: Client) -> None:
    client.prepare("w1")
    client.prepare("w2")
    client.commit("empty-1", "w1", who="one")
    client.commit("empty-2", "w2", who="two")
    # Two empty commits are one layer (one ChainID) and two snapshots.
    layers = client.store.layers()
    assert len(layers) == 1
    assert dict(client.stat("empty-1").labels) == {"who": "one"}
    assert dict(client.stat("empty-2").labels) == {"who": "two"}
    assert layers[0].names == () and dict(layers[0].labels) == {}
    client.prepare("child", "empty-2")
    assert client.stat("child").parent == "empty-2"
    client.remove("empty-1")
    assert [layer.id for layer in client.store.layers(kind=laminae.LayerKind.COMMITTED)] == [
        layers[0].id
    ]
    client.remove("child")
    client.remove("empty-2")
    assert client.store.layers() == []
    assert client.names() == []


def test_unpack_of_a_layer_the_store_has_records_the_name_on_it(client: Client) -> None:
    layer = client.store.apply_layer(HELLO, names=["hello-base"])
    ref = {"containerd.io/snapshot.ref": f"default/7/{layer.id}"}
    code = client.code(client.stub.Prepare, pb.PrepareSnapshotRequest(key="extract-1", labels=ref))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    info = client.stat(f"default/7/{layer.id}")
    assert info.kind == pb.COMMITTED and info.parent == ""
    assert client.names() == [f"default/7/{layer.id}"]  # no extraction snapshot left
    # Removing the name leaves the store's own layer, which its name holds.
    client.remove(f"default/7/{layer.id}")
    assert [item.id for item in client.store.layers()] == [layer.id]


def test_cleanup_removes_layers_no_name_uses(client: Client) -> None:
    made = client.store.create_layer("containerd-" + "0" * 32)  # as a crash would leave it
    kept = client.store.create_layer("not-ours")
    client.prepare("live")
    client.stub.Cleanup(pb.CleanupRequest())
    remaining = {layer.id for layer in client.store.layers()}
    assert made.id not in remaining and kept.id in remaining
    assert client.names() == ["live"]
