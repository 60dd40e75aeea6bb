"""OCI and Docker image documents: descriptors, manifests, indexes, configs, platforms.

An image is a tree of content-addressed JSON documents over layer blobs::

    index (optional, one entry per platform)
      └── manifest ── config      (rootfs.diff_ids: one DiffID per layer, base first)
                  └── layers[]    (blobs: tar, tar+gzip or tar+zstd, base first)

Every document is kept as the exact bytes it arrived as (``raw``), because its digest is over
those bytes; the attrs values beside them are what laminae reads. Parsing checks what the
image-spec requires and nothing it leaves open: unknown fields and annotations pass through,
and an error names the blob it came from.

The transports (OCI layouts, archives, registries) meet the import and export pipeline at two
small protocols, :class:`ImageSource` and :class:`ImageSink`, at the end of this module.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import itertools
import json
import platform as _platform
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol

import attrs

from laminae._exceptions import InvalidArgument, LimitExceeded, NotFound, Unsupported
from laminae.archive._compression import Compression

__all__ = [
    "ANNOTATION_REF_NAME",
    "MANIFEST_MEDIA_TYPES",
    "MAX_CONFIG_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_MANIFEST_BYTES",
    "MEDIA_DOCKER_CONFIG",
    "MEDIA_DOCKER_LAYER",
    "MEDIA_DOCKER_LAYER_GZIP",
    "MEDIA_DOCKER_LIST",
    "MEDIA_DOCKER_MANIFEST",
    "MEDIA_OCI_CONFIG",
    "MEDIA_OCI_INDEX",
    "MEDIA_OCI_LAYER",
    "MEDIA_OCI_LAYER_GZIP",
    "MEDIA_OCI_LAYER_ZSTD",
    "Descriptor",
    "ImageConfig",
    "ImageSink",
    "ImageSource",
    "Index",
    "Manifest",
    "Platform",
    "build_index",
    "build_manifest",
    "check_blob_digest",
    "encode_json",
    "layer_compression",
    "layer_media_type",
    "load_json",
    "load_json_object",
    "new_hash",
    "parse_config",
    "parse_manifest",
    "select_manifest",
    "sha256_digest",
]

MEDIA_OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER: Final = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_LAYER_GZIP: Final = MEDIA_OCI_LAYER + "+gzip"
MEDIA_OCI_LAYER_ZSTD: Final = MEDIA_OCI_LAYER + "+zstd"
MEDIA_DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER: Final = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_DOCKER_LAYER_GZIP: Final = MEDIA_DOCKER_LAYER + ".gzip"
_DOCKER_SCHEMA1: Final = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

MANIFEST_MEDIA_TYPES: Final = (
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
)
"""What a client accepts for a manifest, in the order of preference."""

ANNOTATION_REF_NAME: Final = "org.opencontainers.image.ref.name"

_INDEX_TYPES: Final = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
_MANIFEST_TYPES: Final = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
# The layer media types laminae can apply, by compression. The nondistributable types are
# deprecated but must still be accepted (image-spec layer.md).
_LAYER_TYPES: Final = {
    MEDIA_OCI_LAYER: Compression.NONE,
    MEDIA_OCI_LAYER_GZIP: Compression.GZIP,
    MEDIA_OCI_LAYER_ZSTD: Compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    MEDIA_DOCKER_LAYER: Compression.NONE,
    MEDIA_DOCKER_LAYER_GZIP: Compression.GZIP,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": Compression.GZIP,
}
# image-spec descriptor.md: the registered algorithms, with their encoded forms.
_DIGESTS: Final = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}

MAX_MANIFEST_BYTES: Final = 4 << 20
"""The largest manifest or index (and index.json, manifest.json) laminae parses: the bound of
Docker's registry (distribution), which containers/image keeps too."""
MAX_CONFIG_BYTES: Final = 16 << 20
"""The largest image config laminae parses. Configs carry the history, so more room than a
manifest (containers/image allows 4 MiB); the import pipeline reads no more either."""
MAX_JSON_DEPTH: Final = 128
"""The deepest nesting of arrays and objects in a JSON document (serde_json's default). A real
manifest or config nests under 10; the bound keeps :func:`json.loads`, which recurses in C,
far from Python's recursion limit."""
# For the nesting scan: an escape in a string (a backslash and the byte after it), then a
# string. Once escapes are gone, every quote opens or closes a string.
_JSON_ESCAPE: Final = re.compile(rb"\\.", re.DOTALL)
_JSON_STRING: Final = re.compile(rb'"[^"]*"')
# Opening brackets to +1 and closing ones to -1 (as signed bytes); everything else dropped.
_BRACKET_STEPS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS: Final = bytes(sorted(set(range(256)) - set(b"[]{}")))
_DEPTH_BLOCK: Final = 1 << 16
# Go's GOARCH spellings, which image platforms use, for what Python's platform.machine() says.
_ARCH: Final = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}
_DEFAULT_VARIANT: Final = {"arm64": "v8", "arm": "v7"}


def sha256_digest(data: bytes) -> str:
    """The OCI digest of ``data`` (``sha256:<hex>``)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_blob_digest(digest: object, *, what: str) -> str:
    """``digest`` if it is a digest laminae can verify (sha256 or sha512), else an error.

    :raises InvalidArgument: not a digest at all (this also keeps ``../`` out of blob paths).
    :raises Unsupported: a well-formed digest of an algorithm laminae does not hash.
    """
    if not isinstance(digest, str) or ":" not in digest:
        raise InvalidArgument(f"{what}: digest {digest!r} is not 'algorithm:encoded'")
    algorithm, _, encoded = digest.partition(":")
    pattern = _DIGESTS.get(algorithm)
    if pattern is None:
        if re.fullmatch(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*", algorithm) and re.fullmatch(
            r"[a-zA-Z0-9=_-]+", encoded
        ):
            raise Unsupported(f"{what}: digest algorithm {algorithm!r} is not supported")
        raise InvalidArgument(f"{what}: digest {digest!r} is malformed")
    if not pattern.fullmatch(encoded):
        raise InvalidArgument(f"{what}: digest {digest!r} is malformed")
    return digest


def new_hash(digest: str) -> Any:
    """A fresh hashlib object for ``digest``'s algorithm (checked by :func:`check_blob_digest`)."""
    return hashlib.new(digest.partition(":")[0])


@attrs.frozen
class Platform:
    """Where an image runs: ``linux/amd64``, ``linux/arm64/v8``."""

    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``os/arch[/variant]``. :raises InvalidArgument: anything else."""
        parts = text.split("/") if isinstance(text, str) else []
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_.-]+", p) for p in parts):
            raise InvalidArgument(f"platform {text!r}: expected os/arch[/variant], lower case")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine."""
        machine = _platform.machine()
        return cls("linux", _ARCH.get(machine, machine))

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, wanted: Platform) -> bool:
        """Whether an image for ``self`` serves ``wanted`` (a missing variant is the default)."""
        if (self.os, self.architecture) != (wanted.os, wanted.architecture):
            return False
        if wanted.variant is None:
            return True
        default = _DEFAULT_VARIANT.get(self.architecture)
        return (self.variant or default) == wanted.variant

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        if self.os_version:
            out["os.version"] = self.os_version
        return out


@attrs.frozen
class Descriptor:
    """A pointer to a blob: its media type, digest and size (image-spec descriptor.md)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = attrs.field(factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    artifact_type: str | None = None

    @classmethod
    def from_json(cls, obj: object, *, what: str) -> Descriptor:
        """Read a descriptor object. :raises InvalidArgument: naming ``what`` and the field."""
        if not isinstance(obj, dict):
            raise InvalidArgument(f"{what}: a descriptor must be an object")
        media_type = obj.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            raise InvalidArgument(f"{what}: descriptor has no mediaType")
        digest = check_blob_digest(obj.get("digest"), what=what)
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"{what}: descriptor {digest} has no valid size")
        platform = None
        if isinstance(obj.get("platform"), dict):
            p = obj["platform"]
            if not isinstance(p.get("os"), str) or not isinstance(p.get("architecture"), str):
                raise InvalidArgument(f"{what}: descriptor {digest} has a malformed platform")
            platform = Platform(p["os"], p["architecture"], p.get("variant"), p.get("os.version"))
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            annotations=_string_map(obj.get("annotations"), what),
            platform=platform,
            urls=tuple(u for u in obj.get("urls") or () if isinstance(u, str)),
            artifact_type=obj.get("artifactType"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out


@attrs.frozen
class Manifest:
    """An image manifest: a config and layers, base first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str]
    raw: bytes = attrs.field(repr=False)
    digest: str

    @property
    def is_docker(self) -> bool:
        return self.media_type == MEDIA_DOCKER_MANIFEST


@attrs.frozen
class Index:
    """An image index (or Docker manifest list): one manifest per platform."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str]
    raw: bytes = attrs.field(repr=False)
    digest: str


@attrs.frozen
class ImageConfig:
    """An image config: the DiffIDs of its layers and how to run it (image-spec config.md)."""

    raw: bytes = attrs.field(repr=False)
    digest: str
    data: Mapping[str, Any] = attrs.field(repr=False)

    @property
    def os(self) -> str:
        return str(self.data.get("os", ""))

    @property
    def architecture(self) -> str:
        return str(self.data.get("architecture", ""))

    @property
    def variant(self) -> str | None:
        value = self.data.get("variant")
        return value if isinstance(value, str) else None

    @property
    def created(self) -> str | None:
        value = self.data.get("created")
        return value if isinstance(value, str) else None

    @property
    def diff_ids(self) -> tuple[str, ...]:
        return tuple(self.data["rootfs"]["diff_ids"])

    @property
    def history(self) -> list[dict[str, Any]]:
        value = self.data.get("history")
        return [h for h in value if isinstance(h, dict)] if isinstance(value, list) else []

    @property
    def container_config(self) -> dict[str, Any]:
        """The ``config`` object: Env, Cmd, Entrypoint, WorkingDir, User, Labels..."""
        value = self.data.get("config")
        return dict(value) if isinstance(value, dict) else {}

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant)


def _string_map(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidArgument(f"{what}: annotations must map strings to strings")
    return dict(value)


def _nested_deeper_than(raw: bytes, depth: int) -> bool:
    """Whether the arrays and objects of the JSON text ``raw`` (UTF-8) nest deeper than
    ``depth``, found without parsing.

    Escapes go first, then strings, so a bracket in a string does not count (UTF-8 never puts
    a quote or a backslash inside a multi-byte character, so the bytes are scanned as they
    are); the brackets left become a run of +1 and -1 whose running sum is the depth. Every
    step is a C loop, and a run too deep stops at its first block. In a document that is not
    JSON the count may be off past the first error, where the parser stops anyway.
    """
    if b"\\" in raw:
        raw = _JSON_ESCAPE.sub(b"", raw)
    steps = _JSON_STRING.sub(b"", raw).translate(_BRACKET_STEPS, _NOT_BRACKETS)
    level = 0
    for start in range(0, len(steps), _DEPTH_BLOCK):
        block = array.array("b", steps[start : start + _DEPTH_BLOCK])
        if max(itertools.accumulate(block, initial=level)) > depth:
            return True
        level += sum(block)
    return False


def load_json(raw: bytes, what: str, *, limit: int = MAX_MANIFEST_BYTES) -> Any:
    """``raw``, a JSON document in UTF-8, parsed, within bounds of size and nesting.

    The nesting is measured before parsing: :func:`json.loads` recurses once per level, and a
    document of a hundred thousand ``[`` would end in ``RecursionError``, not an answer.

    :param what: the document, as messages name it (a blob's digest, a file's path).
    :param limit: the largest document accepted, in bytes.
    :raises LimitExceeded: larger than ``limit``, or nested deeper than
        :data:`MAX_JSON_DEPTH`; both are :class:`InvalidArgument`.
    :raises InvalidArgument: not UTF-8, or not JSON.
    """
    if len(raw) > limit:
        raise LimitExceeded(
            f"{what}: {len(raw)} bytes, above the limit of {limit} for a JSON document"
        )
    try:
        # UTF-8 only, as Go's encoding/json reads (json.loads would also take UTF-16 and 32,
        # which the nesting scan cannot see through).
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{what}: not valid JSON ({exc})") from exc
    if _nested_deeper_than(raw, MAX_JSON_DEPTH):
        raise LimitExceeded(f"{what}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and an integer of more than 4300 digits
        raise InvalidArgument(f"{what}: not valid JSON ({exc})") from exc


def load_json_object(raw: bytes, what: str, *, limit: int = MAX_MANIFEST_BYTES) -> dict[str, Any]:
    """``raw`` as a JSON object, read by :func:`load_json`.

    :raises InvalidArgument: not JSON, or not an object.
    :raises LimitExceeded: too large or too deeply nested.
    """
    data = load_json(raw, what, limit=limit)
    if not isinstance(data, dict):
        raise InvalidArgument(f"{what}: not a JSON object")
    return data


def parse_manifest(raw: bytes, *, media_type: str | None, what: str) -> Manifest | Index:
    """Read a manifest or an index from its exact bytes.

    :param media_type: what the transport said the document is (a registry's Content-Type);
        ``None`` if it does not know. A body whose ``mediaType`` disagrees is refused
        (distribution-spec: "reject a body whose mediaType disagrees").
    :raises InvalidArgument: malformed, naming ``what``.
    :raises LimitExceeded: larger than :data:`MAX_MANIFEST_BYTES`, or nested deeper than
        :data:`MAX_JSON_DEPTH` (also an :class:`InvalidArgument`).
    :raises Unsupported: a Docker schema 1 manifest, or a media type that is no image.
    """
    if media_type in _DOCKER_SCHEMA1:
        raise Unsupported(f"{what}: Docker schema 1 manifests are not supported")
    data = load_json_object(raw, what)
    declared = data.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise InvalidArgument(f"{what}: mediaType must be a string")
    if data.get("schemaVersion") == 1:
        raise Unsupported(f"{what}: Docker schema 1 manifests are not supported")
    if data.get("schemaVersion") != 2:
        raise InvalidArgument(f"{what}: schemaVersion must be 2")
    generic = (None, "application/json", "application/octet-stream", "text/plain")
    if declared and media_type not in generic and declared != media_type:
        raise InvalidArgument(f"{what}: served as {media_type} but its mediaType is {declared}")
    kind = declared or (media_type if media_type not in generic else None)
    if kind is None:  # an OCI document may omit mediaType: tell the two apart by shape
        kind = MEDIA_OCI_INDEX if "manifests" in data else MEDIA_OCI_MANIFEST
    digest = sha256_digest(raw)
    annotations = _string_map(data.get("annotations"), what)
    if kind in _INDEX_TYPES:
        entries = data.get("manifests")
        if not isinstance(entries, list):
            raise InvalidArgument(f"{what}: an index needs a manifests list")
        manifests = tuple(
            Descriptor.from_json(e, what=f"{what} manifests[{i}]") for i, e in enumerate(entries)
        )
        return Index(kind, manifests, annotations, raw, digest)
    if kind not in _MANIFEST_TYPES:
        raise Unsupported(f"{what}: media type {kind} is not an image manifest or index")
    if "config" not in data or not isinstance(data.get("layers"), list):
        raise InvalidArgument(f"{what}: a manifest needs a config and a layers list")
    config = Descriptor.from_json(data["config"], what=f"{what} config")
    layers = tuple(
        Descriptor.from_json(e, what=f"{what} layers[{i}]") for i, e in enumerate(data["layers"])
    )
    return Manifest(kind, config, layers, annotations, raw, digest)


def parse_config(raw: bytes, *, what: str) -> ImageConfig:
    """Read an image config.

    :raises InvalidArgument: malformed (``rootfs.type`` not "layers").
    :raises LimitExceeded: larger than :data:`MAX_CONFIG_BYTES`, or nested deeper than
        :data:`MAX_JSON_DEPTH` (also an :class:`InvalidArgument`).
    """
    data = load_json_object(raw, what, limit=MAX_CONFIG_BYTES)
    rootfs = data.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise InvalidArgument(f"{what}: rootfs.type must be 'layers'")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise InvalidArgument(f"{what}: rootfs.diff_ids must be a list")
    for i, diff_id in enumerate(diff_ids):
        check_blob_digest(diff_id, what=f"{what} rootfs.diff_ids[{i}]")
    return ImageConfig(raw, sha256_digest(raw), data)


def select_manifest(index: Index, platform: Platform | None, *, what: str) -> Descriptor:
    """The entry of ``index`` for ``platform`` (this host's when ``None``).

    Entries that are no image manifest (attestations, artifacts) are passed over.

    :raises NotFound: no entry matches; the message lists the platforms there are.
    """
    wanted = platform or Platform.host()
    images = [d for d in index.manifests if d.media_type in _MANIFEST_TYPES + _INDEX_TYPES]
    matching = [d for d in images if d.platform is not None and d.platform.matches(wanted)]
    if not matching and len(images) == 1 and images[0].platform is None:
        return images[0]
    if not matching:
        there = sorted({str(d.platform) for d in images if d.platform is not None})
        raise NotFound(f"{what}: no image for platform {wanted}; it has {', '.join(there)}")
    # An exact variant beats a default one (linux/arm64/v8 over linux/arm64 for a v8 host).
    matching.sort(key=lambda d: d.platform is None or d.platform.variant != wanted.variant)
    return matching[0]


def encode_json(document: Mapping[str, Any]) -> bytes:
    """Canonical JSON as the Go tools write it: compact, keys in the given order."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def build_manifest(
    config: Descriptor,
    layers: Sequence[Descriptor],
    *,
    docker: bool = False,
    annotations: Mapping[str, str] | None = None,
) -> Manifest:
    """A new manifest document (OCI, or Docker v2 with ``docker``), as exact bytes."""
    media_type = MEDIA_DOCKER_MANIFEST if docker else MEDIA_OCI_MANIFEST
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        document["annotations"] = dict(annotations)
    raw = encode_json(document)
    return Manifest(
        media_type, config, tuple(layers), dict(annotations or {}), raw, sha256_digest(raw)
    )


def build_index(
    manifests: Sequence[Descriptor], *, annotations: Mapping[str, str] | None = None
) -> Index:
    """A new OCI index document, as exact bytes."""
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_INDEX,
        "manifests": [m.to_json() for m in manifests],
    }
    if annotations:
        document["annotations"] = dict(annotations)
    raw = encode_json(document)
    return Index(
        MEDIA_OCI_INDEX, tuple(manifests), dict(annotations or {}), raw, sha256_digest(raw)
    )


def layer_compression(media_type: str, *, what: str) -> Compression:
    """How a layer of ``media_type`` is compressed. :raises Unsupported: not a layer type."""
    try:
        return _LAYER_TYPES[media_type]
    except KeyError:
        raise Unsupported(f"{what}: layer media type {media_type!r} is not supported") from None


def layer_media_type(compression: Compression, *, docker: bool = False) -> str:
    """The media type for a layer compressed with ``compression``."""
    if docker:
        if compression is Compression.ZSTD:
            raise Unsupported("Docker v2 manifests have no zstd layer type; use an OCI manifest")
        return MEDIA_DOCKER_LAYER_GZIP if compression is Compression.GZIP else MEDIA_DOCKER_LAYER
    return {
        Compression.NONE: MEDIA_OCI_LAYER,
        Compression.GZIP: MEDIA_OCI_LAYER_GZIP,
        Compression.ZSTD: MEDIA_OCI_LAYER_ZSTD,
    }[compression]


class ImageSource(Protocol):
    """Where an image comes from: a layout, an archive, a registry.

    A source only hands out bytes; the pipeline verifies every digest and size itself, so a
    source never has to be trusted.
    """

    def describe(self) -> str:
        """The location, as a user would write it (``oci:/srv/layout:v1``), for messages."""
        ...

    def resolve(self) -> tuple[bytes, str | None]:
        """The raw manifest or index the location names, and its media type if known."""
        ...

    def fetch_manifest(self, desc: Descriptor) -> bytes:
        """A manifest that an index points to, raw."""
        ...

    def open_blob(self, desc: Descriptor) -> contextlib.AbstractContextManager[BinaryIO]:
        """The blob's bytes as a stream. :raises NotFound: the source has no such blob."""
        ...

    def close(self) -> None: ...


class ImageSink(Protocol):
    """Where an image goes: a layout, an archive, a registry.

    The pipeline calls :meth:`put_blob` for every blob (after :meth:`has_blob` said no), then
    :meth:`put_manifest`, then :meth:`commit`. :meth:`close` without a commit leaves nothing
    half-written behind.
    """

    layer_compression: Compression | None
    """The compression this sink wants for layers; ``None`` leaves it to the caller."""

    docker_media_types: bool
    """Whether the sink needs Docker v2 media types (a ``docker save`` archive does)."""

    def describe(self) -> str: ...

    def has_blob(self, desc: Descriptor) -> bool: ...

    def put_blob(self, desc: Descriptor, path: Path) -> None:
        """Store the blob in file ``path``; its digest and size are already verified."""
        ...

    def put_manifest(self, manifest: Manifest, config: ImageConfig) -> None:
        """Store the image's manifest under the location's reference, after all its blobs."""
        ...

    def commit(self) -> None: ...

    def close(self) -> None: ...
