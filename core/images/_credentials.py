"""How laminae reaches registries: plain-HTTP hosts, CAs, and whose credentials.

Kept apart from the HTTP client (``_registry.py``) so that reading a config, or naming
:class:`RegistryOptions` in the API, does not import httpx.

Credentials are the explicit ones, else the first auth file that has the host (or the host
and a repository prefix): ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``,
``~/.config/containers/auth.json``, ``~/.docker/config.json``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

import attrs

from laminae._exceptions import InvalidArgument

__all__ = ["DOCKER_HUB", "RegistryOptions", "find_credentials", "split_port"]

DOCKER_HUB: Final = "docker.io"
_DOCKER_HUB_AUTH_KEYS: Final = ("docker.io", "index.docker.io", "registry-1.docker.io")


def _normalise_hosts(value: Iterable[str]) -> frozenset[str]:
    # A lone string would otherwise become a set of its letters.
    if isinstance(value, str):
        raise InvalidArgument(f"insecure hosts: expected a collection of hosts, got {value!r}")
    return frozenset(value)


@attrs.frozen
class RegistryOptions:
    """How to reach registries: which hosts speak plain HTTP, whose credentials, which CAs.

    :param insecure_hosts: ``"host"`` or ``"host:port"`` entries that are spoken to over plain
        HTTP; every other host gets TLS with certificate verification. A bare host covers
        every port.
    :param credentials: ``(username, password)`` for every registry; ``None`` reads the auth
        files.
    :param auth_file: the one auth file to read (containers' ``auth.json`` format) instead of
        the default list; it must exist.
    :param certs_dir: a ``certs.d``-style directory: ``<host[:port]>/*.crt`` are CAs trusted
        for that host besides the system's, ``*.cert`` with ``*.key`` a client certificate.
    :param timeout: seconds to wait to connect, or for any one read or write.
    """

    insecure_hosts: frozenset[str] = attrs.field(default=frozenset(), converter=_normalise_hosts)
    credentials: tuple[str, str] | None = None
    auth_file: Path | None = None
    certs_dir: Path | None = None
    timeout: float = 60.0

    def is_insecure(self, host: str) -> bool:
        """Whether ``host`` (``"name"`` or ``"name:port"``) is to be spoken to in plain HTTP."""
        name = split_port(host)[0]
        return host in self.insecure_hosts or name in self.insecure_hosts


def split_port(host: str) -> tuple[str, str | None]:
    if host.startswith("["):  # an IPv6 literal, "[::1]:5000"
        name, _, rest = host.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else None
    name, sep, port = host.rpartition(":")
    return (name, port) if sep and port.isdigit() else (host, None)


# -- credentials ------------------------------------------------------------------------------


def _default_auth_files(environ: Mapping[str, str]) -> list[Path]:
    # The order containers/image (podman, skopeo, buildah) reads them in.
    files: list[Path] = []
    if environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(environ["REGISTRY_AUTH_FILE"]))
    if environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    config_home = environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    files.append(Path(config_home) / "containers" / "auth.json")
    files.append(home / ".docker" / "config.json")
    return files


def _auth_key(key: str) -> str:
    # containers' normalizeAuthFileKey: a key with a scheme is Docker's legacy form
    # ("https://index.docker.io/v1/"), of which only the host counts; others may name a
    # repository prefix ("quay.io/ns").
    if "://" in key:
        key = key.partition("://")[2].partition("/")[0]
    if key in _DOCKER_HUB_AUTH_KEYS:
        return DOCKER_HUB
    return key.rstrip("/")


def _read_auths(path: Path) -> dict[str, tuple[str, str]]:
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read auth file: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise InvalidArgument(f"{path}: auth file is not valid JSON: {exc}") from exc
    auths = document.get("auths") if isinstance(document, dict) else None
    if auths is None:
        return {}
    if not isinstance(auths, dict):
        raise InvalidArgument(f"{path}: 'auths' must be an object")
    found: dict[str, tuple[str, str]] = {}
    for key, entry in auths.items():
        encoded = entry.get("auth") if isinstance(entry, dict) else None
        if not encoded:
            # An identity token, or a credential helper's entry: not something laminae reads.
            continue
        try:
            username, sep, password = (
                base64.b64decode(encoded, validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError, TypeError) as exc:
            raise InvalidArgument(
                f"{path}: 'auths.{key}.auth' is not base64 of user:password"
            ) from exc
        if not sep:
            raise InvalidArgument(f"{path}: 'auths.{key}.auth' is not base64 of user:password")
        found.setdefault(_auth_key(key), (username, password))
    return found


def find_credentials(
    registry: str,
    repository: str,
    *,
    auth_file: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> tuple[str, str] | None:
    """The username and password the auth files hold for ``registry``/``repository``.

    Within a file the most specific key wins (``host/ns/app``, then ``host/ns``, then
    ``host``); the first file with a match wins.

    :param registry: the registry as references name it (``docker.io``, ``localhost:5000``).
    :param auth_file: read only this file instead of the default list.
    :param environ: where ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR``, ``$XDG_CONFIG_HOME``
        and ``$HOME`` come from.
    :raises InvalidArgument: ``auth_file`` does not exist; a file is malformed (named).
    """
    if auth_file is not None:
        if not auth_file.is_file():
            raise InvalidArgument(f"{auth_file}: auth file does not exist or is not a file")
        files = [auth_file]
    else:
        files = _default_auth_files(environ)
    parts = repository.split("/")
    keys = [f"{registry}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)]
    keys.append(registry)
    for path in files:
        auths = _read_auths(path)
        for key in keys:
            if key in auths:
                return auths[key]
    return None
