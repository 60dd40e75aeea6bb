"""``docker save`` archives (``docker-archive:``), read in place and written as a stream.

The format (Docker's image/tarexport, "version 1.2")::

    manifest.json       [{"Config": "<hex>.json", "RepoTags": ["name:tag"],
                          "Layers": ["<id>/layer.tar", ...]}, ...]     one entry per image
    repositories        {"name": {"tag": "<id of the top layer>"}}     for old docker load
    <hex>.json          an image config, named by its sha256
    <id>/layer.tar      a layer, an uncompressed tar (a link when the layer repeats)

Docker 25 and later write an OCI layout in the same archive and point ``Config`` and
``Layers`` at ``blobs/sha256/<hex>``; both spellings are read through manifest.json.

The archive has no manifest in the registry's sense, so :class:`DockerArchiveSource`
synthesises a Docker v2 one for the image it picks: the config's digest is the sha256 of its
member, and a layer's is the sha256 of its member, taken from a ``blobs/sha256/<hex>`` name or
else hashed by streaming the member once. A layer ``<id>`` is *not* trusted to be its digest,
and neither is the config's DiffID for it: old Docker ids are random, and the pipeline
verifies what the manifest claims. The layer media type comes from the member's first bytes
(plain tar, gzip or zstd).

:class:`DockerArchiveSink` writes what ``docker load`` reads: uncompressed layers as
``<diffid-hex>/layer.tar``, the config as ``<hex>.json``, manifest.json with the location's
reference as the RepoTag, and repositories.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, final

import attrs

from laminae._exceptions import FailedPrecondition, InvalidArgument, NotFound, Unsupported
from laminae.archive._compression import Compression, detect_compression
from laminae.archive._tarstream import CHUNK_SIZE
from laminae.images._archivefile import ArchiveMembers, ArchiveWriter
from laminae.images._image import (
    MAX_MANIFEST_BYTES,
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_LAYER,
    MEDIA_DOCKER_LAYER_GZIP,
    Descriptor,
    ImageConfig,
    Manifest,
    build_manifest,
    layer_compression,
    load_json,
)
from laminae.images._reference import parse_reference

__all__ = ["DockerArchiveSink", "DockerArchiveSource"]

_MANIFEST_FILE: Final = "manifest.json"
_REPOSITORIES_FILE: Final = "repositories"
_BLOB_MEMBER: Final = re.compile(r"blobs/sha256/([a-f0-9]{64})")
_INDEX_REFERENCE: Final = re.compile(r"@(\d+)")
# Docker v2 has no zstd layer type of its own; this spelling is the one the pipeline reads.
_MEDIA_DOCKER_LAYER_ZSTD: Final = MEDIA_DOCKER_LAYER + ".zstd"
_LAYER_TYPES: Final = {
    Compression.NONE: MEDIA_DOCKER_LAYER,
    Compression.GZIP: MEDIA_DOCKER_LAYER_GZIP,
    Compression.ZSTD: _MEDIA_DOCKER_LAYER_ZSTD,
}
_SNIFF_BYTES: Final = 512


@attrs.frozen
class _ArchiveImage:
    """One entry of manifest.json."""

    config: str
    repo_tags: tuple[str, ...]
    layers: tuple[str, ...]


def _read_images(members: ArchiveMembers, what: str) -> list[_ArchiveImage]:
    where = members.where(_MANIFEST_FILE)
    try:
        raw = members.read(_MANIFEST_FILE, limit=MAX_MANIFEST_BYTES)
    except NotFound as exc:
        raise NotFound(f"{what}: not a docker-archive ({where} is missing)") from exc
    data = load_json(raw, where)
    if not isinstance(data, list):
        raise InvalidArgument(f"{where}: not a JSON list")
    images = []
    for i, entry in enumerate(data):
        config = entry.get("Config") if isinstance(entry, dict) else None
        layers = entry.get("Layers") if isinstance(entry, dict) else None
        tags = (entry.get("RepoTags") if isinstance(entry, dict) else None) or []
        if (
            not isinstance(config, str)
            or not isinstance(layers, list)
            or not all(isinstance(x, str) for x in layers)
            or not isinstance(tags, list)
            or not all(isinstance(x, str) for x in tags)
        ):
            raise InvalidArgument(
                f"{where}[{i}]: needs Config (a string), Layers and RepoTags (lists of strings)"
            )
        images.append(_ArchiveImage(config, tuple(tags), tuple(layers)))
    return images


def _normal_name(text: str) -> str:
    """A reference in its full form with ``:latest`` implied, or ``text`` if it is none."""
    try:
        ref = parse_reference(text)
    except InvalidArgument:
        return text
    if ref.tag is None and ref.digest is None:
        ref = attrs.evolve(ref, tag="latest")
    return str(ref)


def _select(images: list[_ArchiveImage], reference: str | None, what: str) -> _ArchiveImage:
    tags = ", ".join(t for image in images for t in image.repo_tags) or "no tags"
    if reference is None:
        if len(images) != 1:
            raise InvalidArgument(
                f"{what}: the archive holds {len(images)} images; name one (a tag or @N) of: {tags}"
            )
        return images[0]
    number = _INDEX_REFERENCE.fullmatch(reference)
    if number is not None:
        if int(number[1]) >= len(images):
            raise NotFound(f"{what}: no image {reference}; the archive holds {len(images)}")
        return images[int(number[1])]
    wanted = _normal_name(reference)
    for image in images:
        if any(_normal_name(tag) == wanted for tag in image.repo_tags):
            return image
    raise NotFound(f"{what}: no image tagged {reference!r}; the archive has {tags}")


@final
class DockerArchiveSource:
    """Read an image from a ``docker save`` archive, in place.

    :param path: the archive.
    :param reference: ``name:tag`` (matched against RepoTags, normalised, so ``busybox``
        finds ``docker.io/library/busybox:latest``), ``@N`` for the N-th image (from 0), or
        ``None`` for the only one.
    :raises NotFound: no such file, no manifest.json, or no image for ``reference`` (the
        message lists the tags there are).
    :raises InvalidArgument: not a tar, a malformed manifest.json (or one that is no regular
        file), or no reference for an archive of several images.
    """

    def __init__(self, path: Path, reference: str | None = None) -> None:
        self._what = f"docker-archive:{path}" + (f":{reference}" if reference else "")
        self._members = ArchiveMembers(path, what=self._what)
        try:
            self._image = _select(_read_images(self._members, self._what), reference, self._what)
        except BaseException:
            self._members.close()
            raise
        self._lock = threading.Lock()  # blobs are opened from several threads
        self._manifest: Manifest | None = None
        self._blobs: dict[str, str] = {}
        """Member name by digest, for the blobs of the synthesised manifest."""

    @property
    def repo_tags(self) -> tuple[str, ...]:
        """The RepoTags of the image picked: the names ``docker load`` would give it."""
        return self._image.repo_tags

    def __enter__(self) -> DockerArchiveSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """The location, as ``docker-archive:/x.tar:name:tag``."""
        return self._what

    def _digest(self, name: str) -> str:
        """The sha256 of member ``name``: from a ``blobs/sha256/<hex>`` name, else hashed."""
        match = _BLOB_MEMBER.fullmatch(name)
        if match is not None:
            return f"sha256:{match[1]}"
        hasher = hashlib.sha256()
        with self._members.open(name) as stream:
            for chunk in iter(lambda: stream.read(CHUNK_SIZE), b""):
                hasher.update(chunk)
        return f"sha256:{hasher.hexdigest()}"

    def _compression(self, name: str) -> Compression:
        head = b""
        with self._members.open(name) as stream:
            while len(head) < _SNIFF_BYTES:
                data = stream.read(_SNIFF_BYTES - len(head))
                if not data:
                    break
                head += data
        try:
            return detect_compression(head)
        except Unsupported as exc:
            raise Unsupported(f"{self._members.where(name)}: {exc}") from exc

    def _blob(self, name: str, media_type: str) -> Descriptor:
        size = self._members.size(name)
        digest = self._digest(name)
        self._blobs[digest] = name
        return Descriptor(media_type, digest, size)

    def _synthesise(self) -> Manifest:
        with self._lock:
            return self._synthesise_once()

    def _synthesise_once(self) -> Manifest:
        if self._manifest is None:
            image = self._image
            config = self._blob(image.config, MEDIA_DOCKER_CONFIG)
            known: dict[str, Descriptor] = {}
            layers = []
            for name in image.layers:
                if name not in known:
                    known[name] = self._blob(name, _LAYER_TYPES[self._compression(name)])
                layers.append(known[name])
            self._manifest = build_manifest(config, layers, docker=True)
        return self._manifest

    def resolve(self) -> tuple[bytes, str | None]:
        """A Docker v2 manifest for the image, made from its manifest.json entry.

        :raises NotFound: the config or a layer member is missing.
        :raises InvalidArgument: the config or a layer member is no regular file (a FIFO, a
            device, a link out of the archive or to no regular file); the message names it.
        :raises Unsupported: a layer compressed with something other than gzip or zstd.
        """
        manifest = self._synthesise()
        return manifest.raw, manifest.media_type

    def fetch_manifest(self, desc: Descriptor) -> bytes:
        """The synthesised manifest, the only one there is.

        :raises NotFound: ``desc`` names another.
        """
        manifest = self._synthesise()
        if desc.digest != manifest.digest:
            raise NotFound(f"{self._what}: no manifest {desc.digest} (a docker-archive has none)")
        return manifest.raw

    @contextlib.contextmanager
    def open_blob(self, desc: Descriptor) -> Iterator[Any]:
        """The member holding the config or layer ``desc`` names, as a stream.

        :raises NotFound: the image has no such blob.
        """
        self._synthesise()
        name = self._blobs.get(desc.digest)
        if name is None:
            raise NotFound(f"{self._what}: the image has no blob {desc.digest}")
        with self._members.open(name) as stream:
            yield stream

    def close(self) -> None:
        """Close the archive."""
        self._members.close()


@final
class DockerArchiveSink:
    """Write an image as a ``docker save`` archive that ``docker load`` reads.

    Layers must come uncompressed (:attr:`layer_compression` says so), so a layer's digest
    is its DiffID and names its ``<hex>/layer.tar``. The archive is streamed to
    ``FILE.tmp-XXXX`` and renamed over ``path`` by :meth:`commit`; :meth:`close` without a
    commit removes it.

    :param path: the archive to write.
    :param reference: ``name[:tag]`` for RepoTags (``:latest`` implied; written in the
        familiar form docker uses, ``busybox:latest``), or ``None`` for an untagged image.
    :raises InvalidArgument: a reference that is not ``name[:tag]``, or ``path`` is a
        directory.
    :raises NotFound: the directory the archive goes in does not exist.
    """

    layer_compression: Compression | None = Compression.NONE
    docker_media_types: bool = True

    def __init__(self, path: Path, reference: str | None = None) -> None:
        self._what = f"docker-archive:{path}" + (f":{reference}" if reference else "")
        self._tag: tuple[str, str] | None = None
        if reference is not None:
            ref = parse_reference(reference)
            if ref.digest is not None:
                raise InvalidArgument(f"{self._what}: a docker-archive is tagged, not a digest")
            familiar = attrs.evolve(ref, tag=None).familiar
            self._tag = (familiar, ref.tag or "latest")
        self._writer = ArchiveWriter(path, what=self._what)
        self._entries: list[dict[str, Any]] = []
        self._repositories: dict[str, dict[str, str]] = {}

    def __enter__(self) -> DockerArchiveSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """The location, as ``docker-archive:/x.tar:name:tag``."""
        return self._what

    def _hex(self, desc: Descriptor) -> str:
        algorithm, _, encoded = desc.digest.partition(":")
        if algorithm != "sha256" or not re.fullmatch(r"[a-f0-9]{64}", encoded):
            raise Unsupported(
                f"{self._what}: a docker-archive names blobs by sha256, not {desc.digest}"
            )
        return encoded

    def _is_layer(self, desc: Descriptor) -> bool:
        try:
            compression = layer_compression(desc.media_type, what=self._what)
        except Unsupported:
            return False  # a config (or something else small and JSON)
        if compression is not Compression.NONE:
            raise InvalidArgument(
                f"{self._what}: layer {desc.digest} is {compression.value}-compressed; "
                "a docker-archive stores uncompressed layers"
            )
        return True

    def _member(self, desc: Descriptor) -> str:
        hex_ = self._hex(desc)
        return f"{hex_}/layer.tar" if self._is_layer(desc) else f"{hex_}.json"

    def has_blob(self, desc: Descriptor) -> bool:
        """Whether this archive has the blob already."""
        return self._member(desc) in self._writer

    def put_blob(self, desc: Descriptor, path: Path) -> None:
        """Stream a layer (``<hex>/layer.tar``) or a config (``<hex>.json``) into the archive.

        :raises InvalidArgument: a compressed layer.
        :raises Unsupported: a digest that is not sha256.
        """
        name = self._member(desc)
        if "/" in name:
            self._writer.add_directory(name.partition("/")[0])
        self._writer.add_file(name, path)

    def put_manifest(self, manifest: Manifest, config: ImageConfig) -> None:
        """Add the image to manifest.json and repositories (written by :meth:`commit`).

        :raises InvalidArgument: the manifest names another config, or its layers are not
            the config's DiffIDs (they must be uncompressed).
        :raises FailedPrecondition: a layer was not put first.
        """
        if manifest.config.digest != config.digest:
            raise InvalidArgument(
                f"{self._what}: manifest {manifest.digest} names config "
                f"{manifest.config.digest}, not {config.digest}"
            )
        config_name = f"{self._hex(manifest.config)}.json"
        self._writer.add_bytes(config_name, config.raw)
        diff_ids = config.diff_ids
        if tuple(d.digest for d in manifest.layers) != diff_ids:
            raise InvalidArgument(
                f"{self._what}: the layers of manifest {manifest.digest} are not its config's "
                "DiffIDs; a docker-archive needs uncompressed layers"
            )
        layers = []
        for desc in manifest.layers:
            name = self._member(desc)
            if name not in self._writer:
                raise FailedPrecondition(f"{self._what}: layer {desc.digest} was not put")
            layers.append(name)
        tags = []
        if self._tag is not None:
            name, tag = self._tag
            tags.append(f"{name}:{tag}")
            if layers:
                self._repositories.setdefault(name, {})[tag] = layers[-1].partition("/")[0]
        self._entries.append({"Config": config_name, "RepoTags": tags, "Layers": layers})

    def commit(self) -> None:
        """Add manifest.json and repositories and rename the archive into place.

        :raises FailedPrecondition: no manifest was put, or the sink is closed.
        """
        if not self._entries:
            raise FailedPrecondition(f"{self._what}: nothing to commit (no manifest put)")
        for name, document in (
            (_MANIFEST_FILE, self._entries),
            (_REPOSITORIES_FILE, self._repositories),
        ):
            self._writer.add_bytes(name, json.dumps(document, separators=(",", ":")).encode())
        self._writer.commit()

    def close(self) -> None:
        """Without a commit: remove the temporary archive."""
        self._writer.abort()
