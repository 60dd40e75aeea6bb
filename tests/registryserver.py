"""Real registries for the tests: Debian's docker-registry (CNCF distribution 2.8) on 127.0.0.1.

Four fixtures, each a fresh registry with its own config and storage under ``tmp_path``,
stopped by PID after the test:

- ``registry``: anonymous, plain HTTP;
- ``auth_registry``: HTTP basic auth from an htpasswd file (bcrypt, made by ``htpasswd -B``);
- ``token_registry``: bearer tokens from a small token service run here, on 127.0.0.1, that
  checks Basic credentials and signs JWTs with a key whose self-signed certificate is the
  registry's ``rootcertbundle``;
- ``tls_registry``: anonymous, over TLS with a certificate for 127.0.0.1 from a test CA
  (``.ca``, a PEM file) that nothing trusts unless told.

tests/conftest.py loads this module as a plugin, so every test module can ask for them by
name.

A missing docker-registry (or htpasswd) binary skips the test, except under ``CI=true``,
where the tools are installed by scripts/test-all and their absence is a failure.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tools import require_tool

__all__ = [
    "RegistryServer",
    "TokenService",
    "auth_registry",
    "free_port",
    "registry",
    "tls_registry",
    "token_registry",
]

USERNAME = "laminae"
PASSWORD = "s3cret-pass"
SERVICE = "laminae-test-registry"
ISSUER = "laminae-test-issuer"
_STARTUP_SECONDS = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _self_signed(key: ec.EllipticCurvePrivateKey, name: str) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA, and a server certificate for 127.0.0.1 it signed: (ca, cert, key) PEM files."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _self_signed(ca_key, "laminae test CA").sign(ca_key, hashes.SHA256())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class TokenService:
    """A Docker token service: Basic credentials in, a signed JWT for the asked scope out.

    Valid credentials get every action they ask for; no credentials get a token with no
    access (as Docker Hub gives anonymous users for private repositories); wrong ones get 401.

    :ivar requests: every token request, as (username or None, [scope, ...]).
    :ivar field: the response's name for the token, ``"token"`` or ``"access_token"``.
    :ivar expires_in: the lifetime the response gives the token, in seconds.
    """

    def __init__(self, directory: Path, username: str, password: str) -> None:
        self.username = username
        self.password = password
        self.requests: list[tuple[str | None, list[str]]] = []
        self.field = "token"
        self.expires_in = 300
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = _self_signed(self._key, "laminae test token signer").sign(
            self._key, hashes.SHA256()
        )
        self.rootcertbundle = directory / "token-signer.pem"
        self.rootcertbundle.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = int(self._server.server_address[1])
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def sign(self, scopes: list[str], subject: str) -> str:
        """A token for ``scopes`` (``repository:NAME:ACTIONS``), as distribution 2.8 checks it:
        issuer, audience = the service, unexpired, and an ``x5c`` chain to its root bundle."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"x5c": [x5c]})

    def _grant(self, authorization: str | None, query: dict[str, list[str]]) -> tuple[int, Any]:
        user: str | None = None
        if authorization is not None:
            scheme, _, encoded = authorization.partition(" ")
            try:
                given = base64.b64decode(encoded).decode()
            except ValueError:
                given = ""
            if scheme.lower() != "basic" or given != f"{self.username}:{self.password}":
                self.requests.append((None, query.get("scope", [])))
                return 401, {"details": "incorrect username or password"}
            user = self.username
        scopes = query.get("scope", [])
        self.requests.append((user, scopes))
        token = self.sign(scopes if user else [], user or "")
        return 200, {
            self.field: token,
            "expires_in": self.expires_in,
            "issued_at": "2024-01-01T00:00:00Z",
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path != "/token":
                    status, body = 404, {"details": "not found"}
                else:
                    query = parse_qs(parts.query)
                    status, body = service._grant(self.headers.get("Authorization"), query)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        return Handler


class RegistryServer:
    """A running docker-registry.

    :ivar host: ``"127.0.0.1:PORT"``, as a reference names it.
    :ivar storage: its storage root (``docker/registry/v2/...``), to corrupt a blob.
    :ivar username: the user allowed in (auth registries), else ``None``.
    :ivar password: that user's password, else ``None``.
    :ivar tokens: the token service (token registry), else ``None``.
    :ivar ca: the CA that signed the server's certificate (TLS registry), else ``None``.
    """

    def __init__(
        self,
        directory: Path,
        auth: dict[str, Any] | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        tokens: TokenService | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = directory / "storage"
        self.storage.mkdir()
        self.username = username
        self.password = password
        self.tokens = tokens
        self.ca = tls[0] if tls is not None else None
        self.log = directory / "registry.log"
        # docker-registry takes YAML; JSON is YAML, so no YAML writer is needed.
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        if auth is not None:
            config["auth"] = auth
        if tls is not None:
            config["http"]["tls"] = {"certificate": str(tls[1]), "key": str(tls[2])}
        self._scheme = "https" if tls is not None else "http"
        self.config = directory / "config.yml"
        self.config.write_text(json.dumps(config, indent=2))
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = require_tool("docker-registry")
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                [binary, "serve", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + _STARTUP_SECONDS
        while True:
            try:
                httpx.get(f"{self._scheme}://{self.host}/v2/", timeout=1.0, verify=False)
                return
            except httpx.TransportError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"docker-registry did not come up on {self.host}:\n{self.log_text()}")
            time.sleep(0.05)  # bounded polling for the server to come up

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (filesystem driver layout)."""
        algorithm, _, hexdigest = digest.partition(":")
        return (
            self.storage
            / "docker/registry/v2/blobs"
            / algorithm
            / hexdigest[:2]
            / hexdigest
            / "data"
        )


def _serve(server: RegistryServer) -> Iterator[RegistryServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="registry")
def registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """An anonymous, plain-HTTP docker-registry on 127.0.0.1."""
    directory = tmp_path / "registry"
    directory.mkdir()
    yield from _serve(RegistryServer(directory))


@pytest.fixture(name="tls_registry")
def tls_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """An anonymous docker-registry over TLS, its certificate signed by ``.ca``."""
    directory = tmp_path / "tls-registry"
    directory.mkdir()
    yield from _serve(RegistryServer(directory, tls=make_tls_files(directory)))


@pytest.fixture(name="auth_registry")
def auth_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """A docker-registry that wants HTTP basic auth (htpasswd, bcrypt)."""
    htpasswd = require_tool("htpasswd")
    require_tool("docker-registry")
    directory = tmp_path / "auth-registry"
    directory.mkdir()
    users = directory / "htpasswd"
    entry = subprocess.run(
        [htpasswd, "-Bbn", USERNAME, PASSWORD], check=True, capture_output=True
    ).stdout
    users.write_bytes(entry.strip() + b"\n")
    auth = {"htpasswd": {"realm": "laminae-test", "path": str(users)}}
    server = RegistryServer(directory, auth, username=USERNAME, password=PASSWORD)
    yield from _serve(server)


@pytest.fixture(name="token_registry")
def token_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """A docker-registry that wants bearer tokens, from a token service on 127.0.0.1."""
    require_tool("docker-registry")
    directory = tmp_path / "token-registry"
    directory.mkdir()
    tokens = TokenService(directory, USERNAME, PASSWORD)
    auth = {
        "token": {
            "realm": tokens.realm,
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(tokens.rootcertbundle),
        }
    }
    server = RegistryServer(directory, auth, username=USERNAME, password=PASSWORD, tokens=tokens)
    tokens.start()
    try:
        yield from _serve(server)
    finally:
        tokens.stop()
