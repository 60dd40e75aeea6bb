"""Image locations, and the table of transports that read and write them.

A **location** says where an image is read from or written to, in the spelling of
containers-transports(5) that skopeo, podman and buildah share: ``NAME:DETAILS``, where NAME
picks a :class:`Transport` from the table and the transport reads DETAILS. Built in::

    oci:DIR[:REF]                    an OCI image layout directory; REF is an OCI ref name
    oci-archive:FILE[:REF]           a tar of such a directory
    docker-archive:FILE[:NAME|@N]    a ``docker save`` tar; NAME[:TAG], or "@N" (N-th image)
    docker://REFERENCE               an image in a registry

A path ends at the first ":" after the transport, as containers/image splits it
(``strings.SplitN(details, ":", 2)``): ``oci:dir:ref:with:colons`` is the directory "dir" and the
ref "ref:with:colons" (OCI ref names may hold ":", "@" and "+"). So a path holding ":" cannot be
written at all, and :class:`ImageLocation` refuses one, which keeps
``parse_location(str(loc)) == loc``. A plain reference is not a location: the transport is never
guessed.

Adding a transport
------------------
A transport is one module plus one entry in the table:

1. The module reads and writes images where they live: a class satisfying
   :class:`~laminae.images.ImageSource` (``resolve``, ``fetch_manifest``, ``open_blob``: bytes
   only, the pipeline checks every digest and size itself) and one satisfying
   :class:`~laminae.images.ImageSink` (``has_blob``, ``put_blob``, ``put_manifest``, then
   ``commit``; ``close`` without a commit leaves nothing behind). Their ``describe()`` spells
   the location for messages.
2. The entry is a :class:`Transport`: its ``name``, its ``usage`` and ``summary`` for the help,
   its ``syntax`` (:class:`PathAndReference` for ``NAME:PATH[:REF]``, or any
   :class:`LocationSyntax`), and ``open_source`` and ``open_sink``, which build the two classes
   from an :class:`ImageLocation`. They import the module when called, so that parsing a
   location never loads a transport (the registry's loads httpx). ``remote=True`` makes the
   pipeline fetch blobs ahead while earlier layers apply; ``default_names`` names an image
   imported without names (by default, the location's reference).
3. A built-in transport's entry goes into ``_BUILT_IN`` below, and a row into docs/cli.md's
   table of locations (tests/test_transports.py checks that the docs list every built-in
   transport). A third-party distribution registers its entry from a plugin module,
   declared under the ``laminae.drivers`` entry-point group like a driver::

       from laminae import driverkit
       from laminae.images import PathAndReference, Transport

       @driverkit.hookimpl
       def laminae_register_transports(register):
           register(Transport("dir", "dir:PATH", "a directory of blobs", PathAndReference(),
                              open_source=open_dir_source, open_sink=open_dir_sink))

   A name that is taken, by a built-in transport or another plugin's, is refused with an
   error naming both. Built-in transports are found without the plugin manager; the installed
   plugins are asked (once per process) only for a name that is not built in.

See docs/architecture.md, "add an image transport".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Protocol, final

import attrs

from laminae._exceptions import InvalidArgument
from laminae.images._credentials import RegistryOptions
from laminae.images._reference import local_name, parse_reference

if TYPE_CHECKING:
    from laminae.images._image import ImageSink, ImageSource

__all__ = [
    "ImageLocation",
    "LocationSyntax",
    "PathAndReference",
    "Transport",
    "built_in_transports",
    "installed_transports",
    "open_sink",
    "open_source",
    "parse_location",
    "reference_names",
    "transport_of",
]

# A transport's name, as containers-transports(5) spells theirs ("docker-archive", "sif").
_NAME: Final = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
# The image-spec's org.opencontainers.image.ref.name: alphanumeric runs joined by one of
# "-._:@+" or by "--", in "/"-separated components (containers/image's refRegexp).
_OCI_COMPONENT: Final = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_OCI_REF: Final = re.compile(rf"{_OCI_COMPONENT}(?:/{_OCI_COMPONENT})*")
_ARCHIVE_INDEX: Final = re.compile(r"@[0-9]+")
_BUILT_IN_ORIGIN: Final = "laminae (built in)"


# -- how a transport spells its details ----------------------------------------------------


class LocationSyntax(Protocol):
    """How a transport spells the DETAILS of ``NAME:DETAILS``.

    Each method raises :class:`~laminae.InvalidArgument` with a clause saying what is wrong
    ("it has an empty path"); the caller puts the location in front of it.
    """

    def parse(self, details: str) -> tuple[Path | None, str | None]:
        """Split ``details`` into the location's path and reference (either may be ``None``)."""
        ...

    def check(self, path: Path | None, reference: str | None) -> None:
        """Refuse fields that this transport cannot use or :meth:`spell` cannot write."""
        ...

    def spell(self, path: Path | None, reference: str | None) -> str:
        """The details that :meth:`parse` reads back as ``path`` and ``reference``."""
        ...


def _no_reference(reference: str) -> None:
    raise InvalidArgument(f"it takes no reference, and {reference!r} follows the path")


@final
@attrs.frozen
class PathAndReference:
    """``PATH[:REF]``: a file or directory, then a reference if the transport takes one.

    :param check_reference: refuses a reference this transport cannot use, raising
        :class:`~laminae.InvalidArgument` with a clause; by default every reference is refused.
    """

    check_reference: Callable[[str], None] = _no_reference

    def parse(self, details: str) -> tuple[Path | None, str | None]:
        """Split at the first ":", as containers/image does: a path can never hold one."""
        path, colon, reference = details.partition(":")
        if not path:
            raise InvalidArgument("it has an empty path")
        if colon and not reference:
            raise InvalidArgument("it has an empty reference after ':'")
        return Path(path), reference or None

    def check(self, path: Path | None, reference: str | None) -> None:
        """A path without ":", and a reference that ``check_reference`` accepts."""
        if path is None:
            raise InvalidArgument("it needs a path")
        if ":" in str(path):
            raise InvalidArgument("the path holds ':', which the location syntax cannot express")
        if reference is not None:
            self.check_reference(reference)

    def spell(self, path: Path | None, reference: str | None) -> str:
        """``PATH`` or ``PATH:REF``."""
        return f"{path}" if reference is None else f"{path}:{reference}"


@final
class _RegistryReference:
    """``//REFERENCE``: an image reference in Docker's grammar, and no path."""

    __slots__ = ()  # stateless: a plain class, as attrs would only add start-up time

    def parse(self, details: str) -> tuple[Path | None, str | None]:
        if not details.startswith("//"):
            raise InvalidArgument("a registry location is 'docker://REFERENCE'")
        if not details[2:]:
            raise InvalidArgument("it names no image")
        return None, details[2:]

    def check(self, path: Path | None, reference: str | None) -> None:
        if path is not None:
            raise InvalidArgument("a registry location has no path")
        if reference is None:
            raise InvalidArgument("it names no image")
        parse_reference(reference)

    def spell(self, path: Path | None, reference: str | None) -> str:
        return f"//{reference}"


def _oci_ref_name(reference: str) -> None:
    if not _OCI_REF.fullmatch(reference):
        raise InvalidArgument(f"{reference!r} is not an OCI ref name")


def _archive_tag(reference: str) -> None:
    if _ARCHIVE_INDEX.fullmatch(reference):
        return
    try:
        ref = parse_reference(reference)
    except InvalidArgument as err:
        raise InvalidArgument(f"{err} (or give an image index as '@N')") from err
    if ref.digest is not None:
        raise InvalidArgument("a docker-archive reference names a tag, not a digest")


# -- the table's rows ------------------------------------------------------------------------


def reference_names(location: ImageLocation, source: ImageSource) -> list[str]:
    """The default of :attr:`Transport.default_names`: the location's reference, as a store
    name (``:latest`` added without a tag), or no name when it has none."""
    return [local_name(location.reference)] if location.reference else []


@final
@attrs.frozen
class Transport:
    """One row of the transport table: everything laminae knows about one ``NAME:``.

    :param name: what a location starts with, before the ":" (``oci``, ``docker-archive``):
        lower-case letters, digits and inner "-".
    :param usage: the location spelt out for the help, starting with ``NAME:``
        (``oci:DIR[:REF]``).
    :param summary: what such a location is, for the help: a line of at most 46 characters.
    :param syntax: how the details after ``NAME:`` read and are checked.
    :param open_source: the :class:`~laminae.images.ImageSource` for a location; it gets the
        call's registry options (credentials, TLS), which most transports ignore.
    :param open_sink: the :class:`~laminae.images.ImageSink` for a location, likewise.
    :param remote: the blobs come over a network, so the import fetches them ahead.
    :param default_names: the names an image imported from here gets when the caller gives
        none, from the location and the opened source.
    :raises InvalidArgument: a name that is not one, or a usage that does not start with it.
    """

    name: str
    usage: str
    summary: str
    syntax: LocationSyntax
    open_source: Callable[[ImageLocation, RegistryOptions], ImageSource] = attrs.field(repr=False)
    open_sink: Callable[[ImageLocation, RegistryOptions], ImageSink] = attrs.field(repr=False)
    remote: bool = False
    default_names: Callable[[ImageLocation, ImageSource], Sequence[str]] = attrs.field(
        default=reference_names, repr=False
    )

    def __attrs_post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise InvalidArgument(
                f"image transport name {self.name!r}: must be lower-case letters and digits, "
                "joined by '-', starting with a letter"
            )
        if not self.usage.startswith(f"{self.name}:"):
            raise InvalidArgument(
                f"image transport {self.name!r}: its usage {self.usage!r} must start with "
                f"'{self.name}:'"
            )


def _path_of(location: ImageLocation) -> Path:
    # PathAndReference.check refused a location without one; this tells the type checker.
    assert location.path is not None
    return location.path


# The openers import their transport's module when called, so that parsing a location (as the
# CLI does before it opens the store) loads no transport, and only "docker" loads httpx.


def _oci_source(location: ImageLocation, registry: RegistryOptions) -> ImageSource:
    from laminae.images._layout import OCILayoutSource

    return OCILayoutSource(_path_of(location), location.reference)


def _oci_sink(location: ImageLocation, registry: RegistryOptions) -> ImageSink:
    from laminae.images._layout import OCILayoutSink

    return OCILayoutSink(_path_of(location), location.reference)


def _oci_archive_source(location: ImageLocation, registry: RegistryOptions) -> ImageSource:
    from laminae.images._layout import OCIArchiveSource

    return OCIArchiveSource(_path_of(location), location.reference)


def _oci_archive_sink(location: ImageLocation, registry: RegistryOptions) -> ImageSink:
    from laminae.images._layout import OCIArchiveSink

    return OCIArchiveSink(_path_of(location), location.reference)


def _docker_archive_source(location: ImageLocation, registry: RegistryOptions) -> ImageSource:
    from laminae.images._dockerarchive import DockerArchiveSource

    return DockerArchiveSource(_path_of(location), location.reference)


def _docker_archive_sink(location: ImageLocation, registry: RegistryOptions) -> ImageSink:
    from laminae.images._dockerarchive import DockerArchiveSink

    return DockerArchiveSink(_path_of(location), location.reference)


def _docker_archive_names(location: ImageLocation, source: ImageSource) -> list[str]:
    """What ``docker load`` names the image: every RepoTag of the one picked."""
    from laminae.images._dockerarchive import DockerArchiveSource

    if isinstance(source, DockerArchiveSource):
        return [local_name(tag) for tag in source.repo_tags]
    return reference_names(location, source)


def _registry_source(location: ImageLocation, registry: RegistryOptions) -> ImageSource:
    from laminae.images._registry import RegistrySource

    assert location.reference is not None  # _RegistryReference.check refused none
    return RegistrySource(parse_reference(location.reference), registry)


def _registry_sink(location: ImageLocation, registry: RegistryOptions) -> ImageSink:
    from laminae.images._registry import RegistrySink

    assert location.reference is not None
    return RegistrySink(parse_reference(location.reference), registry)


def _registry_names(location: ImageLocation, source: ImageSource) -> list[str]:
    """The reference in its full form (``docker.io/library/busybox:latest``), as podman does."""
    assert location.reference is not None
    return [str(parse_reference(location.reference))]


def _by_name(transports: Iterable[Transport]) -> Mapping[str, Transport]:
    return MappingProxyType({t.name: t for t in transports})


_BUILT_IN: Final = _by_name(
    [
        Transport(
            "oci",
            "oci:DIR[:REF]",
            "an OCI image layout directory",
            PathAndReference(_oci_ref_name),
            open_source=_oci_source,
            open_sink=_oci_sink,
        ),
        Transport(
            "oci-archive",
            "oci-archive:FILE[:REF]",
            "a tar of an OCI image layout",
            PathAndReference(_oci_ref_name),
            open_source=_oci_archive_source,
            open_sink=_oci_archive_sink,
        ),
        Transport(
            "docker-archive",
            "docker-archive:FILE[:NAME|@N]",
            "a 'docker save' tar; NAME or @N picks an image",
            PathAndReference(_archive_tag),
            open_source=_docker_archive_source,
            open_sink=_docker_archive_sink,
            default_names=_docker_archive_names,
        ),
        Transport(
            "docker",
            "docker://REFERENCE",
            "an image in a registry",
            _RegistryReference(),
            open_source=_registry_source,
            open_sink=_registry_sink,
            remote=True,
            default_names=_registry_names,
        ),
    ]
)


# -- the table --------------------------------------------------------------------------------


def built_in_transports() -> Mapping[str, Transport]:
    """The transports laminae brings, by name, in the order the help lists them."""
    return _BUILT_IN


@functools.cache
def installed_transports() -> Mapping[str, Transport]:
    """Every transport by name: the built-in ones, then those of the installed plugins.

    The plugins' ``laminae_register_transports`` hooks run on the first call only.

    :raises InvalidArgument: a plugin registers a name that is taken (naming both origins),
        or something that is not a :class:`Transport`.
    :raises LaminaeError: a plugin's hook failed otherwise (naming the plugin).
    """
    # The plugin manager (pluggy, and the entry-point scan) is needed only here: a built-in
    # transport is found without it.
    from laminae.driverkit._plugins import collect_transports

    table = dict(_BUILT_IN)
    origins = dict.fromkeys(table, _BUILT_IN_ORIGIN)

    def register_for(origin: str) -> Callable[[Any], None]:
        def register(transport: Any) -> None:
            if not isinstance(transport, Transport):
                raise InvalidArgument(f"{origin}: register() takes a Transport, not {transport!r}")
            taken = origins.get(transport.name)
            if taken is not None:
                raise InvalidArgument(
                    f"image transport {transport.name!r} of {origin} is refused: "
                    f"the name is taken by {taken}"
                )
            table[transport.name] = transport
            origins[transport.name] = origin

        return register

    collect_transports(register_for)
    return MappingProxyType(table)


def _find(name: str) -> Transport | None:
    return _BUILT_IN.get(name) or installed_transports().get(name)


def _known(separator: str) -> str:
    return ", ".join(f"{name}{separator}" for name in installed_transports())


# -- locations --------------------------------------------------------------------------------


@final
@attrs.frozen
class ImageLocation:
    """Where an image is read or written: a transport and its path or reference.

    ``str(loc)`` spells it as :func:`parse_location` reads it. The constructor checks the
    fields with the transport's syntax, so every value is one that can be written down.

    :raises InvalidArgument: an unknown transport, or fields the transport refuses (built in:
        a path for "docker" or none for the others, a path holding ":", a reference the
        transport does not accept).
    """

    transport: str  #: a name in the transport table ("oci", "docker", ...)
    path: Path | None = None  #: the layout directory or archive file; None for "docker"
    #: oci / oci-archive: the ref name; docker-archive: "name[:tag]" or "@N"; docker: the
    #: reference as typed (give it to :func:`parse_reference`); None: none given.
    reference: str | None = None

    def __attrs_post_init__(self) -> None:
        def invalid(why: str) -> InvalidArgument:
            return InvalidArgument(f"invalid image location {str(self)!r}: {why}")

        entry = _find(self.transport)
        if entry is None:
            raise invalid(f"unknown transport (known: {_known('')})")
        if self.reference == "":
            raise invalid("the reference is empty (leave it out instead)")
        try:
            entry.syntax.check(self.path, self.reference)
        except InvalidArgument as err:
            raise invalid(str(err)) from err

    def __str__(self) -> str:
        entry = _find(self.transport)
        # Only the message about an unknown transport spells one that has no syntax.
        syntax = entry.syntax if entry is not None else PathAndReference()
        return f"{self.transport}:{syntax.spell(self.path, self.reference)}"


def parse_location(text: str) -> ImageLocation:
    """Parse a location in skopeo's spelling (see the module docstring).

    :param text: e.g. ``oci:/srv/layout:v1``, ``docker-archive:/x.tar:@0``,
        ``docker://localhost:5000/ns/img:tag``.
    :raises InvalidArgument: naming ``text``: no or an unknown transport (listing the known
        ones; a plain image reference gets a hint to write ``docker://``), or details the
        transport does not accept (built in: "docker:" without "//", an empty path or
        reference, a reference of the wrong kind).
    """
    name, colon, details = text.partition(":")
    entry = _find(name) if colon else None
    if entry is None:
        why = "names no transport" if not colon else f"has an unknown transport {name!r}"
        hint = ""
        try:
            parse_reference(text)
            hint = f"; for an image in a registry write 'docker://{text}'"
        except InvalidArgument:
            pass
        raise InvalidArgument(f"image location {text!r} {why} (known: {_known(':')}){hint}")
    try:
        path, reference = entry.syntax.parse(details)
    except InvalidArgument as err:
        raise InvalidArgument(f"image location {text!r}: {err}") from err
    return ImageLocation(name, path, reference)


def transport_of(location: ImageLocation) -> Transport:
    """The table's row for ``location``'s transport.

    :raises InvalidArgument: the transport is gone from the table (a plugin unregistered).
    """
    entry = _find(location.transport)
    if entry is None:
        raise InvalidArgument(
            f"image location {str(location)!r}: transport {location.transport!r} is not "
            f"installed (known: {_known('')})"
        )
    return entry


def open_source(location: ImageLocation, registry: RegistryOptions | None = None) -> ImageSource:
    """The :class:`~laminae.images.ImageSource` for ``location``, from its transport."""
    return transport_of(location).open_source(location, registry or RegistryOptions())


def open_sink(location: ImageLocation, registry: RegistryOptions | None = None) -> ImageSink:
    """The :class:`~laminae.images.ImageSink` for ``location``, from its transport."""
    return transport_of(location).open_sink(location, registry or RegistryOptions())
