"""Image references: Docker's name grammar, normalised as distribution/reference does.

A **reference** names an image in a registry. The grammar is distribution/reference's, and
``parse_reference`` normalises as its ``ParseNormalizedNamed`` does::

    reference      := name [ ":" tag ] [ "@" digest ]
    name           := [ domain "/" ] path-component ( "/" path-component )*
    domain         := host [ ":" port ]        host := dns-name | "[" ipv6 "]"
    dns-name       := label ( "." label )*
    label          := [A-Za-z0-9] | [A-Za-z0-9] [A-Za-z0-9-]* [A-Za-z0-9]
    path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag            := [A-Za-z0-9_][A-Za-z0-9._-]{0,127}
    digest         := algorithm ":" hex        sha256: 64, sha384: 96, sha512: 128 lower-case hex

- The tag is what follows the last ":" *after the last "/"*, so a registry port is never a tag.
- The first "/"-separated component is the registry only if it holds "." or ":" or is
  "localhost"; otherwise the registry is "docker.io" (also the name of "index.docker.io") and a
  one-component name goes under "library/": ``busybox`` is ``docker.io/library/busybox``.
  An IPv4 address passes as a dns-name and has a ".", so ``127.0.0.1:5000/x`` has a registry.
- The repository must be lower-case (an upper-case first component is not a registry, so
  ``UPPER/x`` is an error, not a registry called UPPER); the full name "registry/repository" is
  at most 255 characters; 64 hex characters alone are an image id, not a name.
- Both a tag and a digest may be given; the digest then decides what is fetched.

Where an image is read from or written to (``oci:DIR:REF``, ``docker://REFERENCE``) is a
*location*: :mod:`laminae.images._transports` parses those.
"""

from __future__ import annotations

import re
from typing import Final, final

import attrs

from laminae._exceptions import InvalidArgument

__all__ = ["Reference", "local_name", "parse_reference"]

_DOCKER_HUB: Final = "docker.io"
_DOCKER_HUB_LEGACY: Final = "index.docker.io"
_OFFICIAL: Final = "library/"
_NAME_MAX: Final = 255
_DIGEST_HEX_LENGTH: Final = {"sha256": 64, "sha384": 96, "sha512": 128}

# One DNS label: alphanumerics, "-" allowed inside but not at either end.
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
# A registry: dotted labels (an IPv4 address is one) or a bracketed IPv6 address, then a port.
_DOMAIN: Final = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[A-Fa-f0-9:]+\])(?::[0-9]+)?")
# A repository path component: lower-case alphanumeric runs joined by ".", "_", "__" or "-"s.
_PATH_COMPONENT: Final = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_LOWER_HEX: Final = re.compile(r"[a-f0-9]+")


@final
@attrs.frozen
class Reference:
    """A normalised image reference; build one with :func:`parse_reference`.

    ``str(ref)`` is the full form (``docker.io/library/busybox:1.36``), which parses back to an
    equal value.
    """

    registry: str  #: "docker.io", "quay.io", "localhost:5000", "[::1]:5000"
    repository: str  #: "library/busybox", "ns/img"
    tag: str | None = None
    digest: str | None = None  #: "sha256:<64 hex>"

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_reference(self) -> str:
        """What the registry API is asked for: the digest if any, else the tag, else "latest"."""
        return self.digest or self.tag or "latest"

    @property
    def familiar(self) -> str:
        """The short form people type: "docker.io/" and a lone "library/" dropped."""
        name = self.name
        if self.registry == _DOCKER_HUB:
            name = self.repository
            if name.startswith(_OFFICIAL) and name.count("/") == 1:
                name = name[len(_OFFICIAL) :]
        return name + self._suffix()

    def _suffix(self) -> str:
        tag = f":{self.tag}" if self.tag is not None else ""
        digest = f"@{self.digest}" if self.digest is not None else ""
        return tag + digest

    def __str__(self) -> str:
        return self.name + self._suffix()


def parse_reference(text: str) -> Reference:
    """Parse and normalise an image reference such as ``busybox:1.36`` or ``quay.io/ns/x@sha256:…``.

    :param text: the reference as typed.
    :raises InvalidArgument: naming ``text``, when it breaks the grammar in the module docstring.
    """

    def invalid(why: str) -> InvalidArgument:
        return InvalidArgument(f"invalid image reference {text!r}: {why}")

    if not text:
        raise invalid("it is empty")
    if len(text) == 64 and _LOWER_HEX.fullmatch(text):
        raise invalid("64 hex characters are an image id, not a repository name")
    rest, at, digest = text.partition("@")
    if at:
        algorithm, _, hex_ = digest.partition(":")
        length = _DIGEST_HEX_LENGTH.get(algorithm)
        if length is None:
            raise invalid(f"digest {digest!r} is not sha256:, sha384: or sha512: and hex")
        if len(hex_) != length or not _LOWER_HEX.fullmatch(hex_):
            raise invalid(f"digest {digest!r} needs {length} lower-case hex digits")
    # A ":" before the last "/" belongs to the registry's port, not to a tag.
    colon = rest.rfind(":")
    name, tag = (rest[:colon], rest[colon + 1 :]) if colon > rest.rfind("/") else (rest, None)
    if tag is not None and not _TAG.fullmatch(tag):
        raise invalid(f"tag {tag!r} is not 1-128 of [A-Za-z0-9_.-] (not starting with . or -)")
    if not name:
        raise invalid("it has no repository name")
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _DOMAIN.fullmatch(first):
            raise invalid(f"registry {first!r} is not host[:port]")
        registry, repository = first, remainder
    else:
        registry, repository = _DOCKER_HUB, name
    if registry == _DOCKER_HUB_LEGACY:
        registry = _DOCKER_HUB
    if registry == _DOCKER_HUB and "/" not in repository:
        repository = _OFFICIAL + repository
    if repository != repository.lower():
        raise invalid(f"repository {repository!r} must be lower-case")
    for component in repository.split("/"):
        if not component:
            raise invalid("the repository has an empty component (a '//' or an end '/')")
        if not _PATH_COMPONENT.fullmatch(component):
            raise invalid(f"repository component {component!r} is not [a-z0-9] joined by . _ __ -")
    if len(registry) + 1 + len(repository) > _NAME_MAX:
        raise invalid(f"the name is longer than {_NAME_MAX} characters")
    return Reference(registry, repository, tag, digest if at else None)


def local_name(text: str) -> str:
    """The name an image gets in the local store: ``text`` as typed, ":latest" added when it has
    neither tag nor digest (``hello`` -> ``hello:latest``).

    :param text: an image reference.
    :raises InvalidArgument: when ``text`` is not a valid reference.
    """
    ref = parse_reference(text)
    return text if ref.tag is not None or ref.digest is not None else f"{text}:latest"
