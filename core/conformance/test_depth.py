"""Depth: long parent chains read through and mounted (graphtest DeepLayerRead(128),
containerd 128LayersMount), and the driver's declared maximum depth, where every peer's
suite stops short: a chain to ``min(max_depth, 500)`` is mounted, and one layer beyond the
declared maximum is refused with a clear error (the store does that: ``FailedPrecondition``
naming the limit) or, if the store takes it, works."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import laminae
from laminae.conformance._layers import Writer, apply, build_checked_chain, mounted
from laminae.conformance._tars import LayerTar

DEPTH_CAP = 500
"""Deepest chain the suite builds: overlayfs stacks at most 500 lower layers."""


def depth_layer(tar: type[LayerTar], depth: int) -> LayerTar:
    """A tiny layer that keeps the tree small however deep the chain: it rewrites
    ``/depth`` and one of ten slots, so the top shows the last ten layers in order."""
    return tar().file("depth", str(depth).encode()).file(f"slot-{depth % 10}", str(depth).encode())


def check_depth_top(root: Path, depth: int) -> None:
    assert (root / "base").read_bytes() == b"base", "the base layer's file is not visible"
    assert (root / "depth").read_bytes() == str(depth).encode()
    for slot in range(10):
        expected = max((d for d in range(1, depth + 1) if d % 10 == slot), default=None)
        path = root / f"slot-{slot}"
        if expected is None:
            assert not path.exists(), path
        else:
            assert path.read_bytes() == str(expected).encode(), (
                f"slot-{slot} shows the wrong layer: layers out of order"
            )


@pytest.mark.laminae_area("depth")
class TestDepth:
    def test_deep_layer_read_128(
        self, store: laminae.Store, tar: type[LayerTar], capabilities: laminae.Capabilities
    ) -> None:
        """graphtest DeepLayerRead(128): a file of the base read through 128 layers, and each
        layer's own file (``addManyLayers``, ``checkManyLayers``)."""
        count = min(128, capabilities.max_depth)
        parent = apply(store, tar().file("testfile.txt", b"base data"))
        for number in range(1, count + 1):
            parent = apply(
                store,
                tar()
                .file("top-id", str(number).encode())
                .file("parent-id", str(number - 1).encode())
                .dir(f"layer-{number}")
                .file(f"layer-{number}/layer-id", str(number).encode()),
                parent,
            )
        assert parent.depth == count
        with mounted(store, parent.id) as root:
            assert (root / "testfile.txt").read_bytes() == b"base data"
            assert (root / "top-id").read_bytes() == str(count).encode()
            assert (root / "parent-id").read_bytes() == str(count - 1).encode()
            for number in range(1, count + 1):
                path = root / f"layer-{number}" / "layer-id"
                assert path.read_bytes() == str(number).encode(), path

    def test_128_layers_mount(
        self, store: laminae.Store, scratch: Path, capabilities: laminae.Capabilities
    ) -> None:
        """containerd 128LayersMount: 128 layers written through mounts, each checked against
        a flat directory before and after commit."""

        def step(number: int) -> list[Writer]:
            def write(root: Path) -> None:
                (root / "overwriteme").write_bytes(f"overwrite-{number}".encode())
                (root / "addhere").mkdir(exist_ok=True)
                (root / "addhere" / f"file-{number}").write_bytes(f"file-{number}".encode())
                if (root / "onlyme").exists():
                    shutil.rmtree(root / "onlyme")
                (root / "onlyme").mkdir()
                (root / "onlyme" / f"only-{number}").write_bytes(b"only")

            return [write]

        count = min(128, capabilities.max_depth + 1)
        layers = build_checked_chain(store, scratch / "flat", [step(n) for n in range(count)])
        assert layers[-1].depth == count - 1
        with mounted(store, layers[-1].id) as root:
            assert sorted(os.listdir(root / "onlyme")) == [f"only-{count - 1}"]
            assert len(os.listdir(root / "addhere")) == count

    def test_max_depth(
        self, store: laminae.Store, tar: type[LayerTar], capabilities: laminae.Capabilities
    ) -> None:
        """A chain to the declared maximum (at most 500 deep) mounts, read-only and
        writable; one layer more is refused clearly, or works."""
        target = min(capabilities.max_depth, DEPTH_CAP)
        layer = apply(store, tar().file("base", b"base"))
        below = layer
        for depth in range(1, target + 1):
            below = layer
            layer = apply(store, depth_layer(tar, depth), layer)
        assert layer.depth == target
        with mounted(store, layer.id) as root:
            check_depth_top(root, target)
        active = store.create_layer("active-at-max", parent=below.id)
        assert active.depth == target
        with mounted(store, active.id) as root:
            (root / "written").write_bytes(b"at the maximum depth")
            check_depth_top(root, target - 1)
        store.remove_layer(active.id)

        before = [existing.id for existing in store.layers()]
        try:
            beyond = apply(store, depth_layer(tar, target + 1), layer)
        except (laminae.FailedPrecondition, laminae.InvalidArgument) as exc:
            assert target == capabilities.max_depth, (
                f"a layer {target + 1} deep was refused though the driver declares "
                f"max_depth {capabilities.max_depth}: {exc}"
            )
            assert str(capabilities.max_depth) in str(exc), f"the error names no limit: {exc}"
            assert [existing.id for existing in store.layers()] == before
            report = store.check()
            assert report.ok, report.problems()
            return
        assert beyond.depth == target + 1
        with mounted(store, beyond.id) as root:
            check_depth_top(root, target + 1)
