"""The example image shipped in examples/images: reproducible, readable by skopeo, importable.

``hello-image.oci.tar`` is what ``make-hello-image.py`` builds, byte for byte; skopeo, an
independent reader, accepts it for both platforms; and laminae imports it into a store where
the merged tree has what the three layers say (the whiteout applied, the hard link one inode,
the symlink's target, the empty mount points a runtime needs).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from tools import needs

import laminae

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"
BUILDER = EXAMPLES / "make-hello-image.py"
IMAGE = EXAMPLES / "hello-image.oci.tar"
BASE_LAYER = EXAMPLES / "hello-layer.tar.gz"
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())

skopeo = needs("skopeo")


@pytest.fixture(scope="module")
def builder() -> ModuleType:
    """make-hello-image.py as a module (its name has dashes, so not through import)."""
    spec = importlib.util.spec_from_file_location("make_hello_image", BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def archive_member(name: str) -> bytes:
    """One member of the shipped archive (it is 20 KiB: reading it whole is fine here)."""
    with tarfile.open(IMAGE) as tar:
        member = tar.extractfile(name)
        assert member is not None, name
        return member.read()


def blob(digest: str) -> bytes:
    return archive_member("blobs/sha256/" + digest.removeprefix("sha256:"))


def run_builder(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=False
    )


# --- reproducible ---------------------------------------------------------------------------


def test_shipped_image_is_what_the_script_builds() -> None:
    result = run_builder(BUILDER, "--check")
    assert result.returncode == 0, result.stderr
    assert "hello-image.oci.tar" in result.stdout


def test_check_fails_when_the_shipped_image_differs(tmp_path: Path) -> None:
    # A copy of the script checks the files beside it: give it a tampered image.
    script = tmp_path / BUILDER.name
    shutil.copy(BUILDER, script)
    shutil.copy(BASE_LAYER, tmp_path / BASE_LAYER.name)
    tampered = bytearray(IMAGE.read_bytes())
    tampered[-1] ^= 1
    (tmp_path / IMAGE.name).write_bytes(bytes(tampered))
    result = run_builder(script, "--check")
    assert result.returncode == 1
    assert "hello-image.oci.tar differs" in result.stderr
    assert (tmp_path / IMAGE.name).read_bytes() == bytes(tampered)  # --check writes nothing


def test_build_is_deterministic_and_small(builder: ModuleType) -> None:
    first = builder.build_image()
    assert builder.build_image() == first
    archive, base = first
    assert len(archive) < 100 * 1024
    assert base == BASE_LAYER.read_bytes()


def test_every_entry_is_root_owned_dated_and_sorted(builder: ModuleType) -> None:
    top = json.loads(archive_member("index.json"))
    index = json.loads(blob(top["manifests"][0]["digest"]))
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    for layer in manifest["layers"]:
        with tarfile.open(fileobj=io.BytesIO(blob(layer["digest"]))) as tar:
            members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        for member in members:
            assert (member.uid, member.gid, member.mtime) == (0, 0, builder.MTIME), member.name


# --- the documents --------------------------------------------------------------------------


def test_index_names_hello_for_amd64_and_arm64() -> None:
    top = json.loads(archive_member("index.json"))
    assert json.loads(archive_member("oci-layout")) == {"imageLayoutVersion": "1.0.0"}
    [entry] = top["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "hello"
    assert entry["mediaType"] == "application/vnd.oci.image.index.v1+json"
    index = json.loads(blob(entry["digest"]))
    platforms = [m["platform"] for m in index["manifests"]]
    assert platforms == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    manifests = [json.loads(blob(m["digest"])) for m in index["manifests"]]
    # One set of layers, one config per platform.
    assert manifests[0]["layers"] == manifests[1]["layers"]
    assert len(manifests[0]["layers"]) == 3
    assert manifests[0]["layers"][0]["digest"] == sha256(BASE_LAYER.read_bytes())
    for manifest, wanted in zip(manifests, platforms, strict=True):
        config = json.loads(blob(manifest["config"]["digest"]))
        assert config["architecture"] == wanted["architecture"]
        assert config["config"]["Cmd"] == ["/bin/hello"]
        assert len(config["history"]) == len(config["rootfs"]["diff_ids"]) == 3


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- skopeo, an independent reader ----------------------------------------------------------


@skopeo
@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_skopeo_inspects_the_image(arch: str) -> None:
    result = subprocess.run(
        ["skopeo", "--override-arch", arch, "inspect", f"oci-archive:{IMAGE}:hello"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    inspected = json.loads(result.stdout)
    assert inspected["Architecture"] == arch
    assert inspected["Os"] == "linux"
    assert len(inspected["Layers"]) == 3
    assert inspected["Layers"][0] == sha256(BASE_LAYER.read_bytes())
    assert "PATH=/usr/local/bin:/usr/bin:/bin" in inspected["Env"]


# --- imported into a store ------------------------------------------------------------------


@pytest.fixture(params=["vfs", "overlay"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[laminae.Store]:
    with laminae.open_store(tmp_path / "root", runroot=tmp_path / "run", driver=request.param) as s:
        yield s
        for layer in s.layers():
            if layer.mount_count:
                s.unmount(layer.id, force=True)


@pytest.mark.root
def test_imported_tree_has_what_the_layers_say(store: laminae.Store) -> None:
    image = store.import_image(f"oci-archive:{IMAGE}:hello")
    assert image.names == ("hello:latest",)
    assert json.loads(image.config or b"{}")["architecture"] == HOST_ARCH
    assert len(store.image_layers("hello")) == 3
    assert image.top_layer is not None
    store.create_layer("work", parent=image.top_layer)
    root = store.mount("work")
    try:
        # Layer 1: the base.
        assert os.readlink(root / "bin") == "usr/bin"
        assert (root / "bin" / "hello").read_bytes().startswith(b"#!/bin/sh\n")
        assert (root / "etc" / "passwd").read_text() == "root:x:0:0:root:/root:/bin/sh\n"
        assert stat.S_IMODE((root / "tmp").lstat().st_mode) == 0o1777
        assert stat.S_IMODE((root / "root").lstat().st_mode) == 0o700
        assert stat.S_IMODE((root / "usr/bin/hello").lstat().st_mode) == 0o755
        # The empty mount points a runtime mounts on, and the one for the host's tools.
        for name in ("dev", "proc", "sys", "opt/host"):
            st = (root / name).lstat()
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755, name
            assert not any((root / name).iterdir()), name
        # Layer 2: a file added, /etc/issue whited out (and the whiteout itself not shown).
        assert (root / "usr/share/hello/greetings.txt").read_text().split() == [
            "hello",
            "hallo",
            "bonjour",
            "hola",
        ]
        assert not (root / "etc" / "issue").exists()
        assert not (root / "etc" / ".wh.issue").exists()
        # Layer 3: a hard link (one inode, two links) and a relative symlink.
        greet = (root / "usr/local/bin/greet").lstat()
        hi = (root / "usr/local/bin/hi").lstat()
        assert (greet.st_ino, greet.st_dev) == (hi.st_ino, hi.st_dev)
        assert greet.st_nlink == 2
        assert os.readlink(root / "etc" / "greetings") == "../usr/share/hello/greetings.txt"
        assert (root / "etc" / "greetings").read_text().startswith("hello\n")
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                st = (Path(dirpath) / name).lstat()
                assert (st.st_uid, st.st_gid) == (0, 0), Path(dirpath) / name
    finally:
        store.unmount("work")


@pytest.mark.root
def test_both_platforms_share_the_layers(store: laminae.Store) -> None:
    amd64 = store.import_image(
        f"oci-archive:{IMAGE}:hello", names=["hello:amd64"], platform="linux/amd64"
    )
    arm64 = store.import_image(
        f"oci-archive:{IMAGE}:hello", names=["hello:arm64"], platform="linux/arm64"
    )
    assert amd64.id != arm64.id  # a config per platform
    assert amd64.top_layer == arm64.top_layer  # the same three layers, stored once
    assert json.loads(arm64.config or b"{}")["architecture"] == "arm64"
    assert len(store.layers()) == 3
