"""The registry client against real registries (Debian's docker-registry) and skopeo."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import pytest
from registryserver import RegistryServer, free_port
from tarbuild import make_tar
from tools import require_tool

from laminae._exceptions import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from laminae.archive._compression import Compression
from laminae.images._image import (
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    Manifest,
    build_manifest,
    parse_config,
    sha256_digest,
)
from laminae.images._reference import parse_reference
from laminae.images._registry import (
    RegistryClient,
    RegistryOptions,
    RegistrySink,
    RegistrySource,
    find_credentials,
)


@attrs.frozen
class Blob:
    descriptor: Descriptor
    path: Path

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


@attrs.frozen
class Image:
    manifest: Manifest
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)


def _blob(directory: Path, data: bytes, media_type: str) -> Blob:
    digest = sha256_digest(data)
    path = directory / digest.replace(":", "-")
    path.write_bytes(data)
    return Blob(Descriptor(media_type, digest, len(data)), path)


def make_image(directory: Path, files: dict[str, bytes] | None = None) -> Image:
    """A one-layer OCI image built by hand: a gzip layer, a config naming its DiffID."""
    directory.mkdir(parents=True, exist_ok=True)
    tar = make_tar(files or {"hello.txt": b"hello from laminae\n"}, dirs=["etc"])
    layer = _blob(directory, gzip.compress(tar, mtime=0), MEDIA_OCI_LAYER_GZIP)
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar)]},
        "history": [{"created_by": "laminae tests"}],
    }
    config = _blob(directory, json.dumps(config_doc).encode(), MEDIA_OCI_CONFIG)
    manifest = build_manifest(config.descriptor, [layer.descriptor])
    return Image(manifest, config, (layer,))


def push(client: RegistryClient, repository: str, tag: str, image: Image) -> str:
    for blob in image.blobs:
        desc = blob.descriptor
        if not client.has_blob(repository, desc.digest, push=True):
            client.upload_blob(repository, desc.digest, desc.size, blob.path)
    return client.put_manifest(repository, tag, image.manifest.raw, image.manifest.media_type)


def read_blob(client: RegistryClient, repository: str, digest: str) -> bytes:
    with client.open_blob(repository, digest) as stream:
        return stream.read()


def insecure(server: RegistryServer, **kwargs: Any) -> RegistryOptions:
    return RegistryOptions(insecure_hosts=frozenset({server.host}), **kwargs)


@pytest.fixture
def image(tmp_path: Path) -> Image:
    return make_image(tmp_path / "image")


@pytest.fixture(autouse=True)
def no_auth_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the real user's auth files out of the tests."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for variable in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(variable, raising=False)


# -- push and pull --------------------------------------------------------------------------


def test_push_then_pull_gives_the_same_bytes(registry: RegistryServer, image: Image) -> None:
    with RegistryClient(registry.host, insecure(registry)) as client:
        digest = push(client, "laminae/hello", "v1", image)
        assert digest == image.manifest.digest
        raw, media_type, served = client.manifest("laminae/hello", "v1")
        assert raw == image.manifest.raw
        assert media_type == MEDIA_OCI_MANIFEST
        assert served == image.manifest.digest
        for blob in image.blobs:
            assert read_blob(client, "laminae/hello", blob.descriptor.digest) == blob.data
        by_digest = client.manifest("laminae/hello", image.manifest.digest)
        assert by_digest[0] == image.manifest.raw


def test_blob_streams_in_pieces(registry: RegistryServer, tmp_path: Path) -> None:
    big = make_image(tmp_path / "big", {"big.bin": bytes(range(256)) * 8192})
    layer = big.layers[0]
    with RegistryClient(registry.host, insecure(registry)) as client:
        push(client, "laminae/big", "v1", big)
        with client.open_blob("laminae/big", layer.descriptor.digest) as stream:
            pieces = iter(lambda: stream.read(1000), b"")
            hasher = hashlib.sha256()
            sizes = []
            for piece in pieces:
                hasher.update(piece)
                sizes.append(len(piece))
    assert "sha256:" + hasher.hexdigest() == layer.descriptor.digest
    assert max(sizes) == 1000
    assert sum(sizes) == layer.descriptor.size


def test_has_blob_and_push_skips_what_is_there(registry: RegistryServer, image: Image) -> None:
    with RegistryClient(registry.host, insecure(registry)) as client:
        digest = image.layers[0].descriptor.digest
        assert not client.has_blob("laminae/hello", digest)
        push(client, "laminae/hello", "v1", image)
        assert client.has_blob("laminae/hello", digest)
        assert not client.has_blob("laminae/other", digest)


def test_cross_repository_mount(registry: RegistryServer, image: Image) -> None:
    layer = image.layers[0].descriptor
    with RegistryClient(registry.host, insecure(registry)) as client:
        push(client, "laminae/source", "v1", image)
        # A path that does not exist: a mount sends no bytes.
        client.upload_blob(
            "laminae/target",
            layer.digest,
            layer.size,
            image.layers[0].path,
            mount_from="laminae/source",
        )
        assert client.has_blob("laminae/target", layer.digest)


def test_tags_lists_every_tag(registry: RegistryServer, image: Image) -> None:
    with RegistryClient(registry.host, insecure(registry)) as client:
        for tag in ("v1", "v2", "latest"):
            push(client, "laminae/hello", tag, image)
        assert sorted(client.tags("laminae/hello")) == ["latest", "v1", "v2"]
        with pytest.raises(NotFound, match="laminae/nothing"):
            client.tags("laminae/nothing")


def test_put_manifest_by_digest(registry: RegistryServer, image: Image) -> None:
    with RegistryClient(registry.host, insecure(registry)) as client:
        for blob in image.blobs:
            desc = blob.descriptor
            client.upload_blob("laminae/hello", desc.digest, desc.size, blob.path)
        manifest = image.manifest
        assert (
            client.put_manifest("laminae/hello", manifest.digest, manifest.raw, manifest.media_type)
            == manifest.digest
        )
        assert client.manifest("laminae/hello", manifest.digest)[0] == manifest.raw
        with pytest.raises(InvalidArgument, match="not sha256:0000"):
            client.put_manifest(
                "laminae/hello", "sha256:" + "0" * 64, manifest.raw, manifest.media_type
            )


def test_manifest_naming_missing_blobs_is_refused_with_the_registry_reason(
    registry: RegistryServer, image: Image
) -> None:
    with (
        RegistryClient(registry.host, insecure(registry)) as client,
        pytest.raises(InvalidArgument, match=r"BLOB_UNKNOWN|blob unknown"),
    ):
        client.put_manifest("laminae/hello", "v1", image.manifest.raw, image.manifest.media_type)


def test_upload_refuses_a_file_of_the_wrong_size(registry: RegistryServer, image: Image) -> None:
    layer = image.layers[0]
    with (
        RegistryClient(registry.host, insecure(registry)) as client,
        pytest.raises(InvalidArgument, match=str(layer.path)),
    ):
        client.upload_blob(
            "laminae/hello", layer.descriptor.digest, layer.descriptor.size + 1, layer.path
        )


# -- errors ---------------------------------------------------------------------------------


def test_missing_tag_is_not_found(registry: RegistryServer, image: Image) -> None:
    with RegistryClient(registry.host, insecure(registry)) as client:
        push(client, "laminae/hello", "v1", image)
        with pytest.raises(NotFound, match=r"manifest nope.*MANIFEST_UNKNOWN"):
            client.manifest("laminae/hello", "nope")
        with pytest.raises(NotFound, match="manifest v1"):
            client.manifest("laminae/absent", "v1")


def test_missing_blob_is_not_found(registry: RegistryServer, image: Image) -> None:
    missing = "sha256:" + "ab" * 32
    with RegistryClient(registry.host, insecure(registry)) as client:
        push(client, "laminae/hello", "v1", image)
        with pytest.raises(NotFound, match=missing), client.open_blob("laminae/hello", missing):
            pass


def test_tls_is_used_unless_the_host_is_insecure(registry: RegistryServer) -> None:
    with RegistryClient(registry.host, RegistryOptions(timeout=10)) as client:
        assert client.base_url.startswith("https://")
        with pytest.raises(Unavailable, match=f"--insecure-registry {registry.host}") as info:
            client.manifest("laminae/hello", "v1")
    assert info.value.__cause__ is not None


def test_tls_with_the_registry_ca_from_certs_dir(
    tls_registry: RegistryServer, image: Image, tmp_path: Path
) -> None:
    assert tls_registry.ca is not None
    with (
        RegistryClient(tls_registry.host, RegistryOptions(timeout=10)) as client,
        pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.manifest("laminae/hello", "v1")
    certs = tmp_path / "certs.d"
    (certs / tls_registry.host).mkdir(parents=True)
    (certs / tls_registry.host / "ca.crt").write_bytes(tls_registry.ca.read_bytes())
    with RegistryClient(tls_registry.host, RegistryOptions(certs_dir=certs)) as client:
        assert client.base_url.startswith("https://")
        push(client, "laminae/hello", "v1", image)
        assert client.manifest("laminae/hello", "v1")[0] == image.manifest.raw


def test_an_unloadable_certificate_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "certs.d" / "registry.example"
    folder.mkdir(parents=True)
    (folder / "ca.crt").write_text("not a certificate")
    with pytest.raises(InvalidArgument, match=str(folder)):
        RegistryClient("registry.example", RegistryOptions(certs_dir=tmp_path / "certs.d"))


def test_an_insecure_bare_host_covers_every_port(registry: RegistryServer) -> None:
    options = RegistryOptions(insecure_hosts=frozenset({"127.0.0.1"}))
    assert options.is_insecure(registry.host)
    assert not options.is_insecure("example.com:5000")
    with RegistryClient(registry.host, options) as client:
        assert client.base_url == f"http://{registry.host}/v2/"
        with pytest.raises(NotFound):
            client.manifest("laminae/hello", "v1")


def test_a_registry_that_is_not_listening_is_unavailable() -> None:
    host = f"127.0.0.1:{free_port()}"
    options = RegistryOptions(insecure_hosts=frozenset({host}), timeout=5)
    with RegistryClient(host, options) as client, pytest.raises(Unavailable, match=host) as info:
        client.manifest("laminae/hello", "v1")
    assert info.value.__cause__ is not None


def test_insecure_hosts_must_be_a_collection() -> None:
    with pytest.raises(InvalidArgument, match="localhost:5000"):
        RegistryOptions(insecure_hosts="localhost:5000")


# -- basic auth -----------------------------------------------------------------------------


def test_basic_auth_with_the_right_credentials(auth_registry: RegistryServer, image: Image) -> None:
    assert auth_registry.username and auth_registry.password
    creds = (auth_registry.username, auth_registry.password)
    with RegistryClient(auth_registry.host, insecure(auth_registry, credentials=creds)) as client:
        push(client, "laminae/hello", "v1", image)
        assert client.manifest("laminae/hello", "v1")[0] == image.manifest.raw
        assert read_blob(client, "laminae/hello", image.config.descriptor.digest) == (
            image.config.data
        )


def test_basic_auth_with_wrong_credentials_is_denied(
    auth_registry: RegistryServer, image: Image
) -> None:
    options = insecure(auth_registry, credentials=("laminae", "wrong"))
    with RegistryClient(auth_registry.host, options) as client:
        with pytest.raises(PermissionDenied, match=r"laminae/hello \(pull\)") as info:
            client.manifest("laminae/hello", "v1")
        assert "UNAUTHORIZED" in str(info.value)
        with pytest.raises(PermissionDenied, match=r"laminae/hello \(push\)"):
            push(client, "laminae/hello", "v1", image)


def test_basic_auth_without_credentials_is_denied(auth_registry: RegistryServer) -> None:
    with (
        RegistryClient(auth_registry.host, insecure(auth_registry)) as client,
        pytest.raises(PermissionDenied, match="needs credentials"),
    ):
        client.manifest("laminae/hello", "v1")


def _auth_json(path: Path, key: str, username: str, password: str) -> Path:
    encoded = base64.b64encode(f"{username}:{password}".encode()).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {key: {"auth": encoded}}}))
    return path


@pytest.mark.parametrize(
    "where",
    ["REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "containers", "docker", "auth_file"],
)
def test_credentials_come_from_auth_files(
    auth_registry: RegistryServer,
    image: Image,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    assert auth_registry.username and auth_registry.password
    user, password = auth_registry.username, auth_registry.password
    home = Path(str(tmp_path / "home"))
    auth_file = None
    if where == "REGISTRY_AUTH_FILE":
        path = _auth_json(tmp_path / "elsewhere.json", auth_registry.host, user, password)
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(path))
    elif where == "XDG_RUNTIME_DIR":
        _auth_json(tmp_path / "run/containers/auth.json", auth_registry.host, user, password)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    elif where == "containers":
        _auth_json(home / ".config/containers/auth.json", auth_registry.host, user, password)
    elif where == "docker":
        # Docker's legacy key form, with a scheme.
        key = f"http://{auth_registry.host}/v1/"
        _auth_json(home / ".docker/config.json", key, user, password)
    else:
        auth_file = _auth_json(tmp_path / "given.json", auth_registry.host, user, password)
    options = insecure(auth_registry, auth_file=auth_file)
    with RegistryClient(auth_registry.host, options) as client:
        push(client, "laminae/hello", "v1", image)
        assert client.manifest("laminae/hello", "v1")[0] == image.manifest.raw


def test_find_credentials_prefers_the_most_specific_key(tmp_path: Path) -> None:
    document = {
        "auths": {
            "quay.io": {"auth": base64.b64encode(b"host:one").decode()},
            "quay.io/ns": {"auth": base64.b64encode(b"ns:two").decode()},
            "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:three").decode()},
            "helper.example": {},
        }
    }
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(document))
    assert find_credentials("quay.io", "ns/app", auth_file=path) == ("ns", "two")
    assert find_credentials("quay.io", "other/app", auth_file=path) == ("host", "one")
    assert find_credentials("docker.io", "library/busybox", auth_file=path) == ("hub", "three")
    assert find_credentials("helper.example", "x", auth_file=path) is None
    assert find_credentials("ghcr.io", "x", auth_file=path) is None


def test_find_credentials_reads_files_in_order(tmp_path: Path) -> None:
    first = _auth_json(tmp_path / "first.json", "quay.io", "first", "1")
    _auth_json(tmp_path / "home/.docker/config.json", "quay.io", "docker", "2")
    _auth_json(tmp_path / "home/.docker/config.json", "ghcr.io", "docker", "3")
    environ = {"REGISTRY_AUTH_FILE": str(first), "HOME": str(tmp_path / "home")}
    assert find_credentials("quay.io", "a", environ=environ) == ("first", "1")
    assert find_credentials("ghcr.io", "a", environ=environ) == ("docker", "3")
    assert find_credentials("ghcr.io", "a", environ={"HOME": str(tmp_path / "nohome")}) is None


def test_malformed_auth_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text("{not json")
    with pytest.raises(InvalidArgument, match=str(path)):
        find_credentials("quay.io", "a", auth_file=path)
    path.write_text(json.dumps({"auths": {"quay.io": {"auth": "bm9jb2xvbg=="}}}))  # "nocolon"
    with pytest.raises(InvalidArgument, match=r"auths\.quay\.io\.auth"):
        find_credentials("quay.io", "a", auth_file=path)
    with pytest.raises(InvalidArgument, match="does not exist"):
        find_credentials("quay.io", "a", auth_file=tmp_path / "missing.json")


# -- bearer tokens --------------------------------------------------------------------------


def _token_options(server: RegistryServer, *, right: bool = True) -> RegistryOptions:
    assert server.username and server.password
    creds = (server.username, server.password if right else "wrong")
    return insecure(server, credentials=creds)


def test_bearer_token_is_fetched_once_and_reused(
    token_registry: RegistryServer, image: Image
) -> None:
    tokens = token_registry.tokens
    assert tokens is not None
    with RegistryClient(token_registry.host, _token_options(token_registry)) as client:
        push(client, "laminae/hello", "v1", image)
        assert client.manifest("laminae/hello", "v1")[0] == image.manifest.raw
        for blob in image.blobs:
            assert read_blob(client, "laminae/hello", blob.descriptor.digest) == blob.data
        # One token for pull and push covers the whole push and the pull after it.
        assert tokens.requests == [("laminae", ["repository:laminae/hello:pull,push"])]
        assert client.token_requests == 1
        # Another repository is another scope, so another token.
        assert client.has_blob("laminae/other", image.config.descriptor.digest) is False
        assert tokens.requests[1:] == [("laminae", ["repository:laminae/other:pull"])]


def test_an_expired_token_is_fetched_again(token_registry: RegistryServer) -> None:
    tokens = token_registry.tokens
    assert tokens is not None
    tokens.expires_in = 1  # shorter than the client's safety margin: stale at once
    with RegistryClient(token_registry.host, _token_options(token_registry)) as client:
        for _ in range(3):
            assert not client.has_blob("laminae/hello", "sha256:" + "ab" * 32)
    assert len(tokens.requests) == 3


def test_parallel_first_requests_share_one_token(
    token_registry: RegistryServer, image: Image
) -> None:
    tokens = token_registry.tokens
    assert tokens is not None
    with RegistryClient(token_registry.host, _token_options(token_registry)) as client:
        push(client, "laminae/hello", "v1", image)
    tokens.requests.clear()
    with RegistryClient(token_registry.host, _token_options(token_registry)) as client:
        results: dict[int, bytes] = {}
        blob = image.layers[0].descriptor.digest

        def pull(index: int) -> None:
            results[index] = read_blob(client, "laminae/hello", blob)

        threads = [threading.Thread(target=pull, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == dict.fromkeys(range(4), image.layers[0].data)
    assert len(tokens.requests) == 1


def test_bearer_token_in_access_token_field(token_registry: RegistryServer, image: Image) -> None:
    assert token_registry.tokens is not None
    token_registry.tokens.field = "access_token"
    with RegistryClient(token_registry.host, _token_options(token_registry)) as client:
        push(client, "laminae/hello", "v1", image)
        assert client.manifest("laminae/hello", "v1")[0] == image.manifest.raw


def test_bearer_with_wrong_credentials_is_denied(token_registry: RegistryServer) -> None:
    options = _token_options(token_registry, right=False)
    with (
        RegistryClient(token_registry.host, options) as client,
        pytest.raises(PermissionDenied, match="refused the credentials"),
    ):
        client.manifest("laminae/hello", "v1")


def test_bearer_anonymous_token_without_rights_is_denied(
    token_registry: RegistryServer, image: Image
) -> None:
    tokens = token_registry.tokens
    assert tokens is not None
    with RegistryClient(token_registry.host, insecure(token_registry)) as client:
        with pytest.raises(PermissionDenied, match=r"laminae/hello \(pull\).*UNAUTHORIZED"):
            client.manifest("laminae/hello", "v1")
        assert tokens.requests == [(None, ["repository:laminae/hello:pull"])]
        with pytest.raises(PermissionDenied, match=r"laminae/hello \(push\)"):
            push(client, "laminae/hello", "v1", image)


def test_cross_repository_mount_with_tokens(token_registry: RegistryServer, image: Image) -> None:
    layer = image.layers[0]
    tokens = token_registry.tokens
    assert tokens is not None
    with RegistryClient(token_registry.host, _token_options(token_registry)) as client:
        push(client, "laminae/source", "v1", image)
        client.upload_blob(
            "laminae/target",
            layer.descriptor.digest,
            layer.descriptor.size,
            layer.path,
            mount_from="laminae/source",
        )
        assert client.has_blob("laminae/target", layer.descriptor.digest)
    assert (
        "laminae",
        ["repository:laminae/target:pull,push", "repository:laminae/source:pull"],
    ) in tokens.requests


# -- redirects ------------------------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    """Answers every GET with fixed bytes and records the Authorization it was sent."""

    seen: list[str | None]
    body: bytes

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Redirector(BaseHTTPRequestHandler):
    """A registry front that wants Basic auth and then redirects blobs to another host."""

    target: str

    def do_GET(self) -> None:
        if self.headers.get("Authorization") is None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="front"')
            self.send_header("Content-Length", "0")
        else:
            self.send_response(307)
            self.send_header("Location", self.target + self.path)
            self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def redirecting_front() -> Iterator[tuple[str, list[str | None], bytes]]:
    """A front on 127.0.0.1 redirecting to storage on "localhost": another origin."""
    seen: list[str | None] = []
    body = b"blob bytes from object storage"
    storage_handler = type("Storage", (_Recorder,), {"seen": seen, "body": body})
    storage = ThreadingHTTPServer(("127.0.0.1", 0), storage_handler)
    target = f"http://localhost:{storage.server_address[1]}"
    front = ThreadingHTTPServer(("127.0.0.1", 0), type("Front", (_Redirector,), {"target": target}))
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (storage, front)]
    for thread in threads:
        thread.start()
    try:
        yield f"127.0.0.1:{front.server_address[1]}", seen, body
    finally:
        for server in (storage, front):
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join()


def test_redirects_are_followed_without_the_credentials(
    redirecting_front: tuple[str, list[str | None], bytes],
) -> None:
    host, seen, body = redirecting_front
    options = RegistryOptions(insecure_hosts=frozenset({host}), credentials=("user", "pass"))
    with RegistryClient(host, options) as client:
        assert read_blob(client, "laminae/hello", "sha256:" + "cd" * 32) == body
    assert seen == [None]


class _Failing(BaseHTTPRequestHandler):
    """A registry in trouble: every request gets 503 and a distribution-API error body."""

    def do_GET(self) -> None:
        body = json.dumps(
            {"errors": [{"code": "UNAVAILABLE", "message": "storage backend down"}]}
        ).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_server_error_is_unavailable_with_the_registry_reason() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    try:
        with (
            RegistryClient(host, RegistryOptions(insecure_hosts=frozenset({host}))) as client,
            pytest.raises(Unavailable, match=r"503.*UNAVAILABLE: storage backend down"),
        ):
            client.manifest("laminae/hello", "v1")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- skopeo ---------------------------------------------------------------------------------


def test_skopeo_sees_what_the_client_pushed(registry: RegistryServer, image: Image) -> None:
    skopeo = require_tool("skopeo")
    with RegistryClient(registry.host, insecure(registry)) as client:
        push(client, "laminae/hello", "v1", image)
    out = subprocess.run(
        [skopeo, "inspect", "--tls-verify=false", f"docker://{registry.host}/laminae/hello:v1"],
        check=True,
        capture_output=True,
    ).stdout
    assert json.loads(out)["Digest"] == image.manifest.digest
    raw = subprocess.run(
        [
            skopeo,
            "inspect",
            "--raw",
            "--tls-verify=false",
            f"docker://{registry.host}/laminae/hello:v1",
        ],
        check=True,
        capture_output=True,
    ).stdout
    assert raw == image.manifest.raw


def _oci_layout(directory: Path, image: Image, ref_name: str) -> None:
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in image.blobs:
        (blobs / blob.descriptor.digest.partition(":")[2]).write_bytes(blob.data)
    manifest = image.manifest
    (blobs / manifest.digest.partition(":")[2]).write_bytes(manifest.raw)
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    entry = Descriptor(
        manifest.media_type,
        manifest.digest,
        len(manifest.raw),
        annotations={"org.opencontainers.image.ref.name": ref_name},
    )
    index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": [entry.to_json()]}
    (directory / "index.json").write_text(json.dumps(index))


def test_client_pulls_what_skopeo_pushed(
    registry: RegistryServer, image: Image, tmp_path: Path
) -> None:
    skopeo = require_tool("skopeo")
    layout = tmp_path / "layout"
    _oci_layout(layout, image, "v1")
    subprocess.run(
        [
            skopeo,
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"oci:{layout}:v1",
            f"docker://{registry.host}/laminae/copied:v1",
        ],
        check=True,
        capture_output=True,
    )
    with RegistryClient(registry.host, insecure(registry)) as client:
        raw, media_type, served = client.manifest("laminae/copied", "v1")
        assert served == sha256_digest(raw)
        assert media_type == MEDIA_OCI_MANIFEST
        document = json.loads(raw)
        for desc in [document["config"], *document["layers"]]:
            data = read_blob(client, "laminae/copied", desc["digest"])
            assert sha256_digest(data) == desc["digest"]
            assert len(data) == desc["size"]
        assert [d["digest"] for d in document["layers"]] == [image.layers[0].descriptor.digest]


# -- source and sink ------------------------------------------------------------------------


def test_sink_then_source_round_trip(registry: RegistryServer, image: Image) -> None:
    options = insecure(registry)
    config = parse_config(image.config.data, what="config")
    with RegistrySink(parse_reference(f"{registry.host}/laminae/hello:v1"), options) as sink:
        assert sink.describe() == f"docker://{registry.host}/laminae/hello:v1"
        assert sink.layer_compression is Compression.GZIP
        assert sink.docker_media_types is False
        for blob in image.blobs:
            assert not sink.has_blob(blob.descriptor)
            sink.put_blob(blob.descriptor, blob.path)
            assert sink.has_blob(blob.descriptor)
        sink.put_manifest(image.manifest, config)
        sink.commit()
        assert sink.pushed == image.manifest.digest
    with RegistrySource(parse_reference(f"{registry.host}/laminae/hello:v1"), options) as source:
        assert source.resolve() == (image.manifest.raw, MEDIA_OCI_MANIFEST)
        manifest_desc = Descriptor(MEDIA_OCI_MANIFEST, image.manifest.digest, 0)
        assert source.fetch_manifest(manifest_desc) == image.manifest.raw
        for blob in image.blobs:
            with source.open_blob(blob.descriptor) as stream:
                assert stream.read() == blob.data
    by_digest = f"{registry.host}/laminae/hello@{image.manifest.digest}"
    with RegistrySource(parse_reference(by_digest), options) as source:
        assert source.resolve()[0] == image.manifest.raw


def test_sink_pushes_by_digest_when_the_reference_is_one(
    registry: RegistryServer, image: Image
) -> None:
    options = insecure(registry)
    config = parse_config(image.config.data, what="config")
    digest = image.manifest.digest
    with RegistrySink(parse_reference(f"{registry.host}/laminae/hello@{digest}"), options) as sink:
        for blob in image.blobs:
            sink.put_blob(blob.descriptor, blob.path)
        sink.put_manifest(image.manifest, config)
        assert sink.pushed == digest
    wrong = f"{registry.host}/laminae/hello@sha256:{'0' * 64}"
    with RegistrySink(parse_reference(wrong), options) as sink, pytest.raises(InvalidArgument):
        sink.put_manifest(image.manifest, config)
    with RegistryClient(registry.host, options) as client:
        assert client.manifest("laminae/hello", digest)[0] == image.manifest.raw
        with pytest.raises(NotFound):
            client.manifest("laminae/hello", "latest")


def test_source_of_a_missing_tag_is_not_found(registry: RegistryServer) -> None:
    reference = parse_reference(f"{registry.host}/laminae/hello:gone")
    with (
        RegistrySource(reference, insecure(registry)) as source,
        pytest.raises(NotFound, match="manifest gone"),
    ):
        source.resolve()


class _Nested(BaseHTTPRequestHandler):
    """A hostile registry: every JSON body it sends is 60,000 ``[`` deep."""

    status = 200

    def do_GET(self) -> None:
        body = b"[" * 60_000
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("status", [200, 503])
def test_deeply_nested_bodies_are_refused_not_recursed(status: int) -> None:
    # A tag list (200) and an error body (503) are parsed with bounded nesting: json.loads
    # would end in RecursionError, which no caller expects.
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("N", (_Nested,), {"status": status}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    try:
        with (
            RegistryClient(host, RegistryOptions(insecure_hosts=frozenset({host}))) as client,
            pytest.raises(Unavailable, match="malformed tag list" if status == 200 else "503"),
        ):
            client.tags("laminae/hello")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
