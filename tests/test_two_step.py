"""Operations in two steps complete or leave nothing, and the graph's layers are checked.

Removing an image, creating, removing and committing a container each change a row and a
layer in two steps. A process killed between them (a child that SIGKILLs itself at the
point between, found by wrapping the call that starts the second step) must leave nothing
once the store is opened again: no layer that no image, container, name or child holds.
A ``create_container`` that races a ``remove_image`` gives a laminae error and leaves
nothing. ``check`` lists the images and containers a repair would take with a lost layer,
``check --content`` finds a layer whose files changed, and no export writes such a layer.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from imagebuild import write_layout
from tarbuild import make_tar

import laminae
from laminae.cli._main import cli

BASE = make_tar({"etc/hostname": b"box\n"}, dirs=("etc",))
TOP = make_tar({"usr/bin/tool": b"#!/bin/sh\n"}, dirs=("usr", "usr/bin"))


@pytest.fixture(autouse=True)
def _environment(clean_environment: None) -> None:
    """Every test here runs in conftest's clean environment."""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A vfs store with image ``img`` (two layers) and container ``c`` on it."""
    write_layout(tmp_path / "layout", [BASE, TOP])
    path = tmp_path / "root"
    with open_store(path) as store:
        store.import_image(f"oci:{tmp_path / 'layout'}:v1", names=["img"])
        store.create_container("img", name="c")
        (store.mount_container("c") / "new-file").write_bytes(b"changed\n")
        store.unmount_container("c")
    return path


def open_store(root: Path) -> laminae.Store:
    return laminae.open_store(root, runroot=root.parent / "run", driver="vfs")


# Each case: what the child does, and the call (module, class, method) at which it dies.
# The call named is the first of the second step, after the first step's transaction.
_KILLS = {
    "remove_image": (
        "store.remove_container('c'); store.remove_image('img')",
        "laminae.store._staging:Staging.collect",
    ),
    # The collection of the image's chain, killed after its top layer went: the rest of
    # the chain is the journal's to finish.
    "remove_image_half_way_down": (
        "store.remove_container('c'); store.remove_image('img')",
        "laminae.store._staging:Staging.remove@3",
    ),
    "create_container": (
        "store.create_container('img', name='d')",
        "laminae.store._graph:Graph.insert_container",
    ),
    "remove_container": (
        "store.remove_container('c')",
        "laminae.store._staging:Staging.finish_pending",
    ),
    "commit_container": (
        "store.commit_container('c', 'committed')",
        "laminae.containers._store:ContainerStore.create_image",
    ),
}

_CHILD = """
import importlib, os, signal, sys
import laminae
module, _, attribute = {target!r}.partition(":")
attribute, _, nth = attribute.partition("@")
owner_name, _, method = attribute.partition(".")
owner = getattr(importlib.import_module(module), owner_name)
original = getattr(owner, method)
armed = {{"on": False, "calls": 0}}
def dying(*args, **kwargs):
    if armed["on"]:
        armed["calls"] += 1
        if armed["calls"] >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, method, dying)
store = laminae.open_store({root!r}, runroot={runroot!r}, driver="vfs")
armed["on"] = True
{action}
sys.exit(3)  # the kill point was never reached
"""


def held_layers(store: laminae.Store) -> set[str]:
    """The layers something holds: images' chains, containers' layers and their parents."""
    held: set[str] = set()
    for image in store.images():
        held.update(layer.id for layer in store.image_layers(image.id))
    for container in store.containers():
        layer = store.layer(container.layer)
        held.add(layer.id)
        while layer.parent is not None:
            layer = store.layer(layer.parent)
            held.add(layer.id)
    return held


@pytest.mark.parametrize("operation", sorted(_KILLS))
def test_a_kill_between_the_two_steps_leaves_nothing(root: Path, operation: str) -> None:
    action, target = _KILLS[operation]
    child = _CHILD.format(
        target=target, root=str(root), runroot=str(root.parent / "run"), action=action
    )
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(child)], check=False)
    assert done.returncode == -signal.SIGKILL, f"{operation}: the child was not killed"
    with open_store(root) as store:
        layers = {layer.id for layer in store.layers()}
        assert layers == held_layers(store), f"{operation}: layers nothing holds remain"
        report = store.check()
        assert report.ok, report.problems()
        assert report.unreferenced == ()
        assert set(store.driver.layers()) == {layer.storage_id for layer in store.layers()}


def test_a_kill_is_reported_until_the_store_opens_again(root: Path) -> None:
    """A store already open sees another process's interrupted operation in check."""
    action, target = _KILLS["remove_container"]
    with open_store(root) as store:
        child = _CHILD.format(
            target=target, root=str(root), runroot=str(root.parent / "run"), action=action
        )
        subprocess.run([sys.executable, "-c", child], check=False)
        report = store.check()
        assert len(report.interrupted) == 1
        assert report.interrupted[0].startswith("remove container ")
        fixed = store.repair()
        assert fixed.interrupted == report.interrupted
        assert store.check().ok
        assert store.containers() == []


def test_create_container_racing_remove_image_is_a_laminae_error(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image goes while the container's layer is being made on its top layer: the
    container is refused with NotFound, and the image's layers, which the removal left to
    the container's layer, are collected."""
    with open_store(root) as store, open_store(root) as other:
        store.remove_container("c")
        driver_class = type(store.driver)
        create = driver_class.create

        def create_then_remove_image(self: laminae.Driver, *args: object) -> None:
            create(self, *args)  # type: ignore[arg-type]
            if self is store.driver:
                other.remove_image("img")

        monkeypatch.setattr(driver_class, "create", create_then_remove_image)
        with pytest.raises(laminae.NotFound, match="img"):
            store.create_container("img", name="late")
        monkeypatch.undo()
        assert store.layers() == [] and store.images() == [] and store.containers() == []
        assert list(store.driver.layers()) == []
        assert store.check().ok


def test_unreferenced_layers_are_notes_and_a_forced_repair_collects_them(tmp_path: Path) -> None:
    with open_store(tmp_path / "root") as store:
        base = store.apply_layer(io.BytesIO(BASE))
        top = store.apply_layer(io.BytesIO(TOP), parent=base.id)
        named = store.apply_layer(io.BytesIO(TOP), names=["kept"])
        report = store.check()
        assert report.ok
        assert report.unreferenced == (top.id,)  # base is held by top, named by its name
        assert report.notes() == [
            f"layer {top.id}: unreferenced (no image, container, child layer or name holds it)"
        ]
        assert store.repair().kept == (f"layer {top.id}: unreferenced; --force removes it",)
        assert {layer.id for layer in store.layers()} == {base.id, top.id, named.id}
        assert store.repair(force=True).unreferenced == (top.id, base.id)
        assert [layer.id for layer in store.layers()] == [named.id]


def test_repair_lists_the_images_and_containers_it_removes(root: Path) -> None:
    with open_store(root) as store:
        image = store.image("img")
        base, top = store.image_layers("img")
        container = store.container("c")
        store.driver.remove(base.storage_id)
        report = store.check()
        assert report.missing_storage == (base.id,)
        expected = (
            f"layer {top.id}",
            f"layer {container.layer}",
            f"container {container.id}",
            f"image {image.id}",
        )
        assert set(report.dependents) == set(expected)
        assert f"image {image.id}: uses a layer whose storage is missing" in report.problems()
        fixed = store.repair(report)
        assert set(fixed.dependents) == set(expected)
        assert store.images() == [] and store.containers() == [] and store.layers() == []


def invoke(root: Path, *args: str) -> Result:
    config = root.parent / "storage.toml"
    config.write_text("")
    options = ["--config", str(config), "--root", str(root), "--runroot", str(root.parent / "run")]
    return CliRunner().invoke(cli, [*options, "--driver", "vfs", *args])


def test_changed_layer_files_are_found_and_never_exported(root: Path, tmp_path: Path) -> None:
    """A file deleted inside a committed layer: ``check --content`` names the layer, and
    ``layer export`` and ``image export`` refuse, writing nothing."""
    with open_store(root) as store:
        base, top = store.image_layers("img")
        assert store.check(content=True).ok
        (store.driver_home / "dir" / top.storage_id / "usr" / "bin" / "tool").unlink()
        report = store.check(content=True)
        assert [m.split(": ")[0] for m in report.content_mismatch] == [top.id]
        assert not report.ok and store.check().ok  # only a content check reads the files
    found = invoke(root, "check", "--content")
    assert found.exit_code == 8
    assert f"layer {top.id}: layer file 'usr/bin/tool' is missing" in found.output
    as_json = json.loads(invoke(root, "check", "--content", "--json").stdout)
    assert [m.split(": ")[0] for m in as_json["content_mismatch"]] == [top.id]
    exported = invoke(root, "layer", "export", top.id, "-o", str(tmp_path / "top.tar"))
    assert exported.exit_code != 0
    assert f"layer {top.id}: layer file 'usr/bin/tool' is missing" in exported.output
    assert not (tmp_path / "top.tar").exists()
    assert invoke(root, "layer", "export", base.id, "-o", str(tmp_path / "base.tar")).exit_code == 0
    assert (tmp_path / "base.tar").read_bytes() == BASE  # the very tar applied
    out = tmp_path / "out.tar"
    image = invoke(root, "image", "export", "img", f"oci-archive:{out}")
    assert image.exit_code != 0 and "refusing to export" in image.output
    assert not out.exists()


def test_a_driver_create_that_fails_half_way_leaves_no_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver made the layer's storage and then failed: the store removes it, since
    nothing else knows its id."""
    with open_store(tmp_path / "root") as store:
        base = store.apply_layer(io.BytesIO(BASE), names=["base"])
        driver_class = type(store.driver)
        create = driver_class.create

        def create_then_fail(self: laminae.Driver, *args: object) -> None:
            create(self, *args)  # type: ignore[arg-type]
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(driver_class, "create", create_then_fail)
        with pytest.raises(laminae.ResourceExhausted):
            store.create_layer("half", parent=base.id)
        monkeypatch.undo()
        assert set(store.driver.layers()) == {base.storage_id}
        assert store.check().ok
