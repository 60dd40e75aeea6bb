"""Labels, names and listing: stat, walk and update (containerd's Update, Walk, StatInWalk),
names and id prefixes as references, and bad input to them."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pytest

import laminae
from laminae import LayerKind
from laminae.conformance._layers import Writer, apply, commit_written
from laminae.conformance._tars import LayerTar


def write_file(name: str) -> Writer:
    def write(root: Path) -> None:
        (root / name).write_bytes(name.encode())

    return write


def walk_fixture(store: laminae.Store, tar: type[LayerTar]) -> dict[str, laminae.Layer]:
    """containerd Walk's eight layers: with and without parent, with and without labels."""
    labels = {"l": "1"}
    p = apply(store, tar().file("p", b"p"))
    p_wl = store.apply_layer(tar().file("p-wl", b"p").stream(), labels={"l": "2"})
    layers = {
        "p": p,
        "p-wl": p_wl,
        "a-np": store.create_layer("a-np"),
        "a": store.create_layer("a", parent=p.id),
        "v": store.create_layer("v", parent=p.id, view=True),
        "a-wl": store.create_layer("a-wl", parent=p.id, labels=labels),
        "v-wl": store.create_layer("v-wl", parent=p_wl.id, view=True, labels=labels),
        "a-np-wl": store.create_layer("a-np-wl", labels=labels),
    }
    return {name: store.layer(layer.id) for name, layer in layers.items()}


@pytest.mark.laminae_area("labels")
class TestLabels:
    def test_update(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        """containerd Update: created within the call, updated moves and created does not,
        labels replaced as a whole."""
        start = datetime.now(UTC)
        c1 = commit_written(store, None, write_file("c1"))
        c2 = commit_written(store, c1, write_file("c2"))
        layers = [
            c1,
            c2,
            store.create_layer("a1", parent=c2.id),
            store.create_layer("a2"),
            store.create_layer("v1", parent=c2.id, view=True),
            store.create_layer("v2", parent=c1.id, view=True),
        ]
        end = datetime.now(UTC)
        for layer in layers:
            assert start <= layer.created <= end, (layer.id, layer.created)
            assert layer.updated >= layer.created
            assert dict(layer.labels) == {}

            labels = {"l1": "v1", "l2": "v2", "l3": "v3"}
            updated = store.set_labels(layer.id, labels)
            assert dict(updated.labels) == labels
            assert updated.created == layer.created
            assert updated.updated > layer.updated, "updated did not move"

            replaced = store.set_labels(layer.id, {"l1": "changed", "l4": "v4"})
            assert dict(replaced.labels) == {"l1": "changed", "l4": "v4"}
            assert replaced.updated > updated.updated
            assert dict(store.layer(layer.id).labels) == {"l1": "changed", "l4": "v4"}

            cleared = store.set_labels(layer.id, {})
            assert dict(cleared.labels) == {}
            assert (cleared.kind, cleared.parent, cleared.created) == (
                layer.kind,
                layer.parent,
                layer.created,
            )

    @pytest.mark.parametrize(
        "labels",
        [{"": "empty key"}, {"k": 1}, {"k" * 4096: "too long"}],
        ids=["empty-key", "not-a-string", "too-long"],
    )
    def test_bad_labels_are_invalid_argument(
        self, store: laminae.Store, labels: dict[str, object]
    ) -> None:
        layer = store.create_layer("labelled", labels={"keep": "me"})
        with pytest.raises(laminae.InvalidArgument, match="label"):
            store.set_labels(layer.id, labels)  # type: ignore[arg-type]
        with pytest.raises(laminae.InvalidArgument, match="label"):
            store.create_layer("other", labels=labels)  # type: ignore[arg-type]
        assert dict(store.layer(layer.id).labels) == {"keep": "me"}
        assert [existing.id for existing in store.layers()] == ["labelled"]

    def test_set_labels_of_unknown_layer(self, store: laminae.Store) -> None:
        with pytest.raises(laminae.NotFound, match="no-such-layer"):
            store.set_labels("no-such-layer", {"k": "v"})

    @pytest.mark.parametrize("kind", [None, *LayerKind], ids=["all", *(k.value for k in LayerKind)])
    def test_walk(self, store: laminae.Store, tar: type[LayerTar], kind: LayerKind | None) -> None:
        """containerd Walk: every layer listed once, with its kind, parent and labels, and
        the kind filter exact."""
        layers = walk_fixture(store, tar)
        expected = {
            layer.id: layer for layer in layers.values() if kind is None or layer.kind is kind
        }
        walked = store.layers(kind=kind)
        assert [layer.id for layer in walked] == [
            layer.id for layer in walked if layer.id in expected
        ]
        assert {layer.id for layer in walked} == set(expected)
        for layer in walked:
            assert layer == expected[layer.id], f"listing differs from stat for {layer.id}"
        with_label = {name for name, layer in layers.items() if "l" in layer.labels}
        assert with_label == {"p-wl", "a-wl", "v-wl", "a-np-wl"}
        assert layers["a"].parent == layers["p"].id
        assert layers["v-wl"].parent == layers["p-wl"].id
        assert layers["a-np"].parent is None and layers["a-np"].depth == 0

    def test_stat_in_walk(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        """containerd StatInWalk: stat while walking gives what the walk gave."""
        walk_fixture(store, tar)
        for layer in store.layers():
            assert store.layer(layer.id) == layer

    def test_names(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        base = store.apply_layer(tar().file("a", b"a").stream(), names=["base", "alpine"])
        assert set(base.names) == {"base", "alpine"}
        assert store.layer("base").id == base.id
        other = store.apply_layer(tar().file("b", b"b").stream(), parent="base")
        with pytest.raises(laminae.AlreadyExists, match="base"):
            store.add_names(other.id, ["base"])
        with pytest.raises(laminae.AlreadyExists):
            store.create_layer("alpine")
        store.add_names(other.id, ["top"])
        assert store.layer("top").id == other.id
        store.remove_names(base.id, ["alpine"])
        assert store.layer(base.id).names == ("base",)
        with pytest.raises(laminae.NotFound):
            store.layer("alpine")
        with pytest.raises(laminae.NotFound):
            store.remove_names(base.id, ["top"])
        with pytest.raises(laminae.InvalidArgument):
            store.add_names(base.id, ["bad\nname"])
        assert store.layer("top").names == ("top",)

    def test_id_prefix_is_a_reference(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        layer = apply(store, tar().file("a", b"a"))
        digits = layer.id.removeprefix("sha256:")
        for ref in (digits[:12], "sha256:" + digits[:12], digits[:4], digits):
            assert store.layer(ref).id == layer.id, ref

    def test_labels_on_apply_and_commit(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        data = tar().file("a", b"a").build()
        first = store.apply_layer(io.BytesIO(data), labels={"from": "apply"})
        assert dict(first.labels) == {"from": "apply"}
        again = store.apply_layer(io.BytesIO(data), labels={"more": "yes"})
        assert again.id == first.id
        assert dict(again.labels) == {"from": "apply", "more": "yes"}
        store.create_layer("work", parent=first.id, labels={"phase": "active"})
        committed = store.commit_layer("work", labels={"phase": "committed"})
        assert dict(committed.labels) == {"phase": "committed"}

    def test_info(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        apply(store, tar().file("a", b"a"))
        store.create_layer("active")
        info = store.info()
        assert info.driver == store.driver_name
        assert info.layers == 2
        assert info.capabilities == store.capabilities
        assert info.root == store.root
