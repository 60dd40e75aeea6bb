"""docker-archive (``docker save``): laminae's source and sink, hand-built archives of every
vintage, and skopeo on the other side."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from imagebuild import BuiltImage, copy_image, digest, read_blob, resolve_manifest, write_layout
from tarbuild import make_tar
from tools import needs, run_skopeo

from laminae._exceptions import InvalidArgument, NotFound, Unsupported
from laminae.images._dockerarchive import DockerArchiveSink, DockerArchiveSource
from laminae.images._image import (
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_LAYER,
    MEDIA_DOCKER_LAYER_GZIP,
    MEDIA_DOCKER_MANIFEST,
    Descriptor,
    parse_config,
)
from laminae.images._layout import OCILayoutSource

LAYERS = [
    make_tar({"etc/os-release": b"ID=test\n", "bin/sh": b"\x7fELF" + bytes(3000)}, dirs=["etc"]),
    make_tar({"app/data": b"x" * 70_000}, whiteouts=["etc/os-release"]),
]
CONFIG = json.dumps(
    {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [digest(layer) for layer in LAYERS]},
    }
).encode()

skopeo = needs("skopeo")


def write_archive(path: Path, members: dict[str, bytes], links: dict[str, str] = {}) -> None:  # noqa: B006
    """A tar of ``members`` (name: bytes) and symbolic ``links`` (name: target)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)


def hex_of(data: bytes) -> str:
    return digest(data).removeprefix("sha256:")


@pytest.fixture
def plain_image(tmp_path: Path) -> BuiltImage:
    """An image with uncompressed layers, as a docker-archive holds them."""
    return write_layout(tmp_path / "A", LAYERS, compression="none")


def members_of(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


# --- our sink, our source -----------------------------------------------------------------


def test_sink_writes_what_docker_load_reads_and_the_source_reads_it_back(
    tmp_path: Path, plain_image: BuiltImage
) -> None:
    archive = tmp_path / "E.tar"
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        DockerArchiveSink(archive, "example.com/app:v1") as sink,
    ):
        assert sink.docker_media_types
        copy_image(source, sink, tmp_path / "work")
    members = members_of(archive)
    layer_names = [f"{d[7:]}/layer.tar" for d in plain_image.diff_ids]
    config_name = f"{plain_image.config_digest[7:]}.json"
    assert json.loads(members["manifest.json"]) == [
        {"Config": config_name, "RepoTags": ["example.com/app:v1"], "Layers": layer_names}
    ]
    assert json.loads(members["repositories"]) == {
        "example.com/app": {"v1": plain_image.diff_ids[-1][7:]}
    }
    assert [members[n] for n in layer_names] == LAYERS
    assert members[config_name] == plain_image.config
    with DockerArchiveSource(archive, "example.com/app:v1") as source:
        raw, media_type = source.resolve()
        assert media_type == MEDIA_DOCKER_MANIFEST
        manifest = resolve_manifest(source)
        assert manifest.config == Descriptor(
            MEDIA_DOCKER_CONFIG, plain_image.config_digest, len(plain_image.config)
        )
        assert [(d.media_type, d.digest) for d in manifest.layers] == [
            (MEDIA_DOCKER_LAYER, d) for d in plain_image.diff_ids
        ]
        assert [read_blob(source, d) for d in manifest.layers] == LAYERS
        assert source.fetch_manifest(Descriptor(media_type, digest(raw), len(raw))) == raw


def test_docker_hub_names_are_written_familiar_and_matched_normalised(
    tmp_path: Path, plain_image: BuiltImage
) -> None:
    archive = tmp_path / "E.tar"
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        DockerArchiveSink(archive, "docker.io/library/busybox") as sink,
    ):
        copy_image(source, sink, tmp_path / "work")
    assert json.loads(members_of(archive)["manifest.json"])[0]["RepoTags"] == ["busybox:latest"]
    for reference in ("busybox", "busybox:latest", "docker.io/library/busybox:latest", "@0", None):
        with DockerArchiveSource(archive, reference) as source:
            assert resolve_manifest(source).config.digest == plain_image.config_digest


def test_sink_refuses_compressed_layers_and_leaves_no_file(tmp_path: Path) -> None:
    write_layout(tmp_path / "A", LAYERS, compression="gzip")
    out = tmp_path / "out"
    out.mkdir()
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        DockerArchiveSink(out / "E.tar", "app:v1") as sink,
        pytest.raises(InvalidArgument, match="gzip-compressed"),
    ):
        copy_image(source, sink, tmp_path / "work")
    assert list(out.iterdir()) == []


def test_sink_refuses_references_that_are_no_tag(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        DockerArchiveSink(tmp_path / "E.tar", "@0")
    with pytest.raises(InvalidArgument, match="not a digest"):
        DockerArchiveSink(tmp_path / "E.tar", "app@sha256:" + "a" * 64)
    assert list(tmp_path.iterdir()) == []


# --- archives of every vintage ------------------------------------------------------------


def test_legacy_archive_with_random_layer_ids_and_a_linked_layer(tmp_path: Path) -> None:
    # Docker before 25: <v1 id>/layer.tar, ids unrelated to content; a layer saved twice is a
    # symlink to the first copy.
    first, second, again = "1" * 64, "2" * 64, "3" * 64
    archive = tmp_path / "save.tar"
    config_name = f"{hex_of(CONFIG)}.json"
    manifest = [
        {
            "Config": config_name,
            "RepoTags": ["busybox:latest"],
            "Layers": [f"{first}/layer.tar", f"{second}/layer.tar"],
        },
        {
            "Config": config_name,
            "RepoTags": ["example/again:1"],
            "Layers": [f"{again}/layer.tar", f"{second}/layer.tar"],
        },
    ]
    write_archive(
        archive,
        {
            f"{first}/layer.tar": LAYERS[0],
            f"{second}/layer.tar": LAYERS[1],
            config_name: CONFIG,
            "manifest.json": json.dumps(manifest).encode(),
            "repositories": b"{}",
        },
        links={f"{again}/layer.tar": f"../{first}/layer.tar"},
    )
    with DockerArchiveSource(archive, "busybox") as source:
        assert source.repo_tags == ("busybox:latest",)
    for reference in ("busybox", "docker.io/library/busybox:latest", "example/again:1", "@1"):
        with DockerArchiveSource(archive, reference) as source:
            manifest_ = resolve_manifest(source)
            assert manifest_.config.digest == digest(CONFIG)
            assert [d.digest for d in manifest_.layers] == [digest(x) for x in LAYERS]
            assert [d.size for d in manifest_.layers] == [len(x) for x in LAYERS]
            assert [read_blob(source, d) for d in manifest_.layers] == LAYERS
            config = parse_config(read_blob(source, manifest_.config), what="config")
            assert config.diff_ids == tuple(d.digest for d in manifest_.layers)


def test_docker_25_archive_with_an_oci_layout_inside(tmp_path: Path) -> None:
    blobs = {f"blobs/sha256/{hex_of(x)}": x for x in (*LAYERS, CONFIG)}
    manifest = [
        {
            "Config": f"blobs/sha256/{hex_of(CONFIG)}",
            "RepoTags": ["app:v2"],
            "Layers": [f"blobs/sha256/{hex_of(x)}" for x in LAYERS],
        }
    ]
    archive = tmp_path / "save.tar"
    write_archive(
        archive,
        {
            **blobs,
            "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
            "index.json": b'{"schemaVersion":2,"manifests":[]}',
            "manifest.json": json.dumps(manifest).encode(),
        },
    )
    with DockerArchiveSource(archive, "app:v2") as source:
        manifest_ = resolve_manifest(source)
        assert [d.digest for d in manifest_.layers] == [digest(x) for x in LAYERS]
        assert [read_blob(source, d) for d in manifest_.layers] == LAYERS


def test_compressed_layer_members_are_sniffed(tmp_path: Path) -> None:
    blob = gzip.compress(LAYERS[0], mtime=0)
    manifest = [{"Config": "c.json", "RepoTags": None, "Layers": ["l/layer.tar"]}]
    archive = tmp_path / "save.tar"
    write_archive(
        archive,
        {"l/layer.tar": blob, "c.json": CONFIG, "manifest.json": json.dumps(manifest).encode()},
    )
    with DockerArchiveSource(archive) as source:
        (layer,) = resolve_manifest(source).layers
        assert (layer.media_type, layer.digest, layer.size) == (
            MEDIA_DOCKER_LAYER_GZIP,
            digest(blob),
            len(blob),
        )
        assert read_blob(source, layer) == blob


def test_xz_layer_member_is_unsupported_naming_it(tmp_path: Path) -> None:
    manifest = [{"Config": "c.json", "RepoTags": [], "Layers": ["l/layer.tar"]}]
    archive = tmp_path / "save.tar"
    write_archive(
        archive,
        {
            "l/layer.tar": b"\xfd7zXZ\x00" + bytes(100),
            "c.json": CONFIG,
            "manifest.json": json.dumps(manifest).encode(),
        },
    )
    with (
        DockerArchiveSource(archive) as source,
        pytest.raises(Unsupported, match=re.escape("l/layer.tar")),
    ):
        source.resolve()


# --- choosing an image, errors -------------------------------------------------------------


@pytest.fixture
def two_images(tmp_path: Path) -> Path:
    manifest = [
        {"Config": "c.json", "RepoTags": ["a:1", "a:latest"], "Layers": ["l0"]},
        {"Config": "c.json", "RepoTags": ["b:2"], "Layers": ["l0", "l1"]},
    ]
    archive = tmp_path / "two.tar"
    write_archive(
        archive,
        {
            "l0": LAYERS[0],
            "l1": LAYERS[1],
            "c.json": CONFIG,
            "manifest.json": json.dumps(manifest).encode(),
        },
    )
    return archive


def test_reference_selects_an_image_and_errors_list_the_tags(two_images: Path) -> None:
    with DockerArchiveSource(two_images, "@1") as source:
        assert len(resolve_manifest(source).layers) == 2
    with DockerArchiveSource(two_images, "a") as source:
        assert len(resolve_manifest(source).layers) == 1
    with pytest.raises(
        InvalidArgument, match=r"holds 2 images; name one .* of: a:1, a:latest, b:2"
    ):
        DockerArchiveSource(two_images)
    with pytest.raises(
        NotFound, match=r"no image tagged 'c:3'; the archive has a:1, a:latest, b:2"
    ):
        DockerArchiveSource(two_images, "c:3")
    with pytest.raises(NotFound, match="no image @2; the archive holds 2"):
        DockerArchiveSource(two_images, "@2")


def test_unknown_blobs_and_manifests_are_not_found(two_images: Path) -> None:
    with DockerArchiveSource(two_images, "b:2") as source:
        other = Descriptor(MEDIA_DOCKER_MANIFEST, digest(b"other"), 5)
        with pytest.raises(NotFound):
            source.fetch_manifest(other)
        with pytest.raises(NotFound, match="no blob"), source.open_blob(other):
            pass


def test_missing_members_are_named(tmp_path: Path) -> None:
    archive = tmp_path / "save.tar"
    write_archive(archive, {"c.json": CONFIG})
    with pytest.raises(NotFound, match=r"not a docker-archive.*manifest\.json"):
        DockerArchiveSource(archive)
    manifest = [{"Config": "c.json", "RepoTags": [], "Layers": ["gone/layer.tar"]}]
    write_archive(archive, {"c.json": CONFIG, "manifest.json": json.dumps(manifest).encode()})
    with (
        DockerArchiveSource(archive) as source,
        pytest.raises(NotFound, match=re.escape("no member 'gone/layer.tar'")),
    ):
        source.resolve()
    write_archive(archive, {"manifest.json": b'{"Config": 1}'})
    with pytest.raises(InvalidArgument, match="not a JSON list"):
        DockerArchiveSource(archive)


# --- skopeo, the independent implementation -------------------------------------------------


@skopeo
@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_skopeo_docker_archive_reads_with_our_source(tmp_path: Path, compression: str) -> None:
    image = write_layout(tmp_path / "A", LAYERS, compression=compression)
    archive = tmp_path / "C.tar"
    run_skopeo("copy", f"oci:{tmp_path / 'A'}:v1", f"docker-archive:{archive}:example/app:v1")
    for reference in ("example/app:v1", "docker.io/example/app:v1", None):
        with DockerArchiveSource(archive, reference) as source:
            manifest = resolve_manifest(source)
            assert manifest.config.digest == image.config_digest
            assert tuple(d.digest for d in manifest.layers) == image.diff_ids
            assert [read_blob(source, d) for d in manifest.layers] == LAYERS
            assert read_blob(source, manifest.config) == image.config


@skopeo
def test_skopeo_reads_our_docker_archive(tmp_path: Path, plain_image: BuiltImage) -> None:
    archive = tmp_path / "E.tar"
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        DockerArchiveSink(archive, "example/app:v1") as sink,
    ):
        copy_image(source, sink, tmp_path / "work")
    # skopeo finds the image by its RepoTag.
    info = json.loads(run_skopeo("inspect", f"docker-archive:{archive}:example/app:v1"))
    assert tuple(info["Layers"]) == plain_image.diff_ids
    run_skopeo("copy", f"docker-archive:{archive}", f"oci:{tmp_path / 'D'}:x")
    with OCILayoutSource(tmp_path / "D", "x") as source:
        manifest = resolve_manifest(source)
        config = parse_config(read_blob(source, manifest.config), what="config")
        assert config.diff_ids == plain_image.diff_ids
        assert config.container_config["Cmd"] == ["/bin/sh"]
