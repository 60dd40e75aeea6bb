"""OCI image layouts, as a directory (``oci:``) and as a tar of one (``oci-archive:``).

A layout (image-spec image-layout.md) is three things::

    oci-layout          {"imageLayoutVersion": "1.0.0"}
    index.json          an image index; each entry names an image with the annotation
                        org.opencontainers.image.ref.name
    blobs/<alg>/<hex>   every manifest, config and layer, named by its digest

A reference selects an index entry: the one whose ref name equals it, or whose ref name is a
full ``name:tag`` ending in ``:`` + it; ``@N`` selects the N-th entry (from 0); no reference
selects the only entry. Entries are read as they are: a manifest, or a nested index (a
multi-platform image) whose platform the pipeline picks.

An oci-archive is read in place, never extracted, and written as a stream to a temporary
file renamed over the target (:mod:`laminae.images._archivefile`).

Blob paths come from digests, which come from the layout itself: every digest is checked
(:func:`~laminae.images._image.check_blob_digest`) before it becomes a path, so ``../`` never does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol, Self, final

from laminae._exceptions import (
    CorruptLayer,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    map_os_errors,
)
from laminae.archive._compression import Compression
from laminae.archive._tarstream import CHUNK_SIZE
from laminae.images._archivefile import (
    MAX_DOCUMENT_BYTES,
    ArchiveMembers,
    ArchiveWriter,
    fsync_directory,
)
from laminae.images._image import (
    ANNOTATION_REF_NAME,
    MEDIA_OCI_INDEX,
    Descriptor,
    ImageConfig,
    Manifest,
    build_index,
    check_blob_digest,
    encode_json,
    load_json_object,
    sha256_digest,
)

__all__ = [
    "OCIArchiveSink",
    "OCIArchiveSource",
    "OCILayoutSink",
    "OCILayoutSource",
    "blob_name",
]

_LAYOUT_FILE: Final = "oci-layout"
_INDEX_FILE: Final = "index.json"
_LAYOUT_VERSION: Final = "1.0.0"


def blob_name(digest: str, *, what: str) -> str:
    """The path of a blob inside a layout: ``blobs/<alg>/<encoded>``.

    :param what: where the digest came from, for the message.
    :raises InvalidArgument: the digest is malformed (``sha256:../../etc/passwd`` is).
    :raises Unsupported: a well-formed digest of an algorithm laminae does not hash.
    """
    algorithm, _, encoded = check_blob_digest(digest, what=what).partition(":")
    return f"blobs/{algorithm}/{encoded}"


# --- reading a layout ---------------------------------------------------------------------


class _LayoutFiles(Protocol):
    """The files of a layout: in a directory or in an archive."""

    def where(self, name: str) -> str: ...

    def read(self, name: str, *, limit: int = ...) -> bytes: ...

    def open(self, name: str) -> BinaryIO: ...

    def close(self) -> None: ...


@final
class _DirectoryFiles:
    def __init__(self, root: Path, what: str) -> None:
        self._root = root
        self._what = what

    def where(self, name: str) -> str:
        return str(self._root / name)

    def open(self, name: str) -> BinaryIO:
        path = self._root / name
        with map_os_errors(f"{self._what}: open {path}"):
            return path.open("rb")

    def read(self, name: str, *, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
        with self.open(name) as stream:
            size = os.fstat(stream.fileno()).st_size
            if size > limit:
                raise LimitExceeded(
                    f"{self.where(name)}: {size} bytes, above the limit of {limit} for a document"
                )
            return stream.read(limit + 1)

    def close(self) -> None:
        pass


class _LayoutSource:
    """An :class:`~laminae.images._image.ImageSource` over the files of a layout."""

    def __init__(self, files: _LayoutFiles, reference: str | None, description: str) -> None:
        self._files = files
        self._reference = reference
        self._description = description

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """The location, as ``oci:/srv/layout:v1`` or ``oci-archive:/x.tar:v1``."""
        return self._description

    def _entries(self) -> list[Descriptor]:
        what = self._description
        try:
            layout_raw = self._files.read(_LAYOUT_FILE)
        except NotFound as exc:
            raise NotFound(
                f"{what}: not an OCI image layout ({self._files.where(_LAYOUT_FILE)} is missing)"
            ) from exc
        layout = load_json_object(layout_raw, self._files.where(_LAYOUT_FILE))
        version = layout.get("imageLayoutVersion")
        if not isinstance(version, str) or not version.startswith("1."):
            raise InvalidArgument(
                f"{self._files.where(_LAYOUT_FILE)}: imageLayoutVersion {version!r} is not 1.x"
            )
        where = self._files.where(_INDEX_FILE)
        try:
            raw = self._files.read(_INDEX_FILE)
        except NotFound as exc:
            raise NotFound(f"{what}: the layout has no index ({where} is missing)") from exc
        entries = load_json_object(raw, where).get("manifests")
        if not isinstance(entries, list):
            raise InvalidArgument(f"{where}: an index needs a manifests list")
        return [
            Descriptor.from_json(e, what=f"{where} manifests[{i}]") for i, e in enumerate(entries)
        ]

    def _select(self) -> Descriptor | bytes:
        """The index entry the reference names, or a made-up index of several entries."""
        entries = self._entries()
        reference = self._reference
        names = [d.annotations.get(ANNOTATION_REF_NAME) for d in entries]
        refs = ", ".join(sorted({n for n in names if n})) or "no named images"
        if reference is None:
            chosen = entries
            if not chosen:
                raise NotFound(f"{self._description}: the layout holds no image")
        elif reference.startswith("@") and reference[1:].isdigit():
            number = int(reference[1:])
            if number >= len(entries):
                raise NotFound(
                    f"{self._description}: no image {reference}; it holds {len(entries)}"
                )
            chosen = [entries[number]]
        else:
            chosen = [d for d, n in zip(entries, names, strict=True) if n == reference]
            if not chosen:
                chosen = [
                    d
                    for d, n in zip(entries, names, strict=True)
                    if n is not None and n.endswith(":" + reference)
                ]
            if not chosen:
                raise NotFound(f"{self._description}: no image named {reference!r}; it has {refs}")
        if len(chosen) == 1:
            return chosen[0]
        # Some tools store one entry per platform under one name: that is an index in all
        # but form, and the pipeline picks the platform from it.
        if all(d.platform is not None for d in chosen):
            return build_index(chosen).raw
        raise InvalidArgument(
            f"{self._description}: {len(chosen)} images match; name one of: {refs}"
        )

    def resolve(self) -> tuple[bytes, str | None]:
        """The manifest or index the reference selects, and its media type.

        The layout names the document by digest, so its bytes are checked against it here.

        :raises NotFound: no layout, no index.json, no such reference (the message lists the
            ones there are), or the document's blob is missing.
        :raises InvalidArgument: a malformed oci-layout or index.json, a malformed digest,
            or a reference that matches several images.
        :raises CorruptLayer: the document does not match its digest.
        """
        selected = self._select()
        if isinstance(selected, bytes):
            return selected, MEDIA_OCI_INDEX
        raw = self.fetch_manifest(selected)
        if len(raw) != selected.size or sha256_digest(raw) != selected.digest:
            raise CorruptLayer(
                f"{self._description}: manifest {selected.digest} does not match its digest "
                f"and size ({self._blob_where(selected)})"
            )
        return raw, selected.media_type

    def _blob_where(self, desc: Descriptor) -> str:
        return self._files.where(blob_name(desc.digest, what=self._description))

    def fetch_manifest(self, desc: Descriptor) -> bytes:
        """The manifest or index blob ``desc`` names, raw (not verified).

        :raises NotFound: the blob is missing (the message names its path).
        :raises LimitExceeded: it is larger than :data:`MAX_DOCUMENT_BYTES`.
        """
        name = blob_name(desc.digest, what=self._description)
        try:
            return self._files.read(name)
        except NotFound as exc:
            raise NotFound(
                f"{self._description}: blob {desc.digest} is missing ({self._files.where(name)})"
            ) from exc

    @contextlib.contextmanager
    def open_blob(self, desc: Descriptor) -> Iterator[BinaryIO]:
        """The bytes of blob ``desc`` as a stream (not verified: the caller hashes them).

        :raises NotFound: the blob is missing (the message names its path).
        :raises InvalidArgument: a malformed digest.
        """
        name = blob_name(desc.digest, what=self._description)
        try:
            stream = self._files.open(name)
        except NotFound as exc:
            raise NotFound(
                f"{self._description}: blob {desc.digest} is missing ({self._files.where(name)})"
            ) from exc
        with stream:
            yield stream

    def close(self) -> None:
        """Release the archive (a directory holds nothing open)."""
        self._files.close()


def _describe(transport: str, path: Path, reference: str | None) -> str:
    return f"{transport}:{path}" + (f":{reference}" if reference is not None else "")


@final
class OCILayoutSource(_LayoutSource):
    """Read an image from an OCI image layout directory.

    :param path: the layout's directory.
    :param reference: the ref name of the image (see the module docstring); ``None`` for the
        only image.
    """

    def __init__(self, path: Path, reference: str | None = None) -> None:
        description = _describe("oci", path, reference)
        if not path.is_dir():
            raise NotFound(f"{description}: no layout directory {path}")
        super().__init__(_DirectoryFiles(path, description), reference, description)


@final
class OCIArchiveSource(_LayoutSource):
    """Read an image from a tar of an OCI image layout, in place.

    :param path: the archive.
    :param reference: as for :class:`OCILayoutSource`.
    :raises NotFound: no such file.
    :raises InvalidArgument: not a tar.
    """

    def __init__(self, path: Path, reference: str | None = None) -> None:
        description = _describe("oci-archive", path, reference)
        super().__init__(ArchiveMembers(path, what=description), reference, description)


# --- writing a layout ---------------------------------------------------------------------


def _check_ref_name(reference: str | None, what: str) -> None:
    if reference is not None and (not reference or reference.startswith("@")):
        raise InvalidArgument(f"{what}: {reference!r} cannot name an image being written")


def _index_entry(manifest: Manifest, reference: str | None) -> Descriptor:
    annotations = {ANNOTATION_REF_NAME: reference} if reference is not None else {}
    return Descriptor(manifest.media_type, manifest.digest, len(manifest.raw), annotations)


def _updated_index(existing: dict[str, Any] | None, entry: Descriptor) -> bytes:
    """index.json with ``entry`` added, replacing any entry of the same ref name.

    Everything else in the old index (other entries, annotations, unknown keys) is kept as
    it was. An entry without a ref name replaces one for the same manifest without one.
    """
    document: dict[str, Any] = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX}
    document.update(existing or {})
    ref = entry.annotations.get(ANNOTATION_REF_NAME)
    kept = []
    for old in document.get("manifests") or []:
        annotations = old.get("annotations") if isinstance(old, dict) else None
        old_ref = annotations.get(ANNOTATION_REF_NAME) if isinstance(annotations, dict) else None
        if old_ref == ref and (ref is not None or old.get("digest") == entry.digest):
            continue
        kept.append(old)
    document["manifests"] = [*kept, entry.to_json()]
    return encode_json(document)


def _check_manifest(manifest: Manifest, config: ImageConfig, what: str) -> None:
    if manifest.config.digest != config.digest:
        raise InvalidArgument(
            f"{what}: manifest {manifest.digest} names config {manifest.config.digest}, "
            f"not {config.digest}"
        )


@final
class OCILayoutSink:
    """Write an image into an OCI image layout directory, created when missing.

    Blobs are written to a temporary name beside their final one, synced and renamed, so a
    blob under its digest is always whole. :meth:`commit` adds the image to index.json
    (replacing an entry of the same ref name, keeping the others) by an atomic rename.
    :meth:`close` without a commit removes the blobs this sink added and the directories it
    created, and leaves index.json as it was.

    :param path: the layout directory.
    :param reference: the ref name to give the image (the annotation
        ``org.opencontainers.image.ref.name``); ``None`` for none.
    :raises InvalidArgument: ``path`` is a file, or a directory with other content that is
        not a layout, or ``reference`` cannot name an image.
    """

    layer_compression: Compression | None = None
    docker_media_types: bool = False

    def __init__(self, path: Path, reference: str | None = None) -> None:
        self._path = path
        self._reference = reference
        self._what = _describe("oci", path, reference)
        _check_ref_name(reference, self._what)
        self._created: list[Path] = []  # directories and blobs this sink made, in order
        self._lock = threading.Lock()
        self._entry: Descriptor | None = None
        self._done = False
        if path.exists():
            if not path.is_dir():
                raise InvalidArgument(f"{self._what}: {path} is not a directory")
            # A layout another sink is creating right now has blobs (and temporary files
            # ".oci-layout.tmp-*") before its oci-layout: only files that belong to no
            # layout make the directory someone else's.
            layout_names = {_LAYOUT_FILE, _INDEX_FILE, "blobs"}
            if not (path / _LAYOUT_FILE).exists() and any(
                p.name.removeprefix(".").partition(".tmp-")[0] not in layout_names
                for p in path.iterdir()
            ):
                raise InvalidArgument(
                    f"{self._what}: {path} is not empty and not an OCI layout (no oci-layout)"
                )

    def __enter__(self) -> OCILayoutSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """The location, as ``oci:/srv/layout:v1``."""
        return self._what

    def _blob_path(self, desc: Descriptor) -> Path:
        return self._path / blob_name(desc.digest, what=self._what)

    def has_blob(self, desc: Descriptor) -> bool:
        """Whether the layout has the blob already (a file of the right size)."""
        try:
            return self._blob_path(desc).stat().st_size == desc.size
        except FileNotFoundError:
            return False

    def _make_directory(self, path: Path) -> None:
        with self._lock:
            missing = []
            for parent in (path, *path.parents):
                if parent.exists():
                    break
                missing.append(parent)
            for directory in reversed(missing):
                with map_os_errors(f"{self._what}: create {directory}"):
                    directory.mkdir(exist_ok=True)
                self._created.append(directory)

    def _put(self, desc: Descriptor, write: Any) -> None:
        """Write a blob with ``write(file)`` to a temporary name, sync it, rename it."""
        if self._done:
            raise FailedPrecondition(f"{self._what}: the sink is closed")
        final = self._blob_path(desc)
        if self.has_blob(desc):
            return
        self._make_directory(final.parent)
        with map_os_errors(f"{self._what}: write {final}"):
            fd, temp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name[:16]}.tmp-")
            try:
                with os.fdopen(fd, "wb") as out:
                    write(out)
                    out.flush()
                    os.fsync(out.fileno())
                os.rename(temp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                raise
        with self._lock:
            self._created.append(final)

    def put_blob(self, desc: Descriptor, path: Path) -> None:
        """Copy the blob in file ``path`` into the layout (nothing if it is there already).

        :raises InvalidArgument: a malformed digest.
        """

        def copy(out: BinaryIO) -> None:
            with path.open("rb") as stream:
                shutil.copyfileobj(stream, out, CHUNK_SIZE)

        self._put(desc, copy)

    def put_manifest(self, manifest: Manifest, config: ImageConfig) -> None:
        """Store the manifest (and the config, if it is not there yet) as blobs.

        :raises InvalidArgument: the manifest names another config.
        """
        _check_manifest(manifest, config, self._what)
        self._put(manifest.config, lambda out: out.write(config.raw))
        entry = _index_entry(manifest, self._reference)
        self._put(entry, lambda out: out.write(manifest.raw))
        self._entry = entry

    def commit(self) -> None:
        """Write oci-layout (if missing) and index.json, each by an atomic rename.

        :raises FailedPrecondition: no manifest was put, or the sink is closed.
        :raises InvalidArgument: the existing index.json is malformed.
        """
        if self._entry is None or self._done:
            raise FailedPrecondition(f"{self._what}: nothing to commit (no manifest put)")
        self._make_directory(self._path)
        index_path = self._path / _INDEX_FILE
        with map_os_errors(f"{self._what}: write {index_path}"):
            for directory in {p.parent for p in self._created if p.is_file()}:
                fsync_directory(directory)
            layout = self._path / _LAYOUT_FILE
            if not layout.exists():
                _replace_file(layout, encode_json({"imageLayoutVersion": _LAYOUT_VERSION}))
            # Two writers updating one index.json would lose an entry: the layout
            # directory's flock orders them (no lock file, so the layout gains nothing).
            lock = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                existing = None
                with contextlib.suppress(FileNotFoundError):
                    existing = load_json_object(index_path.read_bytes(), str(index_path))
                _replace_file(index_path, _updated_index(existing, self._entry))
                os.fsync(lock)
            finally:
                os.close(lock)
        self._done = True

    def close(self) -> None:
        """Without a commit: remove the blobs and directories this sink created."""
        if self._done:
            return
        self._done = True
        for path in reversed(self._created):
            with contextlib.suppress(OSError):
                if path.is_dir():
                    path.rmdir()  # only if empty: another writer may have put blobs there
                else:
                    path.unlink()


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` by a synced temporary file and a rename."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


@final
class OCIArchiveSink:
    """Write an image as a tar of an OCI image layout.

    Blobs are streamed into the archive as they come (no layout directory in between);
    :meth:`commit` adds oci-layout and index.json and renames the archive into place,
    replacing an existing file. :meth:`close` without a commit removes the temporary file.

    :param path: the archive to write.
    :param reference: the ref name to give the image; ``None`` for none.
    :raises NotFound: the directory the archive goes in does not exist.
    :raises InvalidArgument: ``path`` is a directory, or ``reference`` cannot name an image.
    """

    layer_compression: Compression | None = None
    docker_media_types: bool = False

    def __init__(self, path: Path, reference: str | None = None) -> None:
        self._reference = reference
        self._what = _describe("oci-archive", path, reference)
        _check_ref_name(reference, self._what)
        self._writer = ArchiveWriter(path, what=self._what)
        self._entry: Descriptor | None = None

    def __enter__(self) -> OCIArchiveSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """The location, as ``oci-archive:/x.tar:v1``."""
        return self._what

    def _name(self, desc: Descriptor) -> str:
        name = blob_name(desc.digest, what=self._what)
        self._writer.add_directory("blobs")
        self._writer.add_directory(posixpath.dirname(name))
        return name

    def has_blob(self, desc: Descriptor) -> bool:
        """Whether this archive has the blob already."""
        return blob_name(desc.digest, what=self._what) in self._writer

    def put_blob(self, desc: Descriptor, path: Path) -> None:
        """Stream the blob in file ``path`` into the archive (once per digest)."""
        self._writer.add_file(self._name(desc), path)

    def put_manifest(self, manifest: Manifest, config: ImageConfig) -> None:
        """Add the manifest (and the config, if it is not there yet) as blobs.

        :raises InvalidArgument: the manifest names another config.
        """
        _check_manifest(manifest, config, self._what)
        self._writer.add_bytes(self._name(manifest.config), config.raw)
        entry = _index_entry(manifest, self._reference)
        self._writer.add_bytes(self._name(entry), manifest.raw)
        self._entry = entry

    def commit(self) -> None:
        """Add oci-layout and index.json and rename the archive into place.

        :raises FailedPrecondition: no manifest was put, or the sink is closed.
        """
        if self._entry is None:
            raise FailedPrecondition(f"{self._what}: nothing to commit (no manifest put)")
        self._writer.add_bytes(_LAYOUT_FILE, encode_json({"imageLayoutVersion": _LAYOUT_VERSION}))
        self._writer.add_bytes(_INDEX_FILE, _updated_index(None, self._entry))
        self._writer.commit()

    def close(self) -> None:
        """Without a commit: remove the temporary archive."""
        self._writer.abort()
