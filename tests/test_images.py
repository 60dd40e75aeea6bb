"""Images into and out of a store, through OCI layouts and archives, with every built-in driver.

The interop with skopeo, umoci and a real registry is in test_image_interop.py; this module
checks the pipeline itself: verification before anything is visible, sharing by ChainID,
collection on removal, exact export (tar-split), platforms and parallel apply.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from imagebuild import write_layout
from tarbuild import make_tar
from trees import contents, image_read

import laminae
from laminae.archive._compression import open_decompressed

pytestmark = pytest.mark.root

BASE = make_tar(
    {"etc/os-release": b"ID=laminae\n", "bin/sh": b"#!shell\n", "etc/gone": b"x"},
    dirs=["etc", "bin"],
)
MIDDLE = make_tar({"etc/motd": b"hello\n"}, dirs=["etc"], whiteouts=["etc/gone"])
TOP = make_tar({"srv/data": b"d" * 100_000}, dirs=["srv"])
OTHER_TOP = make_tar({"opt/tool": b"tool\n"}, dirs=["opt"])


@pytest.fixture
def store(each_driver_store: laminae.Store) -> laminae.Store:
    """The store of the test, one per built-in driver (``each_driver_store`` in conftest)."""
    return each_driver_store


def storage_entries(store: laminae.Store) -> set[str]:
    """What the driver holds on disk, to show a failed import left nothing."""
    return {layer.storage_id for layer in store.layers()}


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_import_from_a_layout_gives_the_image_and_its_tree(
    store: laminae.Store, tmp_path: Path, compression: str
) -> None:
    built = write_layout(tmp_path / "layout", [BASE, MIDDLE, TOP], compression=compression)
    image = store.import_image(f"oci:{tmp_path / 'layout'}:v1")
    assert image.id == built.config_digest
    assert image.names == ("v1:latest",)
    assert image.manifest_digest == built.manifest_digest
    layers = store.image_layers(image.id)
    assert tuple(layer.diff_id for layer in layers) == built.diff_ids
    assert layers[0].id == built.diff_ids[0]
    assert layers[-1].id == laminae.chain_id(list(built.diff_ids))
    assert tuple(layer.digest for layer in layers) == built.layer_digests
    files = image_read(store, image.id, contents)
    assert files["etc/os-release"][3] == b"ID=laminae\n"
    assert files["etc/motd"][3] == b"hello\n"
    assert files["srv/data"][3] == b"d" * 100_000
    assert "etc/gone" not in files


def test_a_second_import_applies_nothing(store: laminae.Store, tmp_path: Path) -> None:
    write_layout(tmp_path / "layout", [BASE, MIDDLE, TOP])
    first = store.import_image(f"oci:{tmp_path / 'layout'}:v1", names=["one"])
    before = {layer.id: layer.created for layer in store.layers()}
    seen: list[tuple[str, str]] = []

    class Recorder:
        def start(self, key: str, description: str, total: int | None) -> None:
            pass

        def advance(self, key: str, amount: int) -> None:
            pass

        def finish(self, key: str, status: str) -> None:
            seen.append((key, status))

        def close(self) -> None:
            pass

    again = store.import_image(f"oci:{tmp_path / 'layout'}:v1", names=["two"], progress=Recorder())
    assert again.id == first.id
    assert set(again.names) == {"one:latest", "two:latest"}
    assert {layer.id: layer.created for layer in store.layers()} == before
    assert [status for _, status in seen] == ["exists"] * 3


def test_images_share_layers_and_removal_collects_only_their_own(
    store: laminae.Store, tmp_path: Path
) -> None:
    write_layout(tmp_path / "a", [BASE, MIDDLE, TOP])
    write_layout(tmp_path / "b", [BASE, MIDDLE, OTHER_TOP])
    a = store.import_image(f"oci:{tmp_path / 'a'}:v1", names=["a"])
    b = store.import_image(f"oci:{tmp_path / 'b'}:v1", names=["b"])
    assert len(store.layers()) == 4  # base and middle once, two tops
    shared = {layer.id for layer in store.image_layers(a.id)[:2]}
    assert store.remove_image("a") == [store_top(a)]
    assert {layer.id for layer in store.layers()} == shared | {store_top(b)}
    container = store.create_container("b")
    with pytest.raises(laminae.FailedPrecondition, match="container"):
        store.remove_image("b")
    store.remove_container(container.id)
    assert len(store.remove_image("b")) == 3
    assert store.layers() == [] and store.images() == []


def store_top(image: laminae.Image) -> str:
    assert image.top_layer is not None
    return image.top_layer


def test_a_name_with_others_is_untagged_not_removed(store: laminae.Store, tmp_path: Path) -> None:
    write_layout(tmp_path / "a", [BASE])
    image = store.import_image(f"oci:{tmp_path / 'a'}:v1", names=["x:1"])
    store.tag_image("x:1", "x:2")
    assert store.image("x:2").id == image.id
    assert store.remove_image("x:1") == []
    assert store.image(image.id).names == ("x:2",)
    assert store.remove_image("x:2") == [image.top_layer]


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def test_a_corrupt_blob_is_named_and_leaves_nothing(store: laminae.Store, tmp_path: Path) -> None:
    built = write_layout(tmp_path / "layout", [BASE, MIDDLE, TOP])
    corrupt(blob_path(tmp_path / "layout", built.layer_digests[2]))
    with pytest.raises(laminae.CorruptLayer, match=built.layer_digests[2]):
        store.import_image(f"oci:{tmp_path / 'layout'}:v1")
    assert store.layers() == [] and store.images() == []
    assert store.check().ok
    assert not list(store.root.glob("tar-split/*"))


def test_a_diff_id_the_config_does_not_give_is_refused(
    store: laminae.Store, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    built = write_layout(layout, [BASE, MIDDLE])
    # Swap the two DiffIDs in the config and rewrite manifest and index to match, so that
    # every digest checks out and only the DiffID of the first layer is wrong.
    config = json.loads(built.config)
    config["rootfs"]["diff_ids"].reverse()
    raw_config = json.dumps(config).encode()
    manifest = json.loads(built.manifest)
    manifest["config"]["digest"] = put_blob(layout, raw_config)
    manifest["config"]["size"] = len(raw_config)
    raw_manifest = json.dumps(manifest).encode()
    index = json.loads((layout / "index.json").read_bytes())
    index["manifests"][0]["digest"] = put_blob(layout, raw_manifest)
    index["manifests"][0]["size"] = len(raw_manifest)
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(laminae.CorruptLayer, match=built.layer_digests[0]):
        store.import_image(f"oci:{layout}:v1")
    assert store.layers() == [] and store.images() == []


def put_blob(layout: Path, data: bytes) -> str:
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path(layout, digest).write_bytes(data)
    return digest


def test_a_truncated_blob_is_refused(store: laminae.Store, tmp_path: Path) -> None:
    built = write_layout(tmp_path / "layout", [BASE])
    path = blob_path(tmp_path / "layout", built.layer_digests[0])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(laminae.LaminaeError, match=built.layer_digests[0]):
        store.import_image(f"oci:{tmp_path / 'layout'}:v1")
    assert store.layers() == []


def layer_tars(layout: Path, ref: str) -> list[bytes]:
    """The uncompressed layer tars of image ``ref`` in ``layout``, base first."""
    index = json.loads((layout / "index.json").read_bytes())
    (entry,) = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref
    ]
    manifest = json.loads(blob_path(layout, entry["digest"]).read_bytes())
    out = []
    for desc in manifest["layers"]:
        with open(blob_path(layout, desc["digest"]), "rb") as blob:
            out.append(open_decompressed(blob, max_bytes=1 << 30).read())
    return out


@pytest.mark.parametrize("compression", [laminae.Compression.GZIP, laminae.Compression.ZSTD])
def test_export_gives_back_the_exact_layers_and_config(
    store: laminae.Store, tmp_path: Path, compression: laminae.Compression
) -> None:
    built = write_layout(tmp_path / "in", [BASE, MIDDLE, TOP], compression="none")
    store.import_image(f"oci:{tmp_path / 'in'}:v1", names=["img"])
    digest = store.export_image("img", f"oci:{tmp_path / 'out'}:exported", compression=compression)
    assert layer_tars(tmp_path / "out", "exported") == [BASE, MIDDLE, TOP]
    index = json.loads((tmp_path / "out" / "index.json").read_bytes())
    assert index["manifests"][0]["digest"] == digest
    manifest = json.loads(blob_path(tmp_path / "out", digest).read_bytes())
    assert manifest["config"]["digest"] == built.config_digest
    # Another store importing the export sees the same image.
    with laminae.open_store(tmp_path / "second", runroot=tmp_path / "run2", driver="vfs") as other:
        again = other.import_image(f"oci:{tmp_path / 'out'}:exported")
        assert again.id == built.config_digest


def test_docker_archive_round_trip(store: laminae.Store, tmp_path: Path) -> None:
    built = write_layout(tmp_path / "in", [BASE, MIDDLE])
    store.import_image(f"oci:{tmp_path / 'in'}:v1", names=["app:1"])
    archive = tmp_path / "app.tar"
    store.export_image("app:1", f"docker-archive:{archive}:app:1")
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == ["app:1"]
    with laminae.open_store(tmp_path / "second", runroot=tmp_path / "run2", driver="vfs") as other:
        image = other.import_image(f"docker-archive:{archive}")
        assert image.id == built.config_digest
        assert "app:1" in image.names


def test_platform_picks_from_a_multi_platform_index(store: laminae.Store, tmp_path: Path) -> None:
    built = write_layout(tmp_path / "multi", [BASE, MIDDLE], multi_platform=True)
    source = f"oci:{tmp_path / 'multi'}:v1"
    arm = store.import_image(source, platform="linux/arm64/v8", names=["arm"])
    amd = store.import_image(source, platform="linux/amd64", names=["amd"])
    assert arm.manifest_digest == built.platforms["linux/arm64/v8"]
    assert amd.manifest_digest == built.platforms["linux/amd64"]
    with pytest.raises(laminae.NotFound, match="linux/s390x"):
        store.import_image(source, platform="linux/s390x")


def test_parallel_and_serial_imports_agree(store: laminae.Store, tmp_path: Path) -> None:
    tars = [make_tar({f"d{i}/f{j}": bytes([i]) * (j + 1) for j in range(50)}) for i in range(5)]
    tars.append(make_tar({"d0/f1": b"replaced"}, whiteouts=["d1"]))
    write_layout(tmp_path / "layout", tars)
    parallel = store.import_image(f"oci:{tmp_path / 'layout'}:v1", names=["p"], jobs=4)
    files = image_read(store, "p", contents)
    store.remove_image("p")
    serial = store.import_image(f"oci:{tmp_path / 'layout'}:v1", names=["s"], jobs=1)
    assert serial.id == parallel.id
    assert image_read(store, "s", contents) == files
    assert files["d0/f1"][3] == b"replaced" and not any(k.startswith("d1") for k in files)


def test_bad_locations_are_named(store: laminae.Store, tmp_path: Path) -> None:
    with pytest.raises(laminae.InvalidArgument, match="nope"):
        store.import_image("nope:somewhere")
    with pytest.raises(laminae.NotFound, match="missing"):
        store.import_image(f"oci:{tmp_path / 'missing'}")
    write_layout(tmp_path / "layout", [BASE])
    with pytest.raises(laminae.NotFound, match="v9"):
        store.import_image(f"oci:{tmp_path / 'layout'}:v9")


def test_export_of_an_image_without_config_is_refused(store: laminae.Store) -> None:
    base = store.apply_layer(io.BytesIO(BASE))
    store.create_image(base.id, names=["bare"])
    with pytest.raises(laminae.FailedPrecondition, match="config"):
        store.export_image("bare", "oci:/nonexistent-dir-for-laminae:x")


def _tar_with(*entries: tuple[str, bytes | None, str | None]) -> bytes:
    """A tar of (name, content, hard link target) entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, link in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if link is not None:
                info.type, info.linkname = tarfile.LNKTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


def test_layers_that_need_their_parents_still_import(store: laminae.Store, tmp_path: Path) -> None:
    # Overlay applies the layers of one image side by side; a hard link to a file of a lower
    # layer, and an opaque marker at a layer's root, need the parents' files, so those
    # layers are applied again once their parents are there.
    base = make_tar({"a/file": b"lower", "b/keep": b"k"}, dirs=["a", "b"])
    link = _tar_with(("a/link", None, "a/file"))
    opaque = _tar_with((".wh..wh..opq", b"", None), ("c/new", b"n", None))
    write_layout(tmp_path / "layout", [base, link, opaque])
    store.import_image(f"oci:{tmp_path / 'layout'}:v1", names=["p"], jobs=3)
    files = image_read(store, "p", contents)
    assert sorted(files) == ["c", "c/new"]
    store.remove_image("p")
    write_layout(tmp_path / "two", [base, link])
    store.import_image(f"oci:{tmp_path / 'two'}:v1", names=["q"], jobs=3)
    files = image_read(store, "q", contents)
    assert files["a/link"][3] == b"lower" and files["a/file"][3] == b"lower"


def test_spool_files_a_killed_process_left_are_swept_at_open(tmp_path: Path) -> None:
    root, run = tmp_path / "root", tmp_path / "run"
    with laminae.open_store(root, runroot=run, driver="vfs") as store:
        with store._staging.scratch() as live:
            (live / "blob-0").write_bytes(b"x" * 10)
            dead = root / "tmp" / "0123456789abcdef"
            dead.mkdir()
            (dead / "blob-0").write_bytes(b"partial download")
            # Another open sweeps the dead process's directory, not the live one's.
            with laminae.open_store(root, runroot=run) as other:
                assert other.images() == []
            assert not dead.exists()
            assert (live / "blob-0").exists()
        assert list((root / "tmp").iterdir()) == []


def test_an_import_killed_midway_leaves_nothing_after_the_next_open(
    store: laminae.Store, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys
    import time

    layout = tmp_path / "layout"
    top = make_tar({f"big/{i}": os.urandom(4096) for i in range(200)})
    built = write_layout(layout, [BASE, MIDDLE, top], compression="none")
    # The child reads half of the top blob, then blocks in the read: the import stops there,
    # half applied, and dies. (A FIFO blob would do the same, but a layout refuses one.)
    stall = (
        "import contextlib, io, sys, threading, laminae\n"
        "from laminae.images import _layout\n"
        "class Stall(io.RawIOBase):\n"
        "    def __init__(self, raw, left):\n"
        "        self.raw, self.left = raw, left\n"
        "    def readable(self):\n"
        "        return True\n"
        "    def readinto(self, b):\n"
        "        if self.left <= 0:\n"
        "            threading.Event().wait()\n"
        "        n = self.raw.readinto(memoryview(b)[: self.left])\n"
        "        self.left -= n\n"
        "        return n\n"
        "opened = _layout._LayoutSource.open_blob\n"
        "@contextlib.contextmanager\n"
        "def open_blob(self, desc):\n"
        "    with opened(self, desc) as stream:\n"
        "        if desc.digest != sys.argv[5]:\n"
        "            yield stream\n"
        "        else:\n"
        "            yield io.BufferedReader(Stall(stream, desc.size // 2))\n"
        "_layout._LayoutSource.open_blob = open_blob\n"
        "with laminae.open_store(sys.argv[1], runroot=sys.argv[2], driver=sys.argv[3]) as s:\n"
        "    s.import_image(sys.argv[4])\n"
    )
    root, run, driver = store.root, store.runroot, store.driver_name
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            stall,
            str(root),
            str(run),
            driver,
            f"oci:{layout}:v1",
            built.layer_digests[2],
        ]
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(root.glob("tar-split/*.tsz"))) < 3:
            assert child.poll() is None, "the import ended before its top layer"
            assert time.monotonic() < deadline, "the import never reached its top layer"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    with laminae.open_store(root, runroot=run, driver=driver) as again:
        assert again.layers() == [] and again.images() == []
        assert again.check().ok
        assert list(root.glob("tar-split/*")) == []
        assert list((root / "tmp").iterdir()) == []
