"""From a location as users spell it (``oci:DIR:REF``, ``docker://REF``) to a source or sink.

One place knows every transport, so that the store's import and export take a string and the
transports stay unaware of the store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from laminae._exceptions import InvalidArgument
from laminae.archive._compression import Compression
from laminae.images._dockerarchive import DockerArchiveSink, DockerArchiveSource
from laminae.images._image import ImageSink, ImageSource, Platform
from laminae.images._layout import OCIArchiveSink, OCIArchiveSource, OCILayoutSink, OCILayoutSource
from laminae.images._progress import Progress
from laminae.images._reference import ImageLocation, local_name, parse_location, parse_reference
from laminae.images._transfer import export_image, import_image
from laminae.store._records import Image, check_key

if TYPE_CHECKING:
    from laminae.images._registry import RegistryOptions
    from laminae.images._store import ImageStore

__all__ = ["export_to", "import_from", "open_sink", "open_source"]


def _location(value: str | ImageLocation) -> ImageLocation:
    if isinstance(value, ImageLocation):
        return value
    if not isinstance(value, str):
        raise InvalidArgument(f"image location {value!r}: must be a string")
    return parse_location(value)


def open_source(location: ImageLocation, registry: RegistryOptions | None) -> ImageSource:
    """The :class:`ImageSource` for ``location``."""
    if location.transport == "oci":
        return OCILayoutSource(location.path, location.reference)  # type: ignore[arg-type]
    if location.transport == "oci-archive":
        return OCIArchiveSource(location.path, location.reference)  # type: ignore[arg-type]
    if location.transport == "docker-archive":
        return DockerArchiveSource(location.path, location.reference)  # type: ignore[arg-type]
    # httpx is imported only when a registry is used: layouts and archives never need it.
    from laminae.images._registry import RegistryOptions, RegistrySource

    assert location.reference is not None
    return RegistrySource(parse_reference(location.reference), registry or RegistryOptions())


def open_sink(location: ImageLocation, registry: RegistryOptions | None) -> ImageSink:
    """The :class:`ImageSink` for ``location``."""
    if location.transport == "oci":
        return OCILayoutSink(location.path, location.reference)  # type: ignore[arg-type]
    if location.transport == "oci-archive":
        return OCIArchiveSink(location.path, location.reference)  # type: ignore[arg-type]
    if location.transport == "docker-archive":
        return DockerArchiveSink(location.path, location.reference)  # type: ignore[arg-type]
    from laminae.images._registry import RegistryOptions, RegistrySink

    assert location.reference is not None
    return RegistrySink(parse_reference(location.reference), registry or RegistryOptions())


def _default_names(location: ImageLocation, source: ImageSource) -> list[str]:
    """The names an image gets when the caller gives none: the source's own reference."""
    if location.transport == "docker":
        assert location.reference is not None
        return [str(parse_reference(location.reference))]
    if isinstance(source, DockerArchiveSource):
        return [local_name(t) for t in source.repo_tags]
    if location.reference:
        return [local_name(location.reference)]
    return []


def import_from(
    store: ImageStore,
    source: str | ImageLocation,
    names: Sequence[str],
    platform: str | None,
    registry: RegistryOptions | None,
    progress: Progress | None,
    jobs: int | None,
) -> Image:
    """:meth:`Store.import_image`, from a location string."""
    location = _location(source)
    wanted = None if platform is None else Platform.parse(platform)
    checked = [check_key("image name", local_name(n)) for n in names]
    with contextlib.closing(open_source(location, registry)) as opened:
        if not checked:
            checked = _default_names(location, opened)
        return import_image(
            store,
            opened,
            names=checked,
            platform=wanted,
            progress=progress,
            jobs=jobs,
            prefetch=location.transport == "docker",
        )


def export_to(
    store: ImageStore,
    ref: str,
    destination: str | ImageLocation,
    compression: Compression | None,
    registry: RegistryOptions | None,
    progress: Progress | None,
    jobs: int | None,
) -> str:
    """:meth:`Store.export_image`, to a location string."""
    location = _location(destination)
    with contextlib.closing(open_sink(location, registry)) as sink:
        return export_image(store, ref, sink, compression=compression, progress=progress, jobs=jobs)
