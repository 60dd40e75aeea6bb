"""A client for the OCI distribution API: pull and push manifests and blobs, with auth.

One :class:`RegistryClient` talks to one registry host::

    client = RegistryClient("registry.example.com", RegistryOptions())
    raw, media_type, digest = client.manifest("ns/app", "v1")
    with client.open_blob("ns/app", "sha256:...") as stream:   # streamed, never whole
        ...
    if not client.has_blob("ns/app", desc.digest, push=True):
        client.upload_blob("ns/app", desc.digest, desc.size, path)
    client.put_manifest("ns/app", "v2", raw, media_type)

:class:`RegistrySource` and :class:`RegistrySink` wrap a client as the
:class:`~laminae.images._image.ImageSource` and :class:`~laminae.images._image.ImageSink` of
the import and export pipeline.

Transport: TLS, always, unless the host is listed in ``RegistryOptions.insecure_hosts`` (then
plain HTTP): the system's CAs plus ``certs_dir/<host[:port]>/*.crt`` (and a client
certificate ``*.cert`` with its ``*.key``), the layout of containers' ``certs.d``.

Auth (the Docker token flow; docs/architecture.md, "Registries"): requests go out anonymous
until the registry answers 401. Its ``WWW-Authenticate`` says how to authenticate: ``Basic``
sends the credentials; ``Bearer`` fetches a token from the realm for the service and the scope
(``repository:<name>:pull`` or ``pull,push``), with the credentials as Basic auth when there are
some. Tokens are cached per (realm, service, scope) until they expire, and once a host has
challenged, later requests authenticate up front, so a blob upload is never sent twice.
Credentials are the explicit ones, else the first auth file that has the host (or the host and a
repository prefix): ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``,
``~/.config/containers/auth.json``, ``~/.docker/config.json``.

Errors: an unreachable host, a failed TLS handshake, a timeout or a 5xx is
:class:`~laminae.Unavailable`; a refusal after authenticating (401, 403) is
:class:`~laminae.PermissionDenied` naming the repository and the action; a missing manifest
or blob is :class:`~laminae.NotFound` naming the reference or digest. The registry's own error
body (``{"errors": [{"code", "message"}]}``) goes into the message.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Container, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

import attrs
import httpx

from laminae._exceptions import (
    CorruptLayer,
    InvalidArgument,
    LaminaeError,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    Unavailable,
    Unsupported,
)
from laminae.archive._compression import Compression
from laminae.images._credentials import DOCKER_HUB, RegistryOptions, find_credentials
from laminae.images._image import (
    MANIFEST_MEDIA_TYPES,
    Descriptor,
    ImageConfig,
    Manifest,
    load_json,
    new_hash,
    sha256_digest,
)
from laminae.images._reference import Reference

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "RegistryClient",
    "RegistryOptions",
    "RegistrySink",
    "RegistrySource",
    "find_credentials",
]

MAX_MANIFEST_BYTES: Final = 4 << 20
"""The largest manifest or index accepted (containers/image's limit): a hostile registry
cannot make the client hold more than this in memory."""

_MAX_ERROR_BYTES: Final = 64 << 10
_MAX_TOKEN_BYTES: Final = 1 << 20
_MAX_TAG_PAGES: Final = 1000
_UPLOAD_CHUNK: Final = 1 << 20
# Docker Hub's API lives on another host than the name images use.
_DOCKER_HUB_API: Final = "registry-1.docker.io"
_PULL: Final = "pull"
_PUSH: Final = "pull,push"
# A token is renewed this long before the registry would start refusing it.
_TOKEN_MARGIN: Final = 10.0
_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')
_LINK_NEXT = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')


# -- TLS ----------------------------------------------------------------------------------------


def _ssl_context(host: str, certs_dir: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    folder = certs_dir / host if certs_dir is not None else None
    if folder is None or not folder.is_dir():
        return context
    try:
        for ca in sorted(folder.glob("*.crt")):
            context.load_verify_locations(cafile=ca)
        for cert in sorted(folder.glob("*.cert")):
            context.load_cert_chain(cert, cert.with_suffix(".key"))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"{folder}: cannot load certificates: {exc}") from exc
    return context


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# -- auth ---------------------------------------------------------------------------------------


@attrs.frozen
class _Access:
    """What a request needs the right to: a repository, its actions, and other scopes."""

    repository: str
    actions: str
    extra: tuple[str, ...] = ()

    @property
    def scopes(self) -> tuple[str, ...]:
        return (f"repository:{self.repository}:{self.actions}", *self.extra)

    def describe(self) -> str:
        return f"{self.repository} ({'push' if self.actions == _PUSH else 'pull'})"


@attrs.frozen
class _Challenge:
    scheme: str  # "basic" or "bearer", lower case
    params: Mapping[str, str]


@attrs.frozen
class _Token:
    value: str
    expires: float  # time.monotonic()


@attrs.frozen
class _Auth:
    header: str | None
    fresh: bool  # obtained for this very request (so a refusal is final)


def _parse_challenge(header: str) -> _Challenge | None:
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() not in ("basic", "bearer"):
        return None
    params: dict[str, str] = {}
    for match in _CHALLENGE_PARAM.finditer(rest):
        quoted, bare = match.group(2), match.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare or ""
        params[match.group(1).lower()] = value
    return _Challenge(scheme.lower(), params)


def _basic(credentials: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(":".join(credentials).encode()).decode()


# -- responses ----------------------------------------------------------------------------------


def _media_type(response: httpx.Response) -> str:
    return str(response.headers.get("content-type", "")).partition(";")[0].strip()


def _read_bounded(response: httpx.Response, limit: int) -> bytes | None:
    """The body, or ``None`` if it is longer than ``limit`` (read no further than that)."""
    buffer = bytearray()
    for chunk in response.iter_bytes():
        buffer += chunk
        if len(buffer) > limit:
            return None
    return bytes(buffer)


def _error_detail(response: httpx.Response) -> str:
    """The distribution API's error body as one line, or the HTTP status line."""
    status = f"HTTP {response.status_code} {response.reason_phrase}".strip()
    try:
        body = _read_bounded(response, _MAX_ERROR_BYTES)
    except httpx.HTTPError:
        return status
    try:
        errors = load_json(body or b"", "an error body").get("errors")
    except (ValueError, AttributeError):
        return status
    lines = [
        ": ".join(str(e[k]) for k in ("code", "message") if e.get(k))
        for e in errors or ()
        if isinstance(e, dict)
    ]
    lines = [line for line in lines if line]
    return f"{status}: {'; '.join(lines)}" if lines else status


class _BlobStream(io.RawIOBase):
    """A streaming response body as a raw binary file, for :class:`io.BufferedReader`."""

    def __init__(
        self,
        response: httpx.Response,
        errors: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> None:
        super().__init__()
        self._chunks = response.iter_bytes()
        self._pending = memoryview(b"")
        self._errors = errors

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while not self._pending:
            with self._errors():
                chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        target = memoryview(buffer).cast("B")
        count = min(len(target), len(self._pending))
        target[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


# -- the client ---------------------------------------------------------------------------------


class RegistryClient:
    """One registry host, spoken to through the distribution API.

    The HTTP is httpx's rather than our own: it is well kept, streams request and response
    bodies, takes an :class:`ssl.SSLContext`, has per-phase timeouts and drops
    ``Authorization`` when a redirect leaves the origin (a blob GET is often redirected to
    object storage, which must not see the registry's credentials). HTTP/1.1 only: the
    registries laminae meets all speak it, and it keeps h2 out of the dependencies.

    :param host: the registry as references name it (``"localhost:5000"``, ``"docker.io"``).
    :param options: transport and credentials; ``None`` is the defaults.
    :raises InvalidArgument: a certificate in ``certs_dir`` cannot be loaded.
    """

    def __init__(self, host: str, options: RegistryOptions | None = None) -> None:
        self.host = host
        self.options = options if options is not None else RegistryOptions()
        endpoint = _DOCKER_HUB_API if host == DOCKER_HUB else host
        self.secure = not self.options.is_insecure(host)
        self.base_url = f"{'https' if self.secure else 'http'}://{endpoint}/v2/"
        self._http = httpx.Client(
            http1=True,
            http2=False,
            verify=_ssl_context(host, self.options.certs_dir) if self.secure else False,
            timeout=httpx.Timeout(self.options.timeout),
            follow_redirects=True,
            # The digest is over the bytes as stored; no content coding in between.
            headers={"Accept-Encoding": "identity", "User-Agent": "laminae"},
        )
        self._challenge: _Challenge | None = None
        self._tokens: dict[tuple[str, str, tuple[str, ...]], _Token] = {}
        self._token_lock = threading.Lock()
        self._credentials: dict[str, tuple[str, str] | None] = {}
        self.token_requests = 0
        """How many tokens this client has fetched (for tests and diagnostics)."""

    # -- lifecycle --

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the API --

    def manifest(self, repository: str, reference: str) -> tuple[bytes, str, str | None]:
        """GET a manifest or index by tag or digest.

        :returns: the raw bytes, the media type the registry gave (``Content-Type`` without
            parameters, ``""`` if none) and its ``Docker-Content-Digest`` (``None`` if absent).
        :raises NotFound: no such repository, tag or digest (naming ``reference``).
        :raises LimitExceeded: the document is larger than :data:`MAX_MANIFEST_BYTES`.
        """
        subject = f"manifest {reference}"
        response = self._send(
            "GET",
            f"{repository}/manifests/{reference}",
            access=_Access(repository, _PULL),
            subject=subject,
            headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)},
        )
        with contextlib.closing(response), self._transport_errors(subject):
            raw = _read_bounded(response, MAX_MANIFEST_BYTES)
        if raw is None:
            raise LimitExceeded(
                f"{self.host}/{repository}: {subject} is larger than {MAX_MANIFEST_BYTES >> 20} MiB"
            )
        return raw, _media_type(response), response.headers.get("docker-content-digest")

    @contextlib.contextmanager
    def open_blob(self, repository: str, digest: str) -> Iterator[BinaryIO]:
        """GET a blob as a stream (the caller verifies its digest and size while reading).

        :raises NotFound: the registry has no such blob in ``repository`` (naming ``digest``).
        :raises Unavailable: the connection fails while the body is read.
        """
        subject = f"blob {digest}"
        response = self._send(
            "GET",
            f"{repository}/blobs/{digest}",
            access=_Access(repository, _PULL),
            subject=subject,
        )
        try:
            raw = _BlobStream(response, lambda: self._transport_errors(subject))
            yield io.BufferedReader(raw, buffer_size=1 << 16)
        finally:
            response.close()

    def has_blob(self, repository: str, digest: str, *, push: bool = False) -> bool:
        """HEAD a blob: whether ``repository`` has it.

        :param push: authenticate for pushing already (the check before an upload), so the
            upload reuses the token.
        """
        response = self._send(
            "HEAD",
            f"{repository}/blobs/{digest}",
            access=_Access(repository, _PUSH if push else _PULL),
            subject=f"blob {digest}",
            ok=(404,),
        )
        response.close()
        return response.status_code != 404

    def upload_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        path: Path,
        *,
        mount_from: str | None = None,
    ) -> None:
        """Upload the blob in file ``path`` (monolithic: POST, then one streamed PUT).

        Call :meth:`has_blob` first; this uploads even if the blob is there.

        :param mount_from: another repository on the same registry that has the blob: ask
            the registry to mount it from there (no bytes sent); if it declines, upload.
        :raises InvalidArgument: ``path`` is not ``size`` bytes long.
        :raises CorruptLayer: the registry reports another digest for what it received.
        """
        subject = f"blob {digest}"
        extra = (f"repository:{mount_from}:pull",) if mount_from else ()
        access = _Access(repository, _PUSH, extra)
        params = {"mount": digest, "from": mount_from} if mount_from else None
        response = self._send(
            "POST",
            f"{repository}/blobs/uploads/",
            access=access,
            subject=subject,
            params=params,
            headers={"Content-Length": "0"},
        )
        response.close()
        if response.status_code == 201:  # mounted
            return
        location = self._location(response, subject)
        with path.open("rb") as file:
            actual = os.fstat(file.fileno()).st_size
            if actual != size:
                raise InvalidArgument(
                    f"{path}: {subject} should be {size} bytes, file has {actual}"
                )

            def body() -> Iterator[bytes]:
                file.seek(0)
                while chunk := file.read(_UPLOAD_CHUNK):
                    yield chunk

            response = self._send(
                "PUT",
                location.copy_merge_params({"digest": digest}),
                access=access,
                subject=subject,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                body=body,
            )
        response.close()
        stored = response.headers.get("docker-content-digest")
        if stored and stored != digest:
            raise CorruptLayer(
                f"{self.host}/{repository}: uploaded {subject}, registry stored {stored}"
            )

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> str:
        """PUT a manifest or index under a tag or its digest; after all the blobs it names.

        :returns: the document's digest.
        :raises InvalidArgument: the registry refused the document (its reason in the message),
            or ``reference`` is a digest that is not the document's.
        """
        digest = sha256_digest(raw)
        if ":" in reference:
            hasher = new_hash(reference)
            hasher.update(raw)
            digest = f"{reference.partition(':')[0]}:{hasher.hexdigest()}"
            if digest != reference:
                raise InvalidArgument(
                    f"{self.host}/{repository}: manifest is {digest}, not {reference}"
                )
        response = self._send(
            "PUT",
            f"{repository}/manifests/{reference}",
            access=_Access(repository, _PUSH),
            subject=f"manifest {reference}",
            headers={"Content-Type": media_type},
            body=lambda: iter((raw,)),
        )
        response.close()
        return digest

    def tags(self, repository: str) -> list[str]:
        """The repository's tags, every page of them.

        :raises NotFound: no such repository.
        """
        tags: list[str] = []
        url: str | httpx.URL = f"{repository}/tags/list"
        for _ in range(_MAX_TAG_PAGES):
            subject = f"tags of {repository}"
            response = self._send("GET", url, access=_Access(repository, _PULL), subject=subject)
            with contextlib.closing(response), self._transport_errors(subject):
                body = _read_bounded(response, MAX_MANIFEST_BYTES)
            try:
                page = load_json(body or b"", f"tags of {repository}")
                tags.extend(tag for tag in page.get("tags") or () if isinstance(tag, str))
            except (ValueError, AttributeError, TypeError) as exc:
                raise Unavailable(f"{self.host}/{repository}: malformed tag list") from exc
            link = _LINK_NEXT.search(response.headers.get("link", ""))
            if link is None:
                return tags
            url = response.url.join(link.group(1))
        raise LimitExceeded(f"{self.host}/{repository}: more than {_MAX_TAG_PAGES} pages of tags")

    # -- requests, auth and errors --

    @contextlib.contextmanager
    def _transport_errors(self, subject: str) -> Iterator[None]:
        """Turn httpx's failures (connect, TLS, timeout, protocol) into :class:`Unavailable`."""
        try:
            yield
        except httpx.HTTPError as exc:
            problem = _ssl_error(exc)
            if self.secure and problem is not None:
                reason = getattr(problem, "reason", None) or str(problem)
                raise Unavailable(
                    f"{self.host}: TLS handshake failed ({reason}) for {subject}; if the "
                    f"registry serves plain HTTP, use --insecure-registry {self.host}"
                ) from exc
            if isinstance(exc, httpx.TimeoutException):
                detail = f"no answer within {self.options.timeout:g} s"
            else:
                detail = str(exc) or type(exc).__name__
            raise Unavailable(
                f"{self.host}: cannot reach the registry for {subject}: {detail}"
            ) from exc

    def _location(self, response: httpx.Response, subject: str) -> httpx.URL:
        location = response.headers.get("location")
        if not location:
            raise Unavailable(f"{self.host}: {subject}: upload started without a Location")
        # Relative or absolute, "use as given": relative to the URL that answered.
        return response.url.join(location)

    def _url(self, path: str | httpx.URL) -> httpx.URL:
        return path if isinstance(path, httpx.URL) else httpx.URL(self.base_url + path)

    def _send(
        self,
        method: str,
        path: str | httpx.URL,
        *,
        access: _Access,
        subject: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        body: Callable[[], Iterator[bytes]] | None = None,
        ok: Container[int] = (),
    ) -> httpx.Response:
        """Send a request, authenticating on a 401; a streaming response the caller closes.

        ``body`` makes the request body afresh for each attempt. A status >= 400 that is not
        in ``ok`` raises the matching error.
        """
        url = self._url(path)
        auth = self._authorization(access)
        for attempt in (1, 2):
            request_headers = dict(headers or {})
            if auth.header is not None:
                request_headers["Authorization"] = auth.header
            request = self._http.build_request(
                method,
                url,
                params=params,
                headers=request_headers,
                content=body() if body is not None else None,
            )
            with self._transport_errors(subject):
                response = self._http.send(request, stream=True)
            if response.status_code != 401 or attempt == 2:
                break
            challenge = _parse_challenge(response.headers.get("www-authenticate", ""))
            if challenge is None or auth.fresh:
                break
            self._challenge = challenge
            retry = self._authorization(access, refused=auth.header)
            if retry.header is None:
                response.close()
                raise PermissionDenied(
                    f"{self.host}: {access.describe()} needs credentials and there are none: "
                    "give some, or add them to an auth file (containers' auth.json)"
                )
            if retry.header == auth.header:  # the same credentials again: refused already
                break
            response.close()
            auth = retry
        if response.status_code >= 400 and response.status_code not in ok:
            try:
                self._raise_for_status(response, access, subject)
            finally:
                response.close()
        return response

    def _raise_for_status(self, response: httpx.Response, access: _Access, subject: str) -> None:
        status = response.status_code
        detail = _error_detail(response)
        where = f"{self.host}/{access.repository}"
        if status in (401, 403):
            raise PermissionDenied(f"{self.host}: access to {access.describe()} denied: {detail}")
        if status == 404:
            raise NotFound(f"{where}: {subject} not found ({detail})")
        if status >= 500 or status == 429:
            raise Unavailable(f"{where}: {subject}: the registry failed: {detail}")
        if status in (405, 501):
            raise Unsupported(f"{where}: {subject}: the registry does not support this: {detail}")
        if 400 <= status < 500:
            raise InvalidArgument(f"{where}: {subject}: the registry refused it: {detail}")
        raise LaminaeError(f"{where}: {subject}: unexpected {detail}")

    def _credentials_for(self, repository: str) -> tuple[str, str] | None:
        if self.options.credentials is not None:
            return self.options.credentials
        if repository not in self._credentials:
            self._credentials[repository] = find_credentials(
                self.host, repository, auth_file=self.options.auth_file
            )
        return self._credentials[repository]

    def _authorization(self, access: _Access, *, refused: str | None = None) -> _Auth:
        """The Authorization header for ``access`` under the last challenge, if any.

        :param refused: a header the registry has just refused: fetch a new token rather than
            return it again.
        """
        challenge = self._challenge
        if challenge is None:
            return _Auth(None, False)
        credentials = self._credentials_for(access.repository)
        if challenge.scheme == "basic":
            return _Auth(_basic(credentials) if credentials else None, False)
        realm = challenge.params.get("realm", "")
        service = challenge.params.get("service", "")
        candidates = [access.scopes]
        if access.actions == _PULL and not access.extra:
            # A token that may push may also pull.
            candidates.append(attrs.evolve(access, actions=_PUSH).scopes)
        # One fetch per scope when parallel requests all meet their first 401 together: the
        # others wait here and take the token the first one fetched.
        with self._token_lock:
            now = time.monotonic()
            for scopes in candidates:
                token = self._tokens.get((realm, service, scopes))
                if token is not None and token.expires > now:
                    header = f"Bearer {token.value}"
                    if header != refused:
                        return _Auth(header, False)
            token = self._fetch_token(realm, service, access, credentials)
            self._tokens[(realm, service, access.scopes)] = token
        return _Auth(f"Bearer {token.value}", True)

    def _fetch_token(
        self, realm: str, service: str, access: _Access, credentials: tuple[str, str] | None
    ) -> _Token:
        subject = f"token for {access.describe()} from {realm}"
        if not realm.startswith(("https://", "http://")):
            raise Unavailable(f"{self.host}: the registry named no usable token realm ({realm!r})")
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("scope", scope) for scope in access.scopes
        ]
        if service:
            params.insert(0, ("service", service))
        headers = {"Authorization": _basic(credentials)} if credentials else {}
        started = time.monotonic()
        self.token_requests += 1
        with self._transport_errors(subject):
            request = self._http.build_request("GET", realm, params=params, headers=headers)
            response = self._http.send(request, stream=True)
            with contextlib.closing(response):
                if response.status_code in (401, 403):
                    raise PermissionDenied(
                        f"{self.host}: the token service refused "
                        f"{'the credentials' if credentials else 'anonymous access'} for "
                        f"{access.describe()}: {_error_detail(response)}"
                    )
                if response.status_code >= 400:
                    raise Unavailable(f"{self.host}: {subject}: {_error_detail(response)}")
                body = _read_bounded(response, _MAX_TOKEN_BYTES)
        try:
            document = load_json(body or b"", f"{self.host}: a token response")
            value = document.get("token") or document.get("access_token")
            lifetime = float(document.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError) as exc:
            raise Unavailable(f"{self.host}: {subject}: malformed token response") from exc
        if not isinstance(value, str) or not value:
            raise Unavailable(f"{self.host}: {subject}: the response holds no token")
        return _Token(value, started + max(lifetime - _TOKEN_MARGIN, 0.0))


# -- the pipeline's source and sink -------------------------------------------------------------


class RegistrySource:
    """An :class:`~laminae.images._image.ImageSource` for ``docker://REFERENCE``.

    :param reference: the image; its tag or digest (else ``latest``) is what :meth:`resolve`
        fetches.
    :param options: transport and credentials.
    """

    def __init__(self, reference: Reference, options: RegistryOptions | None = None) -> None:
        self.reference = reference
        self.client = RegistryClient(reference.registry, options)

    def describe(self) -> str:
        return f"docker://{self.reference}"

    def resolve(self) -> tuple[bytes, str | None]:
        """The manifest or index the reference names, and the registry's ``Content-Type``.

        :raises CorruptLayer: the reference is a digest and the registry sent other bytes.
        """
        ref = self.reference
        raw, media_type, _ = self.client.manifest(ref.repository, ref.api_reference)
        if ref.digest is not None:
            hasher = new_hash(ref.digest)
            hasher.update(raw)
            got = f"{ref.digest.partition(':')[0]}:{hasher.hexdigest()}"
            if got != ref.digest:
                raise CorruptLayer(f"{self.describe()}: the registry sent manifest {got}")
        return raw, media_type or None

    def fetch_manifest(self, desc: Descriptor) -> bytes:
        return self.client.manifest(self.reference.repository, desc.digest)[0]

    def open_blob(self, desc: Descriptor) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.client.open_blob(self.reference.repository, desc.digest)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RegistrySource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RegistrySink:
    """An :class:`~laminae.images._image.ImageSink` for ``docker://REFERENCE``.

    Blobs are uploaded as they come (a registry keeps unreferenced blobs until its garbage
    collection, so there is nothing to roll back); the manifest goes last, under the tag, or
    by digest when the reference is a digest.

    :param reference: where to push.
    :param options: transport and credentials.
    :param layer_compression: the compression layers are pushed with (gzip: what every
        registry and client takes).
    :param docker_media_types: push Docker v2 manifest and config types instead of OCI ones.
    """

    def __init__(
        self,
        reference: Reference,
        options: RegistryOptions | None = None,
        *,
        layer_compression: Compression | None = Compression.GZIP,
        docker_media_types: bool = False,
    ) -> None:
        self.reference = reference
        self.layer_compression = layer_compression
        self.docker_media_types = docker_media_types
        self.client = RegistryClient(reference.registry, options)
        self.pushed: str | None = None
        """The digest of the manifest pushed, once :meth:`put_manifest` has run."""

    def describe(self) -> str:
        return f"docker://{self.reference}"

    def has_blob(self, desc: Descriptor) -> bool:
        return self.client.has_blob(self.reference.repository, desc.digest, push=True)

    def put_blob(self, desc: Descriptor, path: Path) -> None:
        self.client.upload_blob(self.reference.repository, desc.digest, desc.size, path)

    def put_manifest(self, manifest: Manifest, config: ImageConfig) -> None:
        """Push ``manifest.raw`` under the reference's digest, else its tag (else latest).

        :raises InvalidArgument: the reference is a digest the manifest does not have.
        """
        self.pushed = self.client.put_manifest(
            self.reference.repository,
            self.reference.api_reference,
            manifest.raw,
            manifest.media_type,
        )

    def commit(self) -> None:
        """Nothing to do: the manifest is visible once pushed."""

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RegistrySink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
