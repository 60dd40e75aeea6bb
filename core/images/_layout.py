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
And only regular files are read: a blob (or index.json) that is a symbolic link, a FIFO or a
device is refused naming it, in a directory (:mod:`~laminae.images._layoutdir`, which follows
no link) as in an archive.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol, Self, final

from laminae._exceptions import (
    CorruptLayer,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    map_os_errors,
)
from laminae.archive._compression import Compression
from laminae.archive._tarstream import CHUNK_SIZE
from laminae.images._archivefile import ArchiveMembers, ArchiveWriter
from laminae.images._image import (
    ANNOTATION_REF_NAME,
    MAX_MANIFEST_BYTES,
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
from laminae.images._layoutdir import LayoutDirectory

__all__ = [
    "OCIArchiveSink",
    "OCIArchiveSource",
    "OCILayoutSink",
    "OCILayoutSource",
    "blob_name",
]

_LAYOUT_FILE: Final = "oci-layout"
_INDEX_FILE: Final = "index.json"
_LAYOUT_DOCUMENT: Final = encode_json({"imageLayoutVersion": "1.0.0"})


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
    """The files of a layout: in a directory or in an archive. Both hand out regular files
    only (:mod:`~laminae.images._layoutdir`, :class:`ArchiveMembers`), and their messages
    name a file by ``label``."""

    def where(self, name: str) -> str: ...

    def read(self, name: str, *, limit: int, label: str | None = None) -> bytes: ...

    def open(self, name: str, *, label: str | None = None) -> BinaryIO: ...

    def close(self) -> None: ...


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

    def _document(self, name: str, missing: str) -> dict[str, Any]:
        """oci-layout or index.json, read and parsed.

        :param missing: what the message says when the file is missing.
        """
        where = self._files.where(name)
        try:
            raw = self._files.read(name, limit=MAX_MANIFEST_BYTES)
        except NotFound as exc:
            raise NotFound(f"{self._description}: {missing} ({where} is missing)") from exc
        return load_json_object(raw, where)

    def _entries(self) -> list[Descriptor]:
        layout = self._document(_LAYOUT_FILE, "not an OCI image layout")
        version = layout.get("imageLayoutVersion")
        if not isinstance(version, str) or not version.startswith("1."):
            raise InvalidArgument(
                f"{self._files.where(_LAYOUT_FILE)}: imageLayoutVersion {version!r} is not 1.x"
            )
        where = self._files.where(_INDEX_FILE)
        entries = self._document(_INDEX_FILE, "the layout has no index").get("manifests")
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
        :raises InvalidArgument: the blob is no regular file (a symbolic link, a FIFO...).
        :raises LimitExceeded: it is larger than :data:`MAX_MANIFEST_BYTES`.
        """
        name = blob_name(desc.digest, what=self._description)
        try:
            return self._files.read(name, limit=MAX_MANIFEST_BYTES, label=f"blob {desc.digest}")
        except NotFound as exc:
            raise NotFound(
                f"{self._description}: blob {desc.digest} is missing ({self._files.where(name)})"
            ) from exc

    @contextlib.contextmanager
    def open_blob(self, desc: Descriptor) -> Iterator[BinaryIO]:
        """The bytes of blob ``desc`` as a stream (not verified: the caller hashes them).

        :raises NotFound: the blob is missing (the message names its path).
        :raises InvalidArgument: a malformed digest, or the blob is no regular file (a
            symbolic link, a FIFO, a device...).
        """
        name = blob_name(desc.digest, what=self._description)
        try:
            stream = self._files.open(name, label=f"blob {desc.digest}")
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
    """Read an image from an OCI image layout directory, held open until :meth:`close`.

    :param path: the layout's directory.
    :param reference: the ref name of the image (see the module docstring); ``None`` for the
        only image.
    :raises NotFound: ``path`` is missing or no directory.
    """

    def __init__(self, path: Path, reference: str | None = None) -> None:
        description = _describe("oci", path, reference)
        super().__init__(LayoutDirectory(path, what=description), reference, description)


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
    created, and leaves index.json as it was. Inside the layout every file is reached without
    following a symbolic link (:class:`LayoutDirectory`): a link planted at a blob's name or at
    index.json is replaced, never written through, and never taken for a blob that is there.

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
        self._made_outside: list[Path] = []  # the layout directory and parents this sink made
        self._made: list[tuple[str, bool]] = []  # (name, is a directory) made inside, in order
        self._directory: LayoutDirectory | None = None
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
            if not os.path.lexists(path / _LAYOUT_FILE) and any(
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

    def _layout(self, *, create: bool) -> LayoutDirectory | None:
        """The layout directory, open; made first with ``create`` (else ``None`` if missing)."""
        with self._lock:
            if self._done:
                raise FailedPrecondition(f"{self._what}: the sink is closed")
            if self._directory is None:
                if create:
                    missing = []
                    for parent in (self._path, *self._path.parents):
                        if parent.exists():
                            break
                        missing.append(parent)
                    for directory in reversed(missing):
                        with map_os_errors(f"{self._what}: create {directory}"):
                            directory.mkdir(exist_ok=True)
                        self._made_outside.append(directory)
                elif not self._path.exists():
                    return None
                self._directory = LayoutDirectory(self._path, what=self._what)
            return self._directory

    def has_blob(self, desc: Descriptor) -> bool:
        """Whether the layout has the blob already (a regular file of the right size).

        :raises InvalidArgument: a directory on the way to it is a symbolic link.
        """
        layout = self._layout(create=False)
        if layout is None:
            return False
        name = blob_name(desc.digest, what=self._what)
        found = layout.lstat(name, label=f"blob {desc.digest}")
        return found is not None and stat.S_ISREG(found.st_mode) and found.st_size == desc.size

    def _put(self, desc: Descriptor, write: Callable[[BinaryIO], object]) -> None:
        """Write a blob with ``write(file)`` to a temporary name, sync it, rename it."""
        layout = self._layout(create=True)
        assert layout is not None
        if self.has_blob(desc):
            return
        name = blob_name(desc.digest, what=self._what)
        made = layout.make_directories(posixpath.dirname(name))
        with self._lock:
            self._made.extend((directory, True) for directory in made)
        layout.write(name, write)
        with self._lock:
            self._made.append((name, False))

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
        :raises InvalidArgument: the existing index.json is malformed, or no regular file.
        """
        if self._entry is None or self._done:
            raise FailedPrecondition(f"{self._what}: nothing to commit (no manifest put)")
        layout = self._layout(create=True)
        assert layout is not None
        for directory in {posixpath.dirname(n) for n, is_dir in self._made if not is_dir}:
            layout.sync(directory)
        if layout.lstat(_LAYOUT_FILE) is None:
            layout.write(_LAYOUT_FILE, lambda out: out.write(_LAYOUT_DOCUMENT))
        # Two writers updating one index.json would lose an entry: the layout directory's
        # flock orders them.
        with layout.locked():
            existing = None
            with contextlib.suppress(NotFound):
                raw = layout.read(_INDEX_FILE, limit=MAX_MANIFEST_BYTES)
                existing = load_json_object(raw, layout.where(_INDEX_FILE))
            index = _updated_index(existing, self._entry)
            layout.write(_INDEX_FILE, lambda out: out.write(index))
            layout.sync()
        self._done = True

    def close(self) -> None:
        """Without a commit: remove the blobs and directories this sink created."""
        with self._lock:
            committed, self._done = self._done, True
            layout, self._directory = self._directory, None
        if layout is not None:
            if not committed:
                for name, _ in reversed(self._made):
                    layout.remove(name)  # a directory only if empty: another writer's blobs
            layout.close()
        if not committed:
            for path in reversed(self._made_outside):
                with contextlib.suppress(OSError):
                    path.rmdir()


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
        self._writer.add_bytes(_LAYOUT_FILE, _LAYOUT_DOCUMENT)
        self._writer.add_bytes(_INDEX_FILE, _updated_index(None, self._entry))
        self._writer.commit()

    def close(self) -> None:
        """Without a commit: remove the temporary archive."""
        self._writer.abort()
