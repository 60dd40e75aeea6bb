"""Build OCI image layouts of test images, and copy images between sources and sinks.

:func:`write_layout` writes a layout by hand (hashlib, json, gzip, zstandard), not through
laminae's sinks, so a test of a source does not share a bug with the sink. :func:`copy_image`
does what the import/export pipeline does with a source and a sink, verifying every digest,
so the transports can be tested on their own.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import zstandard

from laminae.images._image import (
    ImageSink,
    ImageSource,
    Index,
    Manifest,
    Platform,
    parse_config,
    parse_manifest,
    select_manifest,
)

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
REF_NAME = "org.opencontainers.image.ref.name"


@attrs.frozen
class BuiltImage:
    """What :func:`write_layout` wrote, for a test to compare against.

    :param manifest_digest: the manifest of the image for the platform asked for.
    :param index_digest: the nested index of a multi-platform image (else ``None``); the
        index.json entry points at it.
    :param platforms: every platform's manifest digest, by ``str(platform)``.
    """

    manifest_digest: str
    manifest: bytes
    config: bytes
    config_digest: str
    diff_ids: tuple[str, ...]
    layer_digests: tuple[str, ...]
    layers: tuple[bytes, ...]
    """The layer blobs as written (compressed)."""
    index_digest: str | None = None
    platforms: dict[str, str] = attrs.field(factory=dict)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _encode(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    assert compression == "none", compression
    return data


def _put(directory: Path, data: bytes) -> str:
    name = digest(data)
    path = directory / "blobs" / "sha256" / name.removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return name


def _platform_json(platform: str) -> dict[str, str]:
    parts = platform.split("/")
    out = {"architecture": parts[1], "os": parts[0]}
    if len(parts) > 2:
        out["variant"] = parts[2]
    return out


def _write_image(
    directory: Path, layers: Sequence[bytes], compression: str, platform: str
) -> BuiltImage:
    diff_ids = tuple(digest(layer) for layer in layers)
    blobs = tuple(_compress(layer, compression) for layer in layers)
    layer_digests = tuple(_put(directory, blob) for blob in blobs)
    config = _encode(
        {
            "created": "2024-01-01T00:00:00Z",
            **_platform_json(platform),
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
        }
    )
    config_digest = _put(directory, config)
    manifest = _encode(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": LAYER_TYPES[compression], "digest": d, "size": len(b)}
                for d, b in zip(layer_digests, blobs, strict=True)
            ],
        }
    )
    manifest_digest = _put(directory, manifest)
    return BuiltImage(
        manifest_digest,
        manifest,
        config,
        config_digest,
        diff_ids,
        layer_digests,
        blobs,
        platforms={platform: manifest_digest},
    )


def write_layout(
    directory: Path,
    layers: Sequence[bytes],
    *,
    ref: str | None = "v1",
    compression: str = "gzip",
    platform: str = "linux/amd64",
    multi_platform: bool = False,
) -> BuiltImage:
    """Write an image of ``layers`` (plain tars, base first) into the layout ``directory``.

    The layout is created when missing; an existing index.json gets one more entry.

    :param ref: the entry's ref name annotation (``None`` for none).
    :param compression: "gzip", "zstd" or "none", for every layer.
    :param platform: the image's platform ("os/arch[/variant]").
    :param multi_platform: write a nested index with ``platform`` and one other
        (linux/arm64/v8, or linux/amd64 when ``platform`` is that), the other's layers
        reversed so its manifest differs; index.json points at the nested index.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_bytes(_encode({"imageLayoutVersion": "1.0.0"}))
    image = _write_image(directory, layers, compression, platform)
    entry: dict[str, Any] = {
        "mediaType": MEDIA_MANIFEST,
        "digest": image.manifest_digest,
        "size": len(image.manifest),
    }
    if multi_platform:
        other = "linux/arm64/v8" if platform == "linux/amd64" else "linux/amd64"
        second = _write_image(directory, list(reversed(layers)), compression, other)
        index = _encode(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_INDEX,
                "manifests": [
                    {
                        "mediaType": MEDIA_MANIFEST,
                        "digest": built.manifest_digest,
                        "size": len(built.manifest),
                        "platform": _platform_json(name),
                    }
                    for built, name in ((image, platform), (second, other))
                ],
            }
        )
        index_digest = _put(directory, index)
        entry = {"mediaType": MEDIA_INDEX, "digest": index_digest, "size": len(index)}
        image = attrs.evolve(
            image,
            index_digest=index_digest,
            platforms={platform: image.manifest_digest, other: second.manifest_digest},
        )
    if ref is not None:
        entry["annotations"] = {REF_NAME: ref}
    index_path = directory / "index.json"
    document: dict[str, Any] = (
        json.loads(index_path.read_bytes())
        if index_path.exists()
        else {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []}
    )
    document["manifests"].append(entry)
    index_path.write_bytes(_encode(document))
    return image


def read_blob(source: ImageSource, desc: Any) -> bytes:
    """A blob of ``source`` whole, checked against its descriptor (test images are small)."""
    with source.open_blob(desc) as stream:
        data = stream.read()
    assert len(data) == desc.size, (desc.digest, len(data), desc.size)
    assert digest(data) == desc.digest, desc.digest
    return data


def resolve_manifest(source: ImageSource, platform: str | None = None) -> Manifest:
    """The manifest ``source`` names, through its index for ``platform`` if it has one."""
    raw, media_type = source.resolve()
    document = parse_manifest(raw, media_type=media_type, what=source.describe())
    if isinstance(document, Index):
        wanted = Platform.parse(platform) if platform else None
        desc = select_manifest(document, wanted, what=source.describe())
        raw = source.fetch_manifest(desc)
        assert digest(raw) == desc.digest
        document = parse_manifest(raw, media_type=desc.media_type, what=desc.digest)
    assert isinstance(document, Manifest)
    return document


def copy_image(
    source: ImageSource, sink: ImageSink, workdir: Path, *, platform: str | None = None
) -> Manifest:
    """Copy one image as the pipeline would: every blob through a file, verified; then the
    manifest; then commit. Layers pass unchanged (no recompression).

    :returns: the manifest copied.
    """
    manifest = resolve_manifest(source, platform)
    config = parse_config(read_blob(source, manifest.config), what=manifest.config.digest)
    workdir.mkdir(parents=True, exist_ok=True)
    for desc in (manifest.config, *manifest.layers):
        if sink.has_blob(desc):
            continue
        path = workdir / desc.digest.replace(":", "-")
        hasher = hashlib.sha256()
        with source.open_blob(desc) as stream, path.open("wb") as out:
            for chunk in iter(lambda: stream.read(1 << 16), b""):
                hasher.update(chunk)
                out.write(chunk)
        assert "sha256:" + hasher.hexdigest() == desc.digest
        sink.put_blob(desc, path)
        path.unlink()
    sink.put_manifest(manifest, config)
    sink.commit()
    return manifest
