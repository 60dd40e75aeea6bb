"""Image files that are not what they claim: FIFOs, devices and symbolic links where a layout
or an archive should hold a regular file, and JSON documents too large or nested too deep.

Every refusal must name the file (the blob's digest and its path) and must not block, follow
a link out of the layout, or tell anything about what a link points at. A test that opens a
FIFO runs the code under :func:`finishes`, which unblocks the FIFO and fails the test if the
code waits on it, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result
from imagebuild import BuiltImage, copy_image, digest, read_blob, resolve_manifest, write_layout
from tarbuild import make_tar

from laminae._exceptions import InvalidArgument, LimitExceeded
from laminae.cli._main import cli
from laminae.images._archivefile import ArchiveMembers
from laminae.images._dockerarchive import DockerArchiveSource
from laminae.images._image import (
    MAX_CONFIG_BYTES,
    MAX_JSON_DEPTH,
    MAX_MANIFEST_BYTES,
    MEDIA_OCI_INDEX,
    Platform,
    load_json,
    parse_config,
    parse_manifest,
)
from laminae.images._layout import OCIArchiveSource, OCILayoutSink, OCILayoutSource

LAYERS = [
    make_tar({"etc/os-release": b"ID=test\n", "bin/sh": b"\x7fELF" + bytes(3000)}, dirs=["etc"]),
    make_tar({"app/data": b"x" * 70_000}, whiteouts=["etc/os-release"]),
]
SECRET = b"root:$6$not-for-you:19000:0:99999:7:::\n" * 3
DEEP = 100_000

_T = TypeVar("_T")


# --- helpers ------------------------------------------------------------------------------


def finishes(call: Callable[[], _T], fifos: list[Path], timeout: float = 30.0) -> _T:
    """``call()``, in a thread; if it is still running after ``timeout`` seconds, it is
    waiting on a FIFO: open each of ``fifos`` for writing (which lets a reader blocked in
    ``open`` go on, to read end-of-file), wait for the thread, and fail the test."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="hostile-image", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for _ in range(600):
            for fifo in fifos:
                with contextlib.suppress(OSError):  # ENXIO: nobody is reading it right now
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(0.1)
            if not thread.is_alive():
                break
        pytest.fail(f"blocked on a FIFO for {timeout} seconds")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def blob_path(layout: Path, blob: str) -> Path:
    return layout / "blobs" / "sha256" / blob.removeprefix("sha256:")


def make_fifo(path: Path) -> Path:
    path.unlink()
    os.mkfifo(path)
    return path


def read_image(source: OCILayoutSource | OCIArchiveSource | DockerArchiveSource) -> None:
    """Everything an import reads: the manifest, the config, every layer."""
    manifest = resolve_manifest(source)
    for desc in (manifest.config, *manifest.layers):
        read_blob(source, desc)


@pytest.fixture
def image(tmp_path: Path) -> BuiltImage:
    return write_layout(tmp_path / "A", LAYERS, platform=str(Platform.host()))


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside every layout that the importing process can read."""
    path = tmp_path / "outside" / "shadow"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def assert_tells_nothing_of(message: str, target: Path, data: bytes) -> None:
    """The message names no part of a link's target: not its path, size or digest."""
    assert str(target) not in message
    assert not re.search(rf"\b{len(data)}\b", message), message
    assert hashlib.sha256(data).hexdigest() not in message


# --- (a) a FIFO, a device, a directory where a blob should be ----------------------------


@pytest.mark.parametrize("which", ["manifest", "config", "layer"])
def test_fifo_blob_is_refused_at_once_naming_it(
    tmp_path: Path, image: BuiltImage, which: str
) -> None:
    blob = {
        "manifest": image.manifest_digest,
        "config": image.config_digest,
        "layer": image.layer_digests[1],
    }[which]
    fifo = make_fifo(blob_path(tmp_path / "A", blob))
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        pytest.raises(
            InvalidArgument,
            match=re.escape(f"blob {blob} is a FIFO, not a regular file ({fifo})"),
        ),
    ):
        finishes(lambda: read_image(source), [fifo])


@pytest.mark.parametrize("name", ["index.json", "oci-layout"])
def test_fifo_index_or_layout_file_is_refused_at_once(
    tmp_path: Path, image: BuiltImage, name: str
) -> None:
    fifo = make_fifo(tmp_path / "A" / name)
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        pytest.raises(InvalidArgument, match=re.escape(f"{name} is a FIFO, not a regular file")),
    ):
        finishes(source.resolve, [fifo])


def test_directory_where_a_blob_should_be_is_refused(tmp_path: Path, image: BuiltImage) -> None:
    path = blob_path(tmp_path / "A", image.config_digest)
    path.unlink()
    path.mkdir()
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        pytest.raises(InvalidArgument, match="is a directory, not a regular file"),
    ):
        read_image(source)


@pytest.mark.root
def test_device_blob_is_refused_without_being_opened(tmp_path: Path, image: BuiltImage) -> None:
    path = blob_path(tmp_path / "A", image.layer_digests[0])
    path.unlink()
    # /dev/null's numbers (/dev/zero's would make a reader that opens it read for ever).
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        pytest.raises(
            InvalidArgument,
            match=re.escape(f"blob {image.layer_digests[0]} is a character device"),
        ),
    ):
        read_image(source)


def test_fifo_given_as_the_archive_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "image.tar"
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        finishes(lambda: OCIArchiveSource(fifo, "v1"), [fifo])
    with pytest.raises(InvalidArgument, match="not a regular file"):
        finishes(lambda: DockerArchiveSource(fifo), [fifo])


# --- (b) symbolic links --------------------------------------------------------------------


@pytest.mark.parametrize("which", ["manifest", "config", "layer"])
def test_blob_linked_out_of_the_layout_is_refused_telling_nothing_of_the_target(
    tmp_path: Path, image: BuiltImage, secret: Path, which: str
) -> None:
    blob = {
        "manifest": image.manifest_digest,
        "config": image.config_digest,
        "layer": image.layer_digests[0],
    }[which]
    path = blob_path(tmp_path / "A", blob)
    path.unlink()
    path.symlink_to(secret)
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        pytest.raises(InvalidArgument) as caught,
    ):
        read_image(source)
    message = str(caught.value)
    assert f"blob {blob} is a symbolic link, not a regular file ({path})" in message
    assert_tells_nothing_of(message, secret, SECRET)


def test_blob_linked_to_another_blob_of_the_layout_is_refused_too(
    tmp_path: Path, image: BuiltImage
) -> None:
    # Inside the layout or out of it, a link is followed nowhere (RESOLVE_NO_SYMLINKS).
    path = blob_path(tmp_path / "A", image.layer_digests[1])
    path.unlink()
    path.symlink_to(blob_path(tmp_path / "A", image.layer_digests[0]).name)
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        pytest.raises(InvalidArgument, match="is a symbolic link, not a regular file"),
    ):
        read_image(source)


def test_blob_directory_linked_out_of_the_layout_is_refused(
    tmp_path: Path, image: BuiltImage
) -> None:
    blobs = tmp_path / "A" / "blobs" / "sha256"
    blobs.rename(tmp_path / "elsewhere")
    blobs.symlink_to(tmp_path / "elsewhere")
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        pytest.raises(
            InvalidArgument,
            match=re.escape(
                f"blob {image.manifest_digest} is not inside the layout: blobs/sha256 is a "
                "symbolic link, not a directory"
            ),
        ),
    ):
        source.resolve()


def test_index_linked_out_of_the_layout_is_refused(
    tmp_path: Path, image: BuiltImage, secret: Path
) -> None:
    index = tmp_path / "A" / "index.json"
    secret.write_bytes(index.read_bytes())  # a valid index, to be sure it is not read
    index.unlink()
    index.symlink_to(secret)
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        pytest.raises(InvalidArgument, match=r"index\.json is a symbolic link"),
    ):
        source.resolve()


def test_sink_replaces_a_link_planted_at_a_blob_name_and_writes_nothing_through_it(
    tmp_path: Path, image: BuiltImage
) -> None:
    # The link points at a file of the blob's size: a sink that followed it would take the
    # blob for present, and leave the link for readers to follow.
    victim = tmp_path / "victim"
    victim.write_bytes(b"v" * len(image.layers[0]))
    destination = tmp_path / "C"
    planted = blob_path(destination, image.layer_digests[0])
    planted.parent.mkdir(parents=True)
    planted.symlink_to(victim)
    with OCILayoutSource(tmp_path / "A", "v1") as source, OCILayoutSink(destination) as sink:
        desc = resolve_manifest(source).layers[0]
        assert not sink.has_blob(desc)
        copy_image(source, sink, tmp_path / "work")
    assert victim.read_bytes() == b"v" * len(image.layers[0])
    assert not planted.is_symlink()
    assert planted.read_bytes() == image.layers[0]


def test_sink_refuses_an_index_linked_out_of_the_layout(
    tmp_path: Path, image: BuiltImage, secret: Path
) -> None:
    destination = tmp_path / "C"
    write_layout(destination, LAYERS[:1], ref="other")
    index = destination / "index.json"
    outside_index = index.read_bytes()
    secret.write_bytes(outside_index)
    index.unlink()
    index.symlink_to(secret)
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        OCILayoutSink(destination, "v1") as sink,
        pytest.raises(InvalidArgument, match=r"index\.json is a symbolic link"),
    ):
        copy_image(source, sink, tmp_path / "work")
    assert index.is_symlink()
    assert secret.read_bytes() == outside_index


def test_sink_writes_nothing_through_a_linked_blob_directory(
    tmp_path: Path, image: BuiltImage
) -> None:
    destination = tmp_path / "C"
    (destination / "blobs").mkdir(parents=True)
    outside = tmp_path / "outside-blobs"
    outside.mkdir()
    (destination / "blobs" / "sha256").symlink_to(outside)
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        OCILayoutSink(destination, "v1") as sink,
        pytest.raises(InvalidArgument, match="blobs/sha256 is a symbolic link, not a directory"),
    ):
        copy_image(source, sink, tmp_path / "work")
    assert list(outside.iterdir()) == []


# --- members of archives ------------------------------------------------------------------


def _entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 5
    return info


def oci_archive_with(tmp_path: Path, image: BuiltImage, blob: str, entry: tarfile.TarInfo) -> Path:
    """An oci-archive of layout A in which ``blob`` is ``entry`` (named for the blob)."""
    name = f"blobs/sha256/{blob.removeprefix('sha256:')}"
    archive = tmp_path / "B.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted((tmp_path / "A").rglob("*")):
            member = str(path.relative_to(tmp_path / "A"))
            if member != name:
                tar.add(path, member, recursive=False)
        entry.name = name
        tar.addfile(entry)
        tar.addfile(_entry("fifo", tarfile.FIFOTYPE))
    return archive


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (_entry("", tarfile.FIFOTYPE), "is a FIFO, not a regular file"),
        (_entry("", tarfile.CHRTYPE), "is a character device, not a regular file"),
        (_entry("", tarfile.BLKTYPE), "is a block device, not a regular file"),
        (_entry("", tarfile.DIRTYPE), "is a directory, not a regular file"),
        (_entry("", tarfile.SYMTYPE, "../../../../etc/passwd"), "is a symbolic link out of"),
        (
            _entry("", tarfile.SYMTYPE, "/etc/passwd"),
            "is a link to 'etc/passwd', which the archive",
        ),
        (_entry("", tarfile.SYMTYPE, "../../fifo"), "is a link to 'fifo', a FIFO"),
        (_entry("", tarfile.LNKTYPE, "fifo"), "is a link to 'fifo', a FIFO"),
        (_entry("", tarfile.LNKTYPE, "../outside"), "is a hard link out of the archive"),
    ],
    ids=[
        "fifo",
        "char",
        "block",
        "dir",
        "symlink-out",
        "symlink-absent",
        "symlink-fifo",
        "hardlink-fifo",
        "hardlink-out",
    ],
)
def test_oci_archive_member_that_is_no_regular_file_is_refused_naming_it(
    tmp_path: Path, image: BuiltImage, entry: tarfile.TarInfo, problem: str
) -> None:
    blob = image.layer_digests[0]
    archive = oci_archive_with(tmp_path, image, blob, entry)
    with (
        OCIArchiveSource(archive, "v1") as source,
        pytest.raises(InvalidArgument, match=re.escape(f"blob {blob} {problem}")) as caught,
    ):
        read_image(source)
    assert f"{archive}:blobs/sha256/{blob[7:]}" in str(caught.value)


def test_link_loop_in_an_archive_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "loop.tar"
    with tarfile.open(archive, "w") as tar:
        tar.addfile(_entry("a", tarfile.SYMTYPE, "b"))
        tar.addfile(_entry("b", tarfile.SYMTYPE, "a"))
    members = ArchiveMembers(archive, what="test")
    try:
        with pytest.raises(InvalidArgument, match="member 'a' is a link in a loop"):
            members.open("a")
    finally:
        members.close()


def test_docker_archive_member_that_is_no_regular_file_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    config = json.dumps(
        {"os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest(LAYERS[0])]}}
    ).encode()
    manifest = [{"Config": "c.json", "RepoTags": ["a:1"], "Layers": ["l/layer.tar"]}]
    archive = tmp_path / "save.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in (("c.json", config), ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(_entry("l/layer.tar", tarfile.CHRTYPE))
    with (
        DockerArchiveSource(archive) as source,
        pytest.raises(
            InvalidArgument, match=re.escape("member 'l/layer.tar' is a character device")
        ),
    ):
        source.resolve()
    with tarfile.open(archive, "w") as tar:
        tar.addfile(_entry("manifest.json", tarfile.FIFOTYPE))
    with pytest.raises(InvalidArgument, match=re.escape("member 'manifest.json' is a FIFO")):
        DockerArchiveSource(archive)


# --- (c) JSON too large or nested too deep ---------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_index_json_is_invalid_naming_it(tmp_path: Path, image: BuiltImage) -> None:
    index = tmp_path / "A" / "index.json"
    index.write_text(f'{{"schemaVersion":2,"manifests":{nested(DEEP)}}}')
    with (
        OCILayoutSource(tmp_path / "A", "v1") as source,
        pytest.raises(
            LimitExceeded, match=re.escape(f"{index}: JSON nested more than {MAX_JSON_DEPTH}")
        ),
    ):
        source.resolve()


def test_deeply_nested_documents_are_invalid_naming_them() -> None:
    deep = f'{{"schemaVersion":2,"manifests":{nested(DEEP)}}}'.encode()
    with pytest.raises(InvalidArgument, match=r"^manifest sha256:x: JSON nested more than"):
        parse_manifest(deep, media_type=MEDIA_OCI_INDEX, what="manifest sha256:x")
    deep_config = f'{{"rootfs":{{"type":"layers","diff_ids":[]}},"x":{nested(DEEP)}}}'.encode()
    with pytest.raises(InvalidArgument, match=r"^config sha256:y: JSON nested more than"):
        parse_config(deep_config, what="config sha256:y")


def test_deeply_nested_docker_manifest_json_is_invalid_naming_it(tmp_path: Path) -> None:
    archive = tmp_path / "save.tar"
    data = nested(DEEP).encode()
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(InvalidArgument, match=re.escape(f"{archive}:manifest.json: JSON nested")):
        DockerArchiveSource(archive)


def test_nesting_is_counted_outside_strings_only() -> None:
    assert load_json(nested(MAX_JSON_DEPTH).encode(), "doc") is not None
    with pytest.raises(LimitExceeded, match="nested more than"):
        load_json(nested(MAX_JSON_DEPTH + 1).encode(), "doc")
    # Brackets in strings, escaped quotes and backslashes do not count, nor hide a bracket.
    text = json.dumps({"a": "[" * 1000, "b": '\\"[[[[' + "{" * 500, "c": [[["\\"]]]})
    assert load_json(text.encode(), "doc")["c"] == [[["\\"]]]
    hidden = '["\\\\"' + "[" * 200 + '"x"' + "]" * 200 + "]"
    with pytest.raises(LimitExceeded):
        load_json(hidden.encode(), "doc")


def test_oversized_documents_are_invalid_naming_them() -> None:
    padding = " " * MAX_MANIFEST_BYTES
    big = f'{{"schemaVersion":2,"manifests":[]{padding}}}'.encode()
    with pytest.raises(LimitExceeded, match=r"^index sha256:z: .* above the limit of 4194304"):
        parse_manifest(big, media_type=None, what="index sha256:z")
    config = f'{{"rootfs":{{"type":"layers","diff_ids":[]}}{padding}}}'.encode()
    assert parse_config(config, what="config").diff_ids == ()  # a config may be larger
    config = f'{{"rootfs":{{"type":"layers","diff_ids":[]}}{" " * MAX_CONFIG_BYTES}}}'.encode()
    with pytest.raises(LimitExceeded, match=r"^config: .* above the limit"):
        parse_config(config, what="config")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"schemaVersion":2,"size":' + b"9" * 5000 + b"}",  # past int's 4300 digits
        '{"schemaVersion":2}'.encode("utf-16"),
        b'{"schemaVersion":2,"x":"\xff"}',
    ],
    ids=["huge-integer", "utf-16", "not-utf-8"],
)
def test_documents_that_are_no_json_for_laminae_are_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidArgument, match=r"^doc: not valid JSON"):
        load_json(raw, "doc")


# --- the command line -------------------------------------------------------------------------


def import_with_cli(tmp_path: Path, location: str) -> Result:
    config = tmp_path / "storage.toml"
    config.write_text("")
    options = {"--config": config, "--root": tmp_path / "root", "--runroot": tmp_path / "run"}
    store = [str(word) for option in options.items() for word in option]
    return CliRunner().invoke(cli, [*store, "--driver", "vfs", "image", "import", "-q", location])


def error_line(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, (result.stderr, result.exception)
    assert lines[0].startswith("laminae: error: ")
    return lines[0]


def test_cli_import_of_a_layout_with_a_fifo_blob_fails_naming_it(
    tmp_path: Path, image: BuiltImage
) -> None:
    fifo = make_fifo(blob_path(tmp_path / "A", image.layer_digests[1]))
    result = finishes(lambda: import_with_cli(tmp_path, f"oci:{tmp_path / 'A'}:v1"), [fifo])
    assert result.exit_code == InvalidArgument.exit_code
    line = error_line(result)
    assert f"blob {image.layer_digests[1]} is a FIFO, not a regular file ({fifo})" in line


def test_cli_import_of_a_linked_blob_tells_nothing_of_the_target(
    tmp_path: Path, image: BuiltImage, secret: Path
) -> None:
    path = blob_path(tmp_path / "A", image.layer_digests[0])
    path.unlink()
    path.symlink_to(secret)
    result = import_with_cli(tmp_path, f"oci:{tmp_path / 'A'}:v1")
    assert result.exit_code == InvalidArgument.exit_code
    line = error_line(result)
    assert f"blob {image.layer_digests[0]} is a symbolic link" in line
    assert_tells_nothing_of(line, secret, SECRET)


def test_cli_import_of_a_deeply_nested_index_fails_in_one_line(
    tmp_path: Path, image: BuiltImage
) -> None:
    (tmp_path / "A" / "index.json").write_text(f'{{"schemaVersion":2,"manifests":{nested(DEEP)}}}')
    result = import_with_cli(tmp_path, f"oci:{tmp_path / 'A'}:v1")
    assert result.exit_code == LimitExceeded.exit_code
    line = error_line(result)
    assert "index.json: JSON nested more than" in line
    assert "RecursionError" not in line
