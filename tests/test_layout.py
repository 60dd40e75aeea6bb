"""OCI image layouts and oci-archives: laminae's sources and sinks, and skopeo on the other side."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import tarfile
import threading
from pathlib import Path

import pytest
from imagebuild import BuiltImage, copy_image, digest, read_blob, resolve_manifest, write_layout
from tarbuild import make_tar
from tools import needs, run_skopeo

from laminae._exceptions import CorruptLayer, InvalidArgument, NotFound
from laminae.images._archivefile import ArchiveMembers
from laminae.images._image import (
    ANNOTATION_REF_NAME,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    Descriptor,
)
from laminae.images._layout import OCIArchiveSink, OCIArchiveSource, OCILayoutSink, OCILayoutSource

LAYERS = [
    make_tar({"etc/os-release": b"ID=test\n", "bin/sh": b"\x7fELF" + bytes(3000)}, dirs=["etc"]),
    make_tar({"app/data": b"x" * 70_000}, whiteouts=["etc/os-release"]),
]

skopeo = needs("skopeo")


@pytest.fixture
def image(tmp_path: Path) -> BuiltImage:
    return write_layout(tmp_path / "A", LAYERS)


def blob_files(layout: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- reading a layout ---------------------------------------------------------------------


def test_layout_source_resolves_the_manifest_and_serves_blobs(
    tmp_path: Path, image: BuiltImage
) -> None:
    with OCILayoutSource(tmp_path / "A", "v1") as source:
        raw, media_type = source.resolve()
        assert (raw, media_type) == (image.manifest, MEDIA_OCI_MANIFEST)
        manifest = resolve_manifest(source)
        assert read_blob(source, manifest.config) == image.config
        assert [read_blob(source, d) for d in manifest.layers] == list(image.layers)
        assert source.describe() == f"oci:{tmp_path / 'A'}:v1"


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_layout_round_trip_keeps_every_blob_byte_identical(
    tmp_path: Path, compression: str
) -> None:
    built = write_layout(tmp_path / "A", LAYERS, compression=compression)
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        OCILayoutSink(tmp_path / "C", "copy") as sink,
    ):
        manifest = copy_image(source, sink, tmp_path / "work")
    assert manifest.digest == built.manifest_digest
    assert blob_files(tmp_path / "C") == blob_files(tmp_path / "A")
    index = json.loads((tmp_path / "C" / "index.json").read_bytes())
    assert index["manifests"] == [
        {
            "mediaType": MEDIA_OCI_MANIFEST,
            "digest": built.manifest_digest,
            "size": len(built.manifest),
            "annotations": {ANNOTATION_REF_NAME: "copy"},
        }
    ]
    assert json.loads((tmp_path / "C" / "oci-layout").read_bytes()) == {
        "imageLayoutVersion": "1.0.0"
    }
    with OCILayoutSource(tmp_path / "C", "copy") as again:
        assert again.resolve()[0] == built.manifest


def test_oci_archive_round_trip(tmp_path: Path, image: BuiltImage) -> None:
    archive = tmp_path / "B.tar"
    with OCILayoutSource(tmp_path / "A", "v1") as source, OCIArchiveSink(archive, "v1") as sink:
        copy_image(source, sink, tmp_path / "work")
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert {"oci-layout", "index.json"} <= set(names)
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    with OCIArchiveSource(archive, "v1") as source, OCILayoutSink(tmp_path / "C", "v1") as sink:
        assert source.resolve() == (image.manifest, MEDIA_OCI_MANIFEST)
        copy_image(source, sink, tmp_path / "work")
    assert blob_files(tmp_path / "C") == blob_files(tmp_path / "A")


def test_multi_platform_index_is_resolved_to_the_nested_index(tmp_path: Path) -> None:
    built = write_layout(tmp_path / "A", LAYERS, multi_platform=True)
    assert built.index_digest is not None
    with OCILayoutSource(tmp_path / "A", "v1") as source:
        raw, media_type = source.resolve()
        assert media_type == MEDIA_OCI_INDEX
        assert digest(raw) == built.index_digest
        for platform, manifest_digest in built.platforms.items():
            assert resolve_manifest(source, platform).digest == manifest_digest
        with OCILayoutSink(tmp_path / "C", "arm") as sink:
            copied = copy_image(source, sink, tmp_path / "work", platform="linux/arm64/v8")
    assert copied.digest == built.platforms["linux/arm64/v8"]
    with OCILayoutSource(tmp_path / "C", "arm") as source:
        assert digest(source.resolve()[0]) == copied.digest


def test_entries_of_one_name_per_platform_read_as_an_index(tmp_path: Path) -> None:
    built = write_layout(tmp_path / "A", LAYERS, multi_platform=True)
    assert built.index_digest is not None
    index_path = tmp_path / "A" / "index.json"
    nested = json.loads((tmp_path / "A" / "blobs" / "sha256" / built.index_digest[7:]).read_bytes())
    for entry in nested["manifests"]:
        entry["annotations"] = {ANNOTATION_REF_NAME: "split"}
    index_path.write_text(json.dumps({"schemaVersion": 2, "manifests": nested["manifests"]}))
    with OCILayoutSource(tmp_path / "A", "split") as source:
        assert source.resolve()[1] == MEDIA_OCI_INDEX
        assert resolve_manifest(source, "linux/amd64").digest == built.manifest_digest


# --- choosing an image --------------------------------------------------------------------


def test_reference_selects_by_ref_name_tag_suffix_and_position(tmp_path: Path) -> None:
    first = write_layout(tmp_path / "A", LAYERS[:1], ref="v1")
    second = write_layout(tmp_path / "A", LAYERS, ref="example.com/app:v2")
    layout = tmp_path / "A"
    cases = {
        "v1": first,
        "example.com/app:v2": second,
        "v2": second,
        "@0": first,
        "@1": second,
    }
    for reference, built in cases.items():
        with OCILayoutSource(layout, reference) as source:
            assert source.resolve()[0] == built.manifest, reference


def test_unknown_reference_lists_the_names_there_are(tmp_path: Path) -> None:
    write_layout(tmp_path / "A", LAYERS, ref="v1")
    write_layout(tmp_path / "A", LAYERS[:1], ref="other")
    with (
        OCILayoutSource(tmp_path / "A", "v9") as source,
        pytest.raises(NotFound, match=r"no image named 'v9'; it has other, v1"),
    ):
        source.resolve()
    with (
        OCILayoutSource(tmp_path / "A") as source,
        pytest.raises(InvalidArgument, match="2 images match; name one of: other, v1"),
    ):
        source.resolve()


def test_no_reference_selects_the_only_image(tmp_path: Path) -> None:
    built = write_layout(tmp_path / "A", LAYERS, ref=None)
    with OCILayoutSource(tmp_path / "A") as source:
        assert source.resolve()[0] == built.manifest
        assert source.describe() == f"oci:{tmp_path / 'A'}"


# --- errors -------------------------------------------------------------------------------


def test_missing_blob_is_not_found_naming_its_path(tmp_path: Path, image: BuiltImage) -> None:
    blob = tmp_path / "A" / "blobs" / "sha256" / image.layer_digests[1][7:]
    blob.unlink()
    with OCILayoutSource(tmp_path / "A", "v1") as source:
        manifest = resolve_manifest(source)
        with pytest.raises(
            NotFound, match=f"blob {image.layer_digests[1]} is missing.*{re.escape(str(blob))}"
        ):
            read_blob(source, manifest.layers[1])
    (tmp_path / "A" / "blobs" / "sha256" / image.manifest_digest[7:]).unlink()
    with OCILayoutSource(tmp_path / "A", "v1") as source, pytest.raises(NotFound, match="missing"):
        source.resolve()


def test_missing_layout_files_are_named(tmp_path: Path, image: BuiltImage) -> None:
    layout = tmp_path / "A"
    with pytest.raises(NotFound, match="no layout directory"):
        OCILayoutSource(tmp_path / "nothing", "v1")
    (layout / "index.json").unlink()
    with OCILayoutSource(layout, "v1") as source, pytest.raises(NotFound, match=r"index\.json"):
        source.resolve()
    (layout / "oci-layout").unlink()
    with (
        OCILayoutSource(layout, "v1") as source,
        pytest.raises(
            NotFound, match=f"not an OCI image layout.*{re.escape(str(layout / 'oci-layout'))}"
        ),
    ):
        source.resolve()


def test_malformed_index_is_invalid(tmp_path: Path, image: BuiltImage) -> None:
    (tmp_path / "A" / "index.json").write_text("{not json")
    with OCILayoutSource(tmp_path / "A", "v1") as source, pytest.raises(InvalidArgument):
        source.resolve()


@pytest.mark.parametrize(
    "bad", ["sha256:../../../../etc/passwd", "sha256/../../x", "../sha256:" + "a" * 64]
)
def test_digest_that_climbs_out_never_becomes_a_path(
    tmp_path: Path, image: BuiltImage, bad: str
) -> None:
    index_path = tmp_path / "A" / "index.json"
    index = json.loads(index_path.read_bytes())
    index["manifests"][0]["digest"] = bad
    index_path.write_text(json.dumps(index))
    with OCILayoutSource(tmp_path / "A", "v1") as source:
        with pytest.raises(InvalidArgument, match="digest"):
            source.resolve()
        with (
            pytest.raises(InvalidArgument, match="digest"),
            source.open_blob(Descriptor(MEDIA_OCI_MANIFEST, bad, 1)),
        ):
            pass


def test_manifest_that_does_not_match_its_digest_is_corrupt(
    tmp_path: Path, image: BuiltImage
) -> None:
    blob = tmp_path / "A" / "blobs" / "sha256" / image.manifest_digest[7:]
    blob.write_bytes(image.manifest.replace(b"schemaVersion", b"schemaVersiom"))
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        pytest.raises(CorruptLayer, match=image.manifest_digest),
    ):
        source.resolve()


def test_archive_that_is_no_tar_is_invalid(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x01" * 2048)
    with pytest.raises(InvalidArgument, match=re.escape(f"oci-archive:{junk}")):
        OCIArchiveSource(junk, "v1")
    with pytest.raises(NotFound):
        OCIArchiveSource(tmp_path / "missing.tar", "v1")


# --- writing a layout ---------------------------------------------------------------------


def test_sink_replaces_the_entry_of_its_name_and_keeps_the_others(tmp_path: Path) -> None:
    layout = tmp_path / "C"
    other = write_layout(layout, LAYERS[:1], ref="other")
    old = write_layout(layout, LAYERS[:1], ref="v1", compression="zstd")
    old_blobs = blob_files(layout)
    new = write_layout(tmp_path / "A", LAYERS)
    with OCILayoutSource(tmp_path / "A", "v1") as source, OCILayoutSink(layout, "v1") as sink:
        copy_image(source, sink, tmp_path / "work")
    entries = json.loads((layout / "index.json").read_bytes())["manifests"]
    assert [(e["annotations"][ANNOTATION_REF_NAME], e["digest"]) for e in entries] == [
        ("other", other.manifest_digest),
        ("v1", new.manifest_digest),
    ]
    assert old_blobs.items() <= blob_files(layout).items()  # unreferenced blobs stay
    with OCILayoutSource(layout, "v1") as source:
        assert source.resolve()[0] == new.manifest
    assert old.manifest_digest != new.manifest_digest


def test_sinks_committing_at_once_keep_every_entry(tmp_path: Path, image: BuiltImage) -> None:
    layout = tmp_path / "C"
    errors: list[BaseException] = []

    def copy(n: int) -> None:
        try:
            with (
                OCILayoutSource(tmp_path / "A", "v1") as source,
                OCILayoutSink(layout, f"ref{n}") as sink,
            ):
                copy_image(source, sink, tmp_path / f"work{n}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=copy, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    entries = json.loads((layout / "index.json").read_bytes())["manifests"]
    assert sorted(e["annotations"][ANNOTATION_REF_NAME] for e in entries) == [
        f"ref{n}" for n in range(8)
    ]
    assert [p.name for p in layout.rglob("*") if ".tmp-" in p.name] == []


def test_sink_closed_without_commit_leaves_the_layout_as_it_was(
    tmp_path: Path, image: BuiltImage
) -> None:
    layout = tmp_path / "C"
    write_layout(layout, LAYERS[:1], ref="other", compression="none")
    before = listing(layout)
    index_before = (layout / "index.json").read_bytes()
    with OCILayoutSource(tmp_path / "A", "v1") as source, OCILayoutSink(layout, "v1") as sink:
        manifest = resolve_manifest(source)
        for desc in manifest.layers:
            path = tmp_path / "blob"
            path.write_bytes(read_blob(source, desc))
            sink.put_blob(desc, path)
        assert all(sink.has_blob(d) for d in manifest.layers)
    assert listing(layout) == before
    assert (layout / "index.json").read_bytes() == index_before


def test_sink_closed_without_commit_removes_the_layout_it_created(
    tmp_path: Path, image: BuiltImage
) -> None:
    target = tmp_path / "new" / "layout"
    with OCILayoutSource(tmp_path / "A", "v1") as source, OCILayoutSink(target, "v1") as sink:
        desc = resolve_manifest(source).layers[0]
        (tmp_path / "blob").write_bytes(read_blob(source, desc))
        sink.put_blob(desc, tmp_path / "blob")
        assert target.exists()
    assert not (tmp_path / "new").exists()


def test_sink_refuses_a_directory_that_is_not_a_layout(tmp_path: Path) -> None:
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "file").write_text("x")
    with pytest.raises(InvalidArgument, match="not an OCI layout"):
        OCILayoutSink(tmp_path / "C", "v1")
    with pytest.raises(InvalidArgument, match="cannot name"):
        OCILayoutSink(tmp_path / "D", "@0")


def test_archive_sink_closed_without_commit_leaves_no_file(
    tmp_path: Path, image: BuiltImage
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with OCILayoutSource(tmp_path / "A", "v1") as source, OCIArchiveSink(out / "B.tar") as sink:
        desc = resolve_manifest(source).layers[0]
        (tmp_path / "blob").write_bytes(read_blob(source, desc))
        sink.put_blob(desc, tmp_path / "blob")
        assert sink.has_blob(desc)
        assert len(list(out.iterdir())) == 1  # the temporary archive
    assert list(out.iterdir()) == []


# --- archives read in place ---------------------------------------------------------------


def test_archive_members_are_found_where_tarfile_finds_them(tmp_path: Path) -> None:
    long_dir = "d" * 120
    files = {
        "./oci-layout": b"{}",
        f"{long_dir}/{'f' * 150}": b"long name" * 100,
        "empty": b"",
        "blocks": bytes(1024),
        "blobs/sha256/" + "a" * 64: os.urandom(5000),
    }
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"t{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("dir/link")
            link.type, link.linkname = tarfile.SYMTYPE, "../blocks"
            tar.addfile(link)
            hard = tarfile.TarInfo("hard")
            hard.type, hard.linkname = tarfile.LNKTYPE, "empty"
            tar.addfile(hard)
        members = ArchiveMembers(path, what="test")
        try:
            with tarfile.open(path) as tar:
                for info in tar.getmembers():
                    if info.isfile():
                        name = info.name.removeprefix("./")
                        assert members.find(name) == (info.offset_data, info.size), name
                        with members.open(name) as stream:
                            assert stream.read() == files[info.name]
            assert members.open("dir/link").read() == bytes(1024)
            assert members.find("hard") == members.find("empty")
            with pytest.raises(NotFound, match="no member 'absent'"):
                members.open("absent")
        finally:
            members.close()


def test_member_stream_reads_as_much_as_asked_and_seeks(tmp_path: Path) -> None:
    data = os.urandom((5 << 20) + 3)
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("big")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    members = ArchiveMembers(path, what="test")
    try:
        with members.open("big") as stream:
            assert stream.read(3 << 20) == data[: 3 << 20]  # more than one pread
            assert stream.seek(-10, io.SEEK_END) == len(data) - 10
            assert stream.read() == data[-10:]
            assert stream.read(1) == b""
            stream.seek(7)
            assert stream.read(100) == data[7:107]
    finally:
        members.close()


def test_concurrent_reads_of_two_blobs_of_one_archive(tmp_path: Path) -> None:
    blobs = [os.urandom(3 << 20), os.urandom((2 << 20) + 7)]
    path = tmp_path / "two.tar"
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(blobs):
            info = tarfile.TarInfo(f"blob{i}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = ArchiveMembers(path, what="test")
    rounds = len(blobs[1]) // 65_536  # chunks both threads read in lock step
    step = threading.Barrier(2)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def read(i: int) -> None:
        try:
            hasher = hashlib.sha256()
            with members.open(f"blob{i}") as stream:
                for n in itertools.count():
                    if n < rounds:
                        step.wait(timeout=10)
                    chunk = stream.read(65_536)
                    if not chunk:
                        break
                    hasher.update(chunk)
            results[i] = hasher.hexdigest()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    members.close()
    assert not errors
    assert results == {i: hashlib.sha256(data).hexdigest() for i, data in enumerate(blobs)}


# --- skopeo, the independent implementation -------------------------------------------------


@skopeo
def test_skopeo_oci_archive_reads_with_our_source(tmp_path: Path, image: BuiltImage) -> None:
    archive = tmp_path / "B.tar"
    run_skopeo("copy", f"oci:{tmp_path / 'A'}:v1", f"oci-archive:{archive}:v1")
    with OCIArchiveSource(archive, "v1") as source:
        manifest = resolve_manifest(source)
        assert manifest.config.digest == image.config_digest
        assert tuple(d.digest for d in manifest.layers) == image.layer_digests
        assert read_blob(source, manifest.config) == image.config
        assert [read_blob(source, d) for d in manifest.layers] == list(image.layers)


@skopeo
def test_skopeo_reads_our_layout(tmp_path: Path, image: BuiltImage) -> None:
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        OCILayoutSink(tmp_path / "C", "x") as sink,
    ):
        copy_image(source, sink, tmp_path / "work")
    assert run_skopeo("inspect", "--raw", f"oci:{tmp_path / 'C'}:x").encode() == image.manifest
    # A copy reads and verifies every blob.
    run_skopeo("copy", f"oci:{tmp_path / 'C'}:x", f"oci:{tmp_path / 'D'}:y")
    assert blob_files(tmp_path / "D") == blob_files(tmp_path / "A")


@skopeo
def test_skopeo_reads_our_oci_archive(tmp_path: Path, image: BuiltImage) -> None:
    archive = tmp_path / "B.tar"
    with OCILayoutSource(tmp_path / "A", "v1") as source, OCIArchiveSink(archive, "v1") as sink:
        copy_image(source, sink, tmp_path / "work")
    info = json.loads(run_skopeo("inspect", f"oci-archive:{archive}:v1"))
    assert info["Digest"] == image.manifest_digest
    assert tuple(info["Layers"]) == image.layer_digests
    run_skopeo("copy", f"oci-archive:{archive}:v1", f"oci:{tmp_path / 'D'}:y")
    assert blob_files(tmp_path / "D") == blob_files(tmp_path / "A")
