"""What the store records: layers, images, containers, and the identities that name them.

Values only (attrs, frozen); the store makes them from the graph's rows. The validators here
are the one place that says what a key, a name, a digest or a label may be.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import attrs

from laminae._exceptions import InvalidArgument
from laminae.archive._compression import Compression
from laminae.driverkit._contract import Capabilities

__all__ = [
    "DIGEST",
    "ID_PREFIX",
    "CheckReport",
    "Container",
    "DiffResult",
    "Image",
    "Layer",
    "LayerKind",
    "StoreInfo",
    "chain_id",
    "check_digest",
    "check_key",
    "check_labels",
    "parse_time",
]


class LayerKind(enum.Enum):
    """Committed layers are immutable; active ones writable; views read-only mounts."""

    COMMITTED = "committed"
    ACTIVE = "active"
    VIEW = "view"


@attrs.frozen
class Layer:
    """A layer as the graph knows it. See the module docstring of :mod:`laminae` for terms."""

    id: str
    parent: str | None
    kind: LayerKind
    storage_id: str
    diff_id: str | None
    digest: str | None
    size: int | None
    names: tuple[str, ...]
    labels: Mapping[str, str]
    created: datetime
    updated: datetime
    mount_count: int
    mount_point: Path | None
    depth: int


@attrs.frozen
class Image:
    """An image: names, its manifest digest and config, and its top layer."""

    id: str
    top_layer: str | None
    names: tuple[str, ...]
    manifest_digest: str | None
    config: bytes | None = attrs.field(repr=False)
    created: datetime
    manifest: bytes | None = attrs.field(default=None, repr=False)


@attrs.frozen
class Container:
    """A container: a name, its image, and its active layer."""

    id: str
    name: str | None
    image: str | None
    layer: str
    created: datetime


@attrs.frozen
class DiffResult:
    """What :meth:`Store.diff` wrote: the DiffID, the digest of the bytes written, their size."""

    diff_id: str
    digest: str
    size: int
    compression: Compression


@attrs.frozen
class StoreInfo:
    """A summary of a store, for ``laminae info``."""

    root: Path
    runroot: Path
    driver: str
    driver_origin: str
    capabilities: Capabilities
    backing_fs: str
    layers: int
    images: int
    containers: int


@attrs.frozen
class CheckReport:
    """What :meth:`Store.check` found, or what :meth:`Store.repair` fixed.

    The same fields serve both: in a check they are what is wrong, in a repair's result what
    was put right (and, in ``kept``, what was left alone).

    :param orphan_storage: storage ids on disk that no layer owns. Repair removes them only
        when forced: the store cannot tell them for its own (a graph restored from an older
        backup, another program's files).
    :param missing_storage: layer ids whose storage is gone from disk.
    :param incomplete: layer ids left incomplete by a process that is gone.
    :param orphan_mounts: mount points under the run directory that nothing counts.
    :param stale_counts: layer ids whose mount count says mounted, but nothing is.
    :param orphan_records: tar-split records (by storage id) of layers that are gone.
    :param interrupted: operations in two steps (removing an image; creating, removing or
        committing a container) whose process died between them, as ``operation: layer``;
        each open finishes them, by collecting the layer they may have left unheld.
    :param dependents: what goes with the layers of ``missing_storage``: the layers above
        them and the images and containers that use any of them, as ``layer ID``,
        ``image ID`` and ``container ID``. In a check, what a repair would remove; in a
        repair's result, what it removed.
    :param content_mismatch: committed layers whose files no longer give their DiffID, as
        ``ID: what differs``; only a check with ``content`` looks.
        No repair changes a layer's files: re-import the image, or remove it.
    :param unreferenced: committed layers that no image, container, child layer or name
        holds. Not a problem (a layer applied on its own is held by nothing until it is
        named, as a committed snapshot is in containerd); a forced repair removes them.
    :param kept: in a repair's result, what it left because removing it needs ``force``.
    :param foreign_mounts: mounts under the run directory that are not this store's (another
        program's, or another store's): never touched, listed so that nobody wonders.
    :param graph_damage: what SQLite's integrity check found wrong with ``graph.db``, one
        line each; when it finds anything the other fields stay empty, since a damaged graph
        cannot be compared with the disk.
    """

    orphan_storage: tuple[str, ...] = ()
    missing_storage: tuple[str, ...] = ()
    incomplete: tuple[str, ...] = ()
    orphan_mounts: tuple[str, ...] = ()
    stale_counts: tuple[str, ...] = ()
    orphan_records: tuple[str, ...] = ()
    interrupted: tuple[str, ...] = ()
    dependents: tuple[str, ...] = ()
    content_mismatch: tuple[str, ...] = ()
    unreferenced: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    foreign_mounts: tuple[str, ...] = ()
    graph_damage: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        """One line per problem (``unreferenced`` and ``kept`` are in :meth:`notes`)."""
        return [
            *(f"orphan storage {s}: on disk, owned by no layer" for s in self.orphan_storage),
            *(f"layer {i}: its storage is missing from disk" for i in self.missing_storage),
            *(f"{d}: uses a layer whose storage is missing" for d in self.dependents),
            *(f"layer {i}: left incomplete by a process that is gone" for i in self.incomplete),
            *(
                f"mount {m}: mounted under the run directory, counted by nothing"
                for m in self.orphan_mounts
            ),
            *(f"layer {i}: counted as mounted but not mounted" for i in self.stale_counts),
            *(f"tar-split record {s}: its layer is gone" for s in self.orphan_records),
            *(f"interrupted operation: {o}" for o in self.interrupted),
            *(f"layer {m}" for m in self.content_mismatch),
            *(f"graph.db is damaged: {d}; restore it from a backup" for d in self.graph_damage),
        ]

    def notes(self) -> list[str]:
        """One line per thing worth knowing that is not a problem."""
        return [
            *(
                f"layer {i}: unreferenced (no image, container, child layer or name holds it)"
                for i in self.unreferenced
            ),
            *(f"kept {k}" for k in self.kept),
            *(f"mount {m}: not this store's; left alone" for m in self.foreign_mounts),
        ]


DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_KEY = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
ID_PREFIX = re.compile(r"(sha256:)?[0-9a-f]{4,64}")
_MAX_LABEL_BYTES = 4096  # containerd pkg/labels/validate.go: key + value


def chain_id(diff_ids: Sequence[str]) -> str:
    """The ChainID of layers with these DiffIDs, base first (image-spec config.md)."""
    if not diff_ids:
        raise InvalidArgument("chain_id: no DiffIDs given")
    current = ""
    for diff_id in diff_ids:
        if not DIGEST.fullmatch(diff_id):
            raise InvalidArgument(f"DiffID {diff_id!r}: not a sha256 digest")
        if not current:
            current = diff_id
        else:
            current = "sha256:" + hashlib.sha256(f"{current} {diff_id}".encode()).hexdigest()
    return current


def check_key(what: str, value: str) -> str:
    if not isinstance(value, str) or not _KEY.fullmatch(value) or value != value.strip():
        raise InvalidArgument(
            f"{what} {value!r}: must be 1-256 printable characters without surrounding spaces"
        )
    if DIGEST.fullmatch(value):
        raise InvalidArgument(f"{what} {value!r}: sha256 ids are reserved for committed layers")
    return value


def check_digest(what: str, value: str | None) -> str | None:
    if value is not None and not DIGEST.fullmatch(value):
        raise InvalidArgument(f"{what} {value!r}: expected 'sha256:' and 64 lower-case hex digits")
    return value


def check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    result = {}
    for key, value in (labels or {}).items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise InvalidArgument(f"label {key!r}: keys and values must be strings, keys non-empty")
        if len(key.encode()) + len(value.encode()) > _MAX_LABEL_BYTES:
            raise InvalidArgument(f"label {key!r}: key and value exceed {_MAX_LABEL_BYTES} bytes")
        result[key] = value
    return result


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)
