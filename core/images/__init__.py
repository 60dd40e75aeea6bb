"""Layer 5, images: documents, references, transports, and the import and export pipeline.

The public part is what someone who reads or writes images needs beside a store: the image
documents (:class:`Descriptor`, :class:`Manifest`, :class:`Index`, :class:`ImageConfig`,
:class:`Platform`, and :func:`parse_manifest` and :func:`parse_config`, which check them), the two
protocols a transport implements (:class:`ImageSource`, :class:`ImageSink`) with its row of the
transport table (:class:`Transport`, :class:`PathAndReference`, :class:`LocationSyntax`; a plugin
registers it with the ``laminae_register_transports`` hook), and the names of images
(:class:`Reference` and :func:`parse_reference` for ``registry/repository:tag@digest``,
:class:`ImageLocation` and :func:`parse_location` for ``TRANSPORT:DETAILS``, :func:`local_name` for
a name in a store)::

    from laminae import images

    location = images.parse_location("docker://quay.io/podman/hello:latest")
    manifest = images.parse_manifest(raw, media_type=None, what="hello's manifest")

Importing this namespace costs nothing: each name is imported on first use (:pep:`562`), and
the transports themselves (with the registry client, httpx) only when an import, export, pull
or push runs. The rest of the package is private: the transports (``_layout``,
``_archivefile``, ``_dockerarchive``, ``_registry``) and their table (``_transports``), the
pipeline (``_transfer``), progress reporting (public as :class:`laminae.Progress` and its
implementations) and :class:`~laminae.images._store.ImageStore`, the image records of
:class:`laminae.Store`.

May import: :mod:`laminae.store`, :mod:`laminae.driverkit`, :mod:`laminae.archive`,
:mod:`laminae.kernel` and :mod:`laminae._exceptions`. See docs/architecture.md.
"""

import importlib as _importlib

# Not typing.TYPE_CHECKING, as in laminae/__init__.py: the import would cost more than this
# module does.
TYPE_CHECKING = False
if TYPE_CHECKING:
    # What type checkers and editors see; at run time __getattr__ imports the same names on
    # first use (tests/test_api.py checks that both agree).
    from laminae.images._image import (
        Descriptor,
        ImageConfig,
        ImageSink,
        ImageSource,
        Index,
        Manifest,
        Platform,
        parse_config,
        parse_manifest,
    )
    from laminae.images._reference import Reference, local_name, parse_reference
    from laminae.images._transports import (
        ImageLocation,
        LocationSyntax,
        PathAndReference,
        Transport,
        parse_location,
    )

_PUBLIC: dict[str, str] = {
    **dict.fromkeys(
        (
            "Descriptor",
            "ImageConfig",
            "ImageSink",
            "ImageSource",
            "Index",
            "Manifest",
            "Platform",
            "parse_config",
            "parse_manifest",
        ),
        "laminae.images._image",
    ),
    **dict.fromkeys(("Reference", "local_name", "parse_reference"), "laminae.images._reference"),
    **dict.fromkeys(
        ("ImageLocation", "LocationSyntax", "PathAndReference", "Transport", "parse_location"),
        "laminae.images._transports",
    ),
}
"""Each public name and the module that defines it."""

__all__ = [
    "Descriptor",
    "ImageConfig",
    "ImageLocation",
    "ImageSink",
    "ImageSource",
    "Index",
    "LocationSyntax",
    "Manifest",
    "PathAndReference",
    "Platform",
    "Reference",
    "Transport",
    "local_name",
    "parse_config",
    "parse_location",
    "parse_manifest",
    "parse_reference",
]

if not TYPE_CHECKING:
    # Hidden from type checkers, as in laminae/__init__.py.

    def __getattr__(name: str) -> object:
        """Import a public name on first use, and keep it.

        :raises AttributeError: ``name`` is not one.
        """
        module = _PUBLIC.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(_importlib.import_module(module), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})


del TYPE_CHECKING
