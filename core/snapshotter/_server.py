"""The gRPC face of the snapshotter: ``containerd.services.snapshots.v1.Snapshots`` on a unix
socket, as containerd's ``proxy_plugins`` (type ``snapshot``) dial it.

The wire types are generated from ``_proto/*.proto`` (``scripts/gen-proto``); each call turns
a request into a call of :class:`~laminae.snapshotter._service.Snapshotter` and its result into
a response. Errors become the gRPC codes containerd's ``errdefs`` turns back into its own
errors (``NotFound`` ↔ NOT_FOUND, ...); the message is laminae's, naming the snapshot.

grpcio and protobuf are the ``laminae[containerd]`` extra: this module imports them, the rest
of laminae does not.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import empty_pb2

from laminae._exceptions import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LaminaeError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    Unsupported,
    map_os_errors,
)
from laminae.snapshotter._proto import mount_pb2, snapshots_pb2
from laminae.snapshotter._service import Mount, Snapshotter
from laminae.snapshotter._table import Kind, Snapshot

if TYPE_CHECKING:
    from laminae._store import Store

__all__ = ["SERVICE", "serve", "start_server"]

SERVICE = "containerd.services.snapshots.v1.Snapshots"

_CODES: Mapping[type[LaminaeError], Any] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unsupported: grpc.StatusCode.UNIMPLEMENTED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}

_KINDS = {
    Kind.VIEW: snapshots_pb2.VIEW,
    Kind.ACTIVE: snapshots_pb2.ACTIVE,
    Kind.COMMITTED: snapshots_pb2.COMMITTED,
}

_MAX_SOCKET_PATH = 108  # sizeof(sockaddr_un.sun_path) on Linux, the NUL included

_LIST_BATCH = 100  # Infos per streamed message, as containerd's own service sends them


def _code(exc: LaminaeError) -> Any:
    for kind in type(exc).__mro__:
        if kind in _CODES:
            return _CODES[kind]
    return grpc.StatusCode.UNKNOWN


def _mounts(mounts: list[Mount]) -> list[Any]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def _info(snapshot: Snapshot) -> Any:
    info = snapshots_pb2.Info(
        name=snapshot.name,
        parent=snapshot.parent or "",
        kind=_KINDS[snapshot.kind],
        labels=dict(snapshot.labels),
    )
    info.created_at.FromDatetime(snapshot.created)
    info.updated_at.FromDatetime(snapshot.updated)
    return info


class _Servicer:
    """One method per call of the service; each takes a request and the call's context."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self._sn = snapshotter

    def Prepare(self, request: Any, context: Any) -> Any:
        mounts = self._sn.prepare(request.key, request.parent, request.labels)
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    def View(self, request: Any, context: Any) -> Any:
        mounts = self._sn.view(request.key, request.parent, request.labels)
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    def Mounts(self, request: Any, context: Any) -> Any:
        return snapshots_pb2.MountsResponse(mounts=_mounts(self._sn.mounts(request.key)))

    def Commit(self, request: Any, context: Any) -> Any:
        self._sn.commit(request.name, request.key, request.labels)
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: Any) -> Any:
        self._sn.remove(request.key)
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: Any) -> Any:
        return snapshots_pb2.StatSnapshotResponse(info=_info(self._sn.stat(request.key)))

    def Update(self, request: Any, context: Any) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self._sn.update(request.info.name, request.info.labels, paths)
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(info))

    def List(self, request: Any, context: Any) -> Iterator[Any]:
        found = self._sn.walk(list(request.filters))
        for start in range(0, len(found), _LIST_BATCH):
            batch = found[start : start + _LIST_BATCH]
            yield snapshots_pb2.ListSnapshotsResponse(info=[_info(s) for s in batch])

    def Usage(self, request: Any, context: Any) -> Any:
        usage = self._sn.usage(request.key)
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request: Any, context: Any) -> Any:
        self._sn.cleanup()
        return empty_pb2.Empty()


def _unary(call: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def handle(request: Any, context: Any) -> Any:
        try:
            return call(request, context)
        except LaminaeError as exc:
            context.abort(_code(exc), str(exc))

    return handle


def _stream(call: Callable[[Any, Any], Iterator[Any]]) -> Callable[[Any, Any], Iterator[Any]]:
    def handle(request: Any, context: Any) -> Iterator[Any]:
        try:
            yield from call(request, context)
        except LaminaeError as exc:
            context.abort(_code(exc), str(exc))

    return handle


def _handler(snapshotter: Snapshotter) -> Any:
    """The service's method table, built on the generated message types."""
    servicer = _Servicer(snapshotter)
    pb = snapshots_pb2
    unary: dict[str, tuple[Any, Any]] = {
        "Prepare": (pb.PrepareSnapshotRequest, pb.PrepareSnapshotResponse),
        "View": (pb.ViewSnapshotRequest, pb.ViewSnapshotResponse),
        "Mounts": (pb.MountsRequest, pb.MountsResponse),
        "Commit": (pb.CommitSnapshotRequest, empty_pb2.Empty),
        "Remove": (pb.RemoveSnapshotRequest, empty_pb2.Empty),
        "Stat": (pb.StatSnapshotRequest, pb.StatSnapshotResponse),
        "Update": (pb.UpdateSnapshotRequest, pb.UpdateSnapshotResponse),
        "Usage": (pb.UsageRequest, pb.UsageResponse),
        "Cleanup": (pb.CleanupRequest, empty_pb2.Empty),
    }
    methods = {
        name: grpc.unary_unary_rpc_method_handler(
            _unary(getattr(servicer, name)),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        for name, (request, response) in unary.items()
    }
    methods["List"] = grpc.unary_stream_rpc_method_handler(
        _stream(servicer.List),
        request_deserializer=pb.ListSnapshotsRequest.FromString,
        response_serializer=pb.ListSnapshotsResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def _unlink_stale_socket(path: Path) -> None:
    """Remove a socket a previous server left (a crash leaves it); refuse anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidArgument(f"socket {path}: exists and is not a socket")
    path.unlink()


@contextlib.contextmanager
def start_server(store: Store, socket_path: Path, *, workers: int = 8) -> Iterator[Snapshotter]:
    """Serve the snapshots service for ``store`` on ``socket_path`` while the block runs.

    :raises InvalidArgument: ``socket_path`` is something other than a socket.
    """
    socket_path = socket_path.absolute()
    with map_os_errors(f"socket {socket_path}"):
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        _unlink_stale_socket(socket_path)
    snapshotter = Snapshotter(store)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((_handler(snapshotter),))
    # Bound under another name and renamed once serving: the socket appears ready, so a
    # client that waits for the path (containerd, a unit's ExecStartPost) never meets a socket
    # that refuses connections.
    # The draft's name is as long as the final one: unix socket paths are short (108 bytes).
    name = socket_path.name
    draft = socket_path.with_name(("+" if name.startswith("~") else "~") + name[1:])
    if len(os.fsencode(socket_path)) >= _MAX_SOCKET_PATH:
        raise InvalidArgument(
            f"socket {socket_path}: a unix socket's path must be under {_MAX_SOCKET_PATH} bytes"
        )
    try:
        with map_os_errors(f"socket {socket_path}"):
            _unlink_stale_socket(draft)
        if not server.add_insecure_port(f"unix://{draft}"):
            raise InvalidArgument(f"socket {socket_path}: cannot listen there")
        with map_os_errors(f"socket {socket_path}"):
            os.chmod(draft, 0o600)  # root's containerd only: it hands out mounts
            server.start()
            os.rename(draft, socket_path)
        yield snapshotter
    finally:
        server.stop(grace=5).wait()
        snapshotter.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()


def _notify_ready() -> None:
    """Tell systemd the service is up (``Type=notify``), when it runs under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.sendto(b"READY=1", address)


def serve(store: Store, socket_path: Path, *, ready: Callable[[], None] | None = None) -> None:
    """Serve ``store`` on ``socket_path`` until SIGTERM or SIGINT.

    :param ready: called once the socket accepts calls (after systemd is notified).
    """
    stop = threading.Event()
    previous = {
        number: signal.signal(number, lambda *_: stop.set())
        for number in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        with start_server(store, socket_path):
            _notify_ready()
            if ready is not None:
                ready()
            stop.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
