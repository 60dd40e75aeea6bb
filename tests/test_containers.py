"""Containers through the Python API, with every built-in driver: mounts, diffs, commits, exports.

Files are written and read through a real mount of the container (``os.*`` calls only), and
an export is checked by applying it, with laminae's own applier (whiteouts) and with GNU tar
(plain files), onto a copy of the image's tree.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import zstandard
from imagebuild import write_layout
from tarbuild import make_tar
from trees import contents, image_read

import laminae
from laminae import driverkit, images

pytestmark = pytest.mark.root

BASE = make_tar(
    {
        "etc/os-release": b"ID=laminae\n",
        "etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
        "bin/sh": b"#!shell\n",
        "var/lib/app/state": b"state\n",
        "etc/gone": b"x",
    },
    dirs=["etc", "bin", "var", "var/lib", "var/lib/app"],
)
TOP = make_tar({"etc/motd": b"hello\n"}, dirs=["etc"], whiteouts=["etc/gone"])


# One letter each, as docker diff writes them, so that an expected list reads like its output.
def A(path: str) -> laminae.Change:
    return laminae.Change(path, laminae.ChangeKind.ADDED)


def C(path: str) -> laminae.Change:
    return laminae.Change(path, laminae.ChangeKind.MODIFIED)


def D(path: str) -> laminae.Change:
    return laminae.Change(path, laminae.ChangeKind.DELETED)


@pytest.fixture
def store(each_driver_store: laminae.Store) -> laminae.Store:
    """The store of the test, one per built-in driver (``each_driver_store`` in conftest)."""
    return each_driver_store


@pytest.fixture
def image(store: laminae.Store, tmp_path: Path) -> laminae.Image:
    """A two-layer image, ``base:latest``, whose config has a Cmd and an Env."""
    write_layout(tmp_path / "layout", [BASE, TOP], platform=str(images.Platform.host()))
    return store.import_image(f"oci:{tmp_path / 'layout'}:v1", names=["base"])


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point, by the kernel's table (a bind mount of a directory
    on the same filesystem fools ``os.path.ismount``)."""
    with open("/proc/self/mountinfo") as table:
        return any(line.split()[4] == str(path) for line in table)


def container_tree(store: laminae.Store, ref: str) -> dict[str, tuple[object, ...]]:
    root = store.mount_container(ref)
    try:
        return contents(root)
    finally:
        store.unmount_container(ref)


def copy_of_image(store: laminae.Store, ref: str, target: Path) -> Path:
    """A plain-directory copy of image ``ref``'s tree, made through a mounted view."""
    image_read(store, ref, lambda root: shutil.copytree(root, target, symlinks=True))
    return target


def change_through_mount(root: Path) -> None:
    """Add, modify and delete files and a directory, as a process in the container would."""
    (root / "new.txt").write_bytes(b"new\n")
    (root / "srv" / "www").mkdir(parents=True)
    (root / "srv" / "www" / "index.html").write_bytes(b"<p>hi</p>\n")
    (root / "etc" / "os-release").write_bytes(b"ID=changed\n")
    (root / "etc" / "passwd").unlink()
    shutil.rmtree(root / "var" / "lib" / "app")


EXPECTED_CHANGES = [
    C("/etc"),
    C("/etc/os-release"),
    D("/etc/passwd"),
    A("/new.txt"),
    A("/srv"),
    A("/srv/www"),
    A("/srv/www/index.html"),
    C("/var"),
    C("/var/lib"),
    D("/var/lib/app"),
]


def config_of(image: laminae.Image) -> dict[str, Any]:
    assert image.config is not None
    data = json.loads(image.config)
    assert isinstance(data, dict)
    return data


# -- mounts and changes ------------------------------------------------------------------------


def test_mount_is_writable_counted_and_shows_the_image(
    store: laminae.Store, image: laminae.Image
) -> None:
    container = store.create_container("base", name="web")
    root = store.mount_container("web")
    assert store.mount_container(container.id) == root
    assert store.layer(container.layer).mount_count == 2
    assert (root / "etc" / "motd").read_bytes() == b"hello\n"
    assert not (root / "etc" / "gone").exists()
    (root / "written").write_bytes(b"x")
    store.unmount_container("web")
    assert (root / "written").read_bytes() == b"x"  # one mount left
    store.unmount_container("web")
    assert store.layer(container.layer).mount_count == 0
    assert not is_mounted(root)
    with pytest.raises(laminae.FailedPrecondition, match="not mounted"):
        store.unmount_container("web")
    store.unmount_container("web", force=True)  # force accepts an unmounted one


def test_diff_lists_added_modified_and_deleted_like_docker_diff(
    store: laminae.Store, image: laminae.Image
) -> None:
    container = store.create_container("base")
    assert store.container_changes(container.id) == []
    change_through_mount(store.mount_container(container.id))
    # While mounted, and again after: the same list, sorted, parents as modified, no "/".
    assert store.container_changes(container.id) == EXPECTED_CHANGES
    store.unmount_container(container.id)
    assert store.container_changes(container.id) == EXPECTED_CHANGES


def test_diff_lists_a_modified_directory_once(store: laminae.Store, image: laminae.Image) -> None:
    container = store.create_container("base")
    root = store.mount_container(container.id)
    (root / "var" / "lib").chmod(0o700)
    (root / "var" / "lib" / "more").write_bytes(b"")
    store.unmount_container(container.id)
    assert store.container_changes(container.id) == [C("/var"), C("/var/lib"), A("/var/lib/more")]


# -- commit ------------------------------------------------------------------------------------


def test_commit_adds_one_layer_and_one_history_entry_and_leaves_the_parent(
    store: laminae.Store, image: laminae.Image
) -> None:
    container = store.create_container("base")
    change_through_mount(store.mount_container(container.id))
    store.unmount_container(container.id)
    before = store.image("base")
    committed = store.commit_container(
        container.id, "web:v2", message="add the site", author="Ada <ada@example.com>"
    )
    assert committed.names == ("web:v2",)
    assert store.image("base").config == before.config == image.config  # the parent, as it was
    assert committed.id == "sha256:" + hashlib.sha256(committed.config).hexdigest()
    parent, new = config_of(before), config_of(committed)
    parent_ids = parent["rootfs"]["diff_ids"]
    new_ids = new["rootfs"]["diff_ids"]
    assert new_ids[:-1] == parent_ids and len(new_ids) == len(parent_ids) + 1
    assert new["history"][:-1] == parent["history"]
    entry = new["history"][-1]
    assert entry["created_by"] == "laminae container commit"
    assert entry["comment"] == "add the site"
    assert entry["author"] == new["author"] == "Ada <ada@example.com>"
    assert entry["created"] == new["created"] != parent["created"]
    assert new["config"] == parent["config"]  # Cmd and Env carried over
    layers = store.image_layers(committed.id)
    assert [layer.id for layer in layers[:-1]] == [layer.id for layer in store.image_layers("base")]
    assert layers[-1].diff_id == new_ids[-1]
    assert layers[-1].id == laminae.chain_id(new_ids)
    assert store.changes(layers[-1].id) == store.changes(container.layer)
    # The container is still there, with its own layer and changes.
    assert store.container(container.id).layer == container.layer
    assert store.container_changes(container.id) == EXPECTED_CHANGES


def test_a_container_of_the_committed_image_sees_the_changes(
    store: laminae.Store, image: laminae.Image
) -> None:
    first = store.create_container("base")
    change_through_mount(store.mount_container(first.id))
    store.unmount_container(first.id)
    store.commit_container(first.id, "web")
    second = store.create_container("web")
    files = container_tree(store, second.id)
    assert files == container_tree(store, first.id)
    assert files["new.txt"][3] == b"new\n"
    assert files["etc/os-release"][3] == b"ID=changed\n"
    assert "etc/passwd" not in files and "var/lib/app" not in files
    assert store.container_changes(second.id) == []


def test_commit_while_mounted_leaves_the_mount_and_keeps_writing(
    store: laminae.Store, image: laminae.Image
) -> None:
    container = store.create_container("base")
    root = store.mount_container(container.id)
    (root / "before").write_bytes(b"1")
    committed = store.commit_container(container.id, "snap")
    assert store.layer(container.layer).mount_count == 1
    assert is_mounted(root)
    (root / "after").write_bytes(b"2")  # still writable
    assert store.changes(store.image_layers(committed.id)[-1].id) == [A("/before")]
    assert store.container_changes(container.id) == [A("/after"), A("/before")]


def test_commit_of_an_unmodified_container_adds_an_empty_layer(
    store: laminae.Store, image: laminae.Image
) -> None:
    container = store.create_container("base")
    committed = store.commit_container(container.id)
    assert committed.names == ()
    layers = store.image_layers(committed.id)
    assert len(layers) == 3 and store.changes(layers[-1].id) == []
    assert len(config_of(committed)["history"]) == 3
    assert store.image("base").config == image.config
    # A second commit of the same container shares that layer (same ChainID).
    again = store.commit_container(container.id)
    assert again.id != committed.id
    assert store.image_layers(again.id)[-1].id == layers[-1].id


def test_removing_the_committed_image_collects_only_its_new_layer(
    store: laminae.Store, image: laminae.Image
) -> None:
    container = store.create_container("base")
    (store.mount_container(container.id) / "f").write_bytes(b"f")
    store.unmount_container(container.id)
    before = {layer.id for layer in store.layers()}
    committed = store.commit_container(container.id, "web")
    new_layer = store.image_layers(committed.id)[-1].id
    assert {layer.id for layer in store.layers()} == before | {new_layer}
    assert store.remove_image("web") == [new_layer]
    assert {layer.id for layer in store.layers()} == before
    assert store.image("base").config == image.config
    assert store.container_changes(container.id) == [A("/f")]


def test_the_committed_image_exports_and_imports_again_with_the_same_id(
    store: laminae.Store, image: laminae.Image, tmp_path: Path
) -> None:
    container = store.create_container("base")
    change_through_mount(store.mount_container(container.id))
    store.unmount_container(container.id)
    committed = store.commit_container(container.id, "web")
    expected = container_tree(store, container.id)
    store.export_image("web", f"oci:{tmp_path / 'out'}:x")
    store.remove_container(container.id)
    store.remove_image("web")
    again = store.import_image(f"oci:{tmp_path / 'out'}:x")
    assert again.id == committed.id
    assert again.config == committed.config
    second = store.create_container(again.id)
    assert container_tree(store, second.id) == expected


def test_commit_of_a_container_without_image_makes_a_config(
    store: laminae.Store, tmp_path: Path
) -> None:
    container = store.create_container(None)
    (store.mount_container(container.id) / "only").write_bytes(b"1")
    store.unmount_container(container.id)
    committed = store.commit_container(container.id, "scratch")
    config = images.parse_config(committed.config or b"", what="test")
    assert config.platform == images.Platform.host()
    assert len(config.diff_ids) == len(config.history) == 1
    store.export_image("scratch", f"oci:{tmp_path / 'out'}:s")
    assert store.container_config(container.id) is None


# -- export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_export_applied_onto_the_image_gives_the_container_tree(
    store: laminae.Store, image: laminae.Image, tmp_path: Path, compression: str
) -> None:
    container = store.create_container("base")
    change_through_mount(store.mount_container(container.id))
    buffer = io.BytesIO()
    result = store.export_container(
        container.id, buffer, compression=laminae.Compression(compression)
    )
    store.unmount_container(container.id)
    data = buffer.getvalue()
    assert result.size == len(data) and result.compression.value == compression
    plain = {
        "none": lambda b: b,
        "gzip": gzip.decompress,
        "zstd": lambda b: zstandard.ZstdDecompressor().stream_reader(io.BytesIO(b)).read(),
    }[compression](data)
    assert result.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    target = copy_of_image(store, "base", tmp_path / "copy")
    driverkit.apply_tar(target, io.BytesIO(plain))  # whiteouts delete
    assert contents(target) == container_tree(store, container.id)


def test_export_of_plain_changes_applied_by_gnu_tar_gives_the_container_tree(
    store: laminae.Store, image: laminae.Image, tmp_path: Path
) -> None:
    container = store.create_container("base")
    root = store.mount_container(container.id)
    (root / "etc" / "os-release").write_bytes(b"ID=other\n")
    (root / "opt" / "tool").mkdir(parents=True)
    (root / "opt" / "tool" / "run").write_bytes(b"#!run\n")
    (root / "opt" / "tool" / "run").chmod(0o755)
    os.symlink("tool/run", root / "opt" / "run")
    store.unmount_container(container.id)
    layer_tar = tmp_path / "layer.tar"
    with open(layer_tar, "wb") as out:
        store.export_container(container.id, out)
    target = copy_of_image(store, "base", tmp_path / "copy")
    subprocess.run(
        ["tar", "--numeric-owner", "-xpf", str(layer_tar), "-C", str(target)], check=True
    )
    assert contents(target) == container_tree(store, container.id)


# -- names, config, removal, errors ------------------------------------------------------------


def test_names_resolve_and_stay_unique(store: laminae.Store, image: laminae.Image) -> None:
    container = store.create_container("base", name="web")
    assert store.container("web") == container
    assert [c.id for c in store.containers()] == [container.id]
    with pytest.raises(laminae.AlreadyExists, match="web"):
        store.create_container("base", name="web")
    # A commit's name moves from the image that had it, as docker tag does.
    first = store.commit_container("web", "app")
    second = store.commit_container("web", "app")
    assert store.image("app").id == second.id
    assert store.image(first.id).names == ()


def test_container_config_is_the_image_config(store: laminae.Store, image: laminae.Image) -> None:
    container = store.create_container("base")
    config = store.container_config(container.id)
    assert config is not None
    assert config.raw == image.config
    assert config.container_config == {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]}


def test_remove_refuses_a_mounted_container_unless_forced(
    store: laminae.Store, image: laminae.Image
) -> None:
    container = store.create_container("base")
    root = store.mount_container(container.id)
    store.mount_container(container.id)
    with pytest.raises(laminae.FailedPrecondition, match="mounted"):
        store.remove_container(container.id)
    store.remove_container(container.id, force=True)
    assert not is_mounted(root)
    assert store.containers() == []
    with pytest.raises(laminae.NotFound):
        store.layer(container.layer)


def test_unknown_containers_and_images_are_errors(
    store: laminae.Store, image: laminae.Image
) -> None:
    layers = store.layers()
    for call in (
        lambda: store.mount_container("nope"),
        lambda: store.unmount_container("nope"),
        lambda: store.container_changes("nope"),
        lambda: store.export_container("nope", io.BytesIO()),
        lambda: store.commit_container("nope"),
        lambda: store.container_config("nope"),
        lambda: store.remove_container("nope"),
    ):
        with pytest.raises(laminae.NotFound, match="container 'nope'"):
            call()
    with pytest.raises(laminae.NotFound, match="image 'missing'"):
        store.create_container("missing")
    container = store.create_container("base")
    with pytest.raises(laminae.InvalidArgument, match="Not A Name"):
        store.commit_container(container.id, "Not A Name")
    assert store.layers() == [*layers, store.layer(container.layer)]
    assert len(store.images()) == 1
