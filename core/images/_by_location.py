"""The store's import and export by location: ``oci:DIR:REF`` in, a pipeline run, an image out.

The location is looked up in the transport table (:mod:`laminae.images._transports`), its source
or sink opened, and :mod:`laminae.images._transfer` does the rest; nothing here knows one
transport from another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from laminae._exceptions import InvalidArgument
from laminae.images._credentials import RegistryOptions
from laminae.images._image import Platform
from laminae.images._reference import local_name
from laminae.images._transfer import export_image, import_image
from laminae.images._transports import ImageLocation, parse_location, transport_of
from laminae.store._records import Image, check_key

if TYPE_CHECKING:
    from laminae.archive._compression import Compression
    from laminae.images._progress import Progress
    from laminae.store._staging import Staging

__all__ = ["export_to", "import_from"]


def _location(value: str | ImageLocation) -> ImageLocation:
    if isinstance(value, ImageLocation):
        return value
    if not isinstance(value, str):
        raise InvalidArgument(f"image location {value!r}: must be a string")
    return parse_location(value)


def import_from(
    store: Staging,
    source: str | ImageLocation,
    names: Sequence[str],
    platform: str | None,
    registry: RegistryOptions | None,
    progress: Progress | None,
    jobs: int | None,
) -> Image:
    """:meth:`Store.import_image`, from a location string.

    Without ``names`` the image gets its transport's default names (the location's reference).
    """
    location = _location(source)
    transport = transport_of(location)
    wanted = None if platform is None else Platform.parse(platform)
    checked = [check_key("image name", local_name(n)) for n in names]
    opened = transport.open_source(location, registry or RegistryOptions())
    with contextlib.closing(opened):
        if not checked:
            checked = list(transport.default_names(location, opened))
        return import_image(
            store,
            opened,
            names=checked,
            platform=wanted,
            progress=progress,
            jobs=jobs,
            prefetch=transport.remote,
        )


def export_to(
    store: Staging,
    ref: str,
    destination: str | ImageLocation,
    compression: Compression | None,
    registry: RegistryOptions | None,
    progress: Progress | None,
    jobs: int | None,
) -> str:
    """:meth:`Store.export_image`, to a location string."""
    location = _location(destination)
    sink = transport_of(location).open_sink(location, registry or RegistryOptions())
    with contextlib.closing(sink):
        return export_image(store, ref, sink, compression=compression, progress=progress, jobs=jobs)
