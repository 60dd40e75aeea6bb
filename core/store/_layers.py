"""The store: one root, one driver, one graph, and the bookkeeping drivers never do.

The data path reads top to bottom: a tar is opened and decompressed, a layer is created and
marked *incomplete*, the driver applies the tar, the DiffID is verified, and the layer is
committed under its ChainID in one transaction. Nothing else ever clears the incomplete mark,
so a layer is either complete and verified or, after the next open, gone.

Concurrency: the graph is SQLite in WAL mode, so readers never wait. Every change to the graph
happens while the store lock (``flock`` on ``<root>/laminae.lock``) is held. Long filesystem
work (applying a tar, copying a parent) runs outside the store lock, under a per-layer lock
file that tells another process's cleanup "this incomplete layer is still being written".
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Self

import attrs

from laminae._exceptions import (
    AlreadyExists,
    CorruptLayer,
    DriverUnavailable,
    FailedPrecondition,
    InvalidArgument,
    LaminaeError,
    NotFound,
    Unsupported,
    map_os_errors,
)
from laminae.archive._apply import Limits, apply_tar, write_changes_tar
from laminae.archive._changes import Change, naive_changes
from laminae.archive._compression import (
    Compression,
    DigestReader,
    DigestWriter,
    open_compressor,
    open_decompressed,
    sniff_compression,
)
from laminae.driverkit._contract import (
    Applier,
    Capabilities,
    ChangeReporter,
    Committer,
    Driver,
    Feature,
    QuotaSetter,
    Usage,
)
from laminae.driverkit._mount import mount_all, mounted, unmount_all
from laminae.driverkit._plugins import DriverEntry, find_drivers
from laminae.kernel import _linux
from laminae.kernel._locks import StoreLock, claim, is_claimed
from laminae.store._graph import Graph, LayerRow, now
from laminae.store._records import (
    ID_PREFIX,
    CheckReport,
    DiffResult,
    Layer,
    LayerKind,
    StoreInfo,
    chain_id,
    check_digest,
    check_key,
    check_labels,
    parse_time,
)

if TYPE_CHECKING:
    pass

__all__ = ["LayerStore"]


def _select_driver(
    drivers: Mapping[str, DriverEntry],
    root: Path,
    explicit: str | None,
    recorded: str | None,
    priority: Sequence[str],
    options: Mapping[str, Mapping[str, str]],
) -> DriverEntry:
    """Pick the driver: explicit name, else the one that made this store, else by priority."""
    if explicit is not None:
        if explicit not in drivers:
            raise InvalidArgument(
                f"driver {explicit!r}: not installed (installed: {', '.join(sorted(drivers))})"
            )
        if recorded is not None and recorded != explicit:
            raise FailedPrecondition(
                f"store {root} was made by driver {recorded!r}; it cannot be opened with "
                f"{explicit!r} (pick another --root, or remove the store)"
            )
        entry = drivers[explicit]
        reason = entry.probe(root / entry.name, options.get(entry.name, {}))
        if reason is not None:
            raise DriverUnavailable(f"driver {explicit!r}: {reason}")
        return entry
    if recorded is not None:
        if recorded not in drivers:
            raise DriverUnavailable(
                f"store {root} was made by driver {recorded!r}, which is not installed"
            )
        entry = drivers[recorded]
        reason = entry.probe(root / entry.name, options.get(entry.name, {}))
        if reason is not None:
            raise DriverUnavailable(f"driver {recorded!r} (which made store {root}): {reason}")
        return entry
    for name in priority:
        if name not in drivers:
            raise InvalidArgument(f"driver_priority: driver {name!r} is not installed")
    order = list(priority) or sorted(drivers, key=lambda n: (-drivers[n].priority, n))
    reasons = []
    for name in order:
        entry = drivers[name]
        reason = entry.probe(root / name, options.get(name, {}))
        if reason is None:
            return entry
        reasons.append(f"{name}: {reason}")
    raise DriverUnavailable("no driver can run here: " + "; ".join(reasons))


class LayerStore:
    """The layers of a store: one root, one driver, one graph; see the module docstring.

    :class:`~laminae.Store` adds images and containers on top (``_store_images.py``,
    ``_store_containers.py``).
    """

    def __init__(
        self,
        root: Path,
        runroot: Path,
        driver: str | None,
        options: Mapping[str, Mapping[str, str]],
        priority: Sequence[str],
        limits: Limits,
    ) -> None:
        self.root = root
        self.runroot = runroot
        self.limits = limits
        self._closed = False
        self._lock = StoreLock(root / "laminae.lock")
        self._graph = Graph(root / "graph.db")
        try:
            with self._lock.held():
                recorded = self._graph.meta("driver")
                entry = _select_driver(
                    find_drivers(driver if driver is not None else recorded),
                    root,
                    driver,
                    recorded,
                    priority,
                    options,
                )
                home = root / entry.name
                with map_os_errors(f"create driver home {home}"):
                    home.mkdir(mode=0o700, exist_ok=True)
                    (root / "locks").mkdir(mode=0o700, exist_ok=True)
                self._entry = entry
                self.driver: Driver = entry.cls(home, options.get(entry.name, {}))
                if recorded is None:
                    with self._graph.transaction():
                        self._graph.set_meta("driver", entry.name)
                self._remove_stale_incomplete()
                self._remove_stale_scratch()
                self._reconcile_mounts()
                self._unmount_orphans()
        except BaseException:
            self._graph.close()
            self._lock.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def driver_name(self) -> str:
        return self._entry.name

    @property
    def capabilities(self) -> Capabilities:
        return self._entry.capabilities

    def close(self) -> None:
        """Close the driver and the graph. Mounts stay (they are counted); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.driver.close()
        finally:
            self._graph.close()
            self._lock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"store {self.root} is closed")

    def info(self) -> StoreInfo:
        """A summary: paths, driver, capabilities, backing filesystem, counts."""
        self._check_open()
        layers, images, containers = self._graph.counts()
        return StoreInfo(
            root=self.root,
            runroot=self.runroot,
            driver=self.driver_name,
            driver_origin=self._entry.origin,
            capabilities=self.capabilities,
            backing_fs=_backing_fs(self.root),
            layers=layers,
            images=images,
            containers=containers,
        )

    # -- lookups ---------------------------------------------------------------------------

    def _resolve(self, ref: str) -> LayerRow:
        if not isinstance(ref, str) or not ref or "\x00" in ref:
            raise InvalidArgument(f"layer reference {ref!r}: empty or not a string")
        row = self._graph.layer(ref)
        if row is None:
            named = self._graph.layer_for_name(ref)
            if named is not None:
                row = self._graph.layer(named)
        if row is None and ID_PREFIX.fullmatch(ref):
            matches = self._graph.match_prefix(ref.removeprefix("sha256:"))
            if len(matches) > 1:
                raise InvalidArgument(f"layer reference {ref!r}: ambiguous, give more digits")
            if matches:
                row = self._graph.layer(matches[0])
        if row is None or row.incomplete:
            raise NotFound(f"layer {ref!r}: no such layer")
        return row

    def _to_layer(self, row: LayerRow) -> Layer:
        return Layer(
            id=row.id,
            parent=row.parent,
            kind=LayerKind(row.kind),
            storage_id=row.storage_id,
            diff_id=row.diff_id,
            digest=row.digest,
            size=row.size,
            names=self._graph.names(row.id),
            labels=MappingProxyType(self._graph.labels(row.id)),
            created=parse_time(row.created),
            updated=parse_time(row.updated),
            mount_count=row.mount_count,
            mount_point=Path(row.mount_point) if row.mount_point else None,
            depth=row.depth,
        )

    def _parents(self, row: LayerRow) -> list[str]:
        """Storage ids of ``row``'s parents, immediate parent first."""
        return [r.storage_id for r in self._graph.chain(row.id)[1:]]

    def layer(self, ref: str) -> Layer:
        """The layer ``ref`` names: an id, a unique id prefix, or a name.

        :raises NotFound: nothing matches.
        :raises InvalidArgument: ``ref`` is malformed or ambiguous.
        """
        self._check_open()
        return self._to_layer(self._resolve(ref))

    def layers(self, *, kind: LayerKind | None = None) -> list[Layer]:
        """Every complete layer (of ``kind``), oldest first."""
        self._check_open()
        rows = self._graph.all_layers(None if kind is None else LayerKind(kind).value)
        return [self._to_layer(r) for r in rows if not r.incomplete]

    # -- creating layers -------------------------------------------------------------------

    def _committed_parent(self, parent: str | None) -> LayerRow | None:
        if parent is None:
            return None
        row = self._resolve(parent)
        if row.kind != LayerKind.COMMITTED.value:
            raise FailedPrecondition(
                f"parent {parent!r}: is a{'n' if row.kind == 'active' else ''} {row.kind} layer; "
                "only committed layers can have children"
            )
        depth = row.depth + 1
        if depth > self.capabilities.max_depth:
            raise FailedPrecondition(
                f"parent {parent!r}: a child would have {depth} parents; driver "
                f"{self.driver_name!r} supports at most {self.capabilities.max_depth}"
            )
        return row

    @contextlib.contextmanager
    def _new_storage(
        self, key: str, parent: LayerRow | None, kind: LayerKind
    ) -> Iterator[tuple[LayerRow, list[str]]]:
        """Create an incomplete layer row and its storage; on error, remove both.

        The per-layer lock is held for the whole block: while it is, no other process's
        cleanup takes this incomplete layer for a crashed one.
        """
        storage_id = secrets.token_hex(16)
        stamp = now()
        row = LayerRow(
            id=key,
            storage_id=storage_id,
            parent=None if parent is None else parent.id,
            kind=kind.value,
            depth=0 if parent is None else parent.depth + 1,
            diff_id=None,
            digest=None,
            size=None,
            created=stamp,
            updated=stamp,
            incomplete=True,
            mount_count=0,
            mount_point=None,
        )
        created = False
        in_progress = claim(self._layer_lock(storage_id))
        in_progress.__enter__()
        try:
            with self._lock.held(), self._graph.transaction():
                if self._graph.layer(key) is not None or self._graph.layer_for_name(key):
                    raise AlreadyExists(f"layer {key!r}: already exists")
                if parent is not None and self._graph.layer(parent.id) is None:
                    raise NotFound(f"layer {parent.id!r}: removed while in use")
                self._graph.insert_layer(row)
            parents = [] if parent is None else [parent.storage_id, *self._parents(parent)]
            with map_os_errors(f"create layer {key!r} in driver {self.driver_name}"):
                self.driver.create(storage_id, parents, kind is not LayerKind.VIEW)
            created = True
            yield row, parents
        except BaseException:
            with self._lock.held():
                if created:
                    with contextlib.suppress(LaminaeError, OSError):
                        self.driver.remove(storage_id)
                self._tar_split_path(storage_id).unlink(missing_ok=True)
                with self._graph.transaction():
                    current = self._graph.layer_by_storage(storage_id)
                    if current is not None:
                        self._graph.delete_layer(current.id)
            raise
        finally:
            in_progress.__exit__(None, None, None)

    def create_layer(
        self,
        key: str | None = None,
        parent: str | None = None,
        *,
        view: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> Layer:
        """Create an active (writable) layer, or a read-only view, on committed ``parent``.

        :param key: the layer's id; a random one if ``None``.
        :raises AlreadyExists: ``key`` is taken.
        :raises FailedPrecondition: ``parent`` is not committed, or too deep for the driver.
        """
        self._check_open()
        key = secrets.token_hex(32) if key is None else check_key("layer key", key)
        checked = check_labels(labels)
        parent_row = self._committed_parent(parent)
        kind = LayerKind.VIEW if view else LayerKind.ACTIVE
        with (
            self._new_storage(key, parent_row, kind),
            self._lock.held(),
            self._graph.transaction(),
        ):
            self._graph.set_labels(key, checked)
            self._graph.update_layer(key, incomplete=False)
        return self.layer(key)

    def apply_layer(
        self,
        tar: BinaryIO | str | Path,
        parent: str | None = None,
        *,
        diff_id: str | None = None,
        digest: str | None = None,
        names: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
    ) -> Layer:
        """Import a layer tar (plain, gzip or zstd) as a committed layer on ``parent``.

        The layer's id is its ChainID. If that layer exists already, it is returned (with
        ``names`` and ``labels`` added) and the new copy is thrown away.

        :param digest: the expected digest of the bytes as given (compressed).
        :param diff_id: the expected DiffID (digest of the uncompressed tar).
        :raises CorruptLayer: a digest does not match.
        :raises InvalidArgument: the tar is malformed or hostile (the message names the entry).
        :raises LimitExceeded: the tar breaks a configured limit.
        """
        self._check_open()
        check_digest("digest", digest)
        check_digest("diff_id", diff_id)
        names = [check_key("layer name", n) for n in names]
        checked = check_labels(labels)
        parent_row = self._committed_parent(parent)
        with contextlib.ExitStack() as stack:
            if isinstance(tar, (str, Path)):
                with map_os_errors(f"open layer tar {str(tar)!r}"):
                    raw: IO[bytes] = stack.enter_context(open(tar, "rb"))
            else:
                raw = tar
            compression, source = sniff_compression(raw)
            # A plain tar's digest is its DiffID: hash it once, not twice.
            compressed = None if compression is Compression.NONE else DigestReader(source)
            plain = DigestReader(
                open_decompressed(compressed or source, max_bytes=self.limits.max_bytes)
            )
            key = f"incomplete-{secrets.token_hex(16)}"
            with self._new_storage(key, parent_row, LayerKind.ACTIVE) as (row, parents):
                self._apply(row, parents, plain)
                _drain(plain)
                if compressed is not None:
                    _drain(compressed)
                blob_digest = plain.digest if compressed is None else compressed.digest
                if digest is not None and blob_digest != digest:
                    raise CorruptLayer(f"layer tar: digest is {blob_digest}, expected {digest}")
                if diff_id is not None and plain.digest != diff_id:
                    raise CorruptLayer(f"layer tar: DiffID is {plain.digest}, expected {diff_id}")
                self._sync()
                return self._commit(
                    row,
                    parent_row,
                    plain.digest,
                    plain.size,
                    None if compressed is None else compressed.digest,
                    names,
                    checked,
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def _apply(self, row: LayerRow, parents: list[str], tar: BinaryIO) -> None:
        """Apply ``tar`` onto staged layer ``row``, recording its tar-split on the way."""
        with self._recording(row, tar) as recorded:
            self._apply_recorded(row, parents, recorded)

    def _apply_recorded(self, row: LayerRow, parents: list[str], tar: BinaryIO) -> None:
        """Apply ``tar``, which already passes through :meth:`_recording`, onto ``row``."""
        what = f"apply layer tar onto {row.id!r}"
        if Feature.APPLY in self.capabilities.features:
            assert isinstance(self.driver, Applier)
            with map_os_errors(what):
                self.driver.apply(row.storage_id, parents, tar, self.limits)
            return
        with self._materialized(row, parents, readonly=False) as path, map_os_errors(what):
            apply_tar(path, tar, limits=self.limits)

    def _tar_split_path(self, storage_id: str) -> Path:
        return self.root / "tar-split" / f"{storage_id}.tsz"

    @contextlib.contextmanager
    def _recording(self, row: LayerRow, tar: BinaryIO) -> Iterator[BinaryIO]:
        """``tar``, passed through a recorder of its exact bytes (:mod:`._tarsplit`).

        The record lets :meth:`_write_layer_tar` give back the very tar that was applied, so
        an exported image keeps its DiffIDs and its config (containers/storage and Moby keep
        tar-split data for the same reason).
        """
        from laminae.archive._tarsplit import TarSplitRecorder

        path = self._tar_split_path(row.storage_id)
        with map_os_errors(f"record tar-split of layer {row.id!r}"):
            path.parent.mkdir(mode=0o700, exist_ok=True)
            out = open(path, "wb")  # noqa: SIM115 (closed below, and unlinked on error)
        try:
            with out:
                recorder = TarSplitRecorder(tar, out, self.limits)
                yield recorder
                while recorder.read(1 << 20):  # the applier may stop at the end blocks
                    pass
                recorder.finish()
            if not recorder.exact:
                # A later entry replaced a file an earlier one referenced: the files cannot
                # give the tar back, so keep no record (export then diffs, and checks).
                path.unlink()
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _materialized(self, row: LayerRow, parents: list[str], *, readonly: bool) -> Iterator[Path]:
        """The layer's root as a path, for the core's own reading and writing.

        A single bind mount needs no mount at all: its source *is* the tree. Anything else
        is mounted privately under ``<runroot>/tmp`` for the duration.
        """
        with map_os_errors(f"describe mounts of layer {row.id!r}"):
            specs = self.driver.mounts(row.storage_id, parents, readonly)
        if len(specs) == 1 and specs[0].type == "bind" and not specs[0].target:
            yield Path(specs[0].source)
            return
        nonce = secrets.token_hex(8)
        (self.runroot / "tmp").mkdir(mode=0o700, exist_ok=True)
        with (
            claim(self.runroot / "tmp" / f"{nonce}.lock"),
            mounted(specs, self.runroot / "tmp" / nonce) as path,
        ):
            yield path

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        """A private directory under ``<root>/tmp`` for spool files, removed at the end.

        It is claimed like an incomplete layer, so the next open of the store removes what a
        killed process left here, and never what a live one is writing.
        """
        base = self.root / "tmp"
        nonce = secrets.token_hex(8)
        with map_os_errors(f"make a scratch directory in {base}"):
            base.mkdir(mode=0o700, exist_ok=True)
        with claim(base / f"{nonce}.lock"):
            path = base / nonce
            with map_os_errors(f"make a scratch directory in {base}"):
                path.mkdir(mode=0o700)
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)

    def _remove_stale_scratch(self) -> list[str]:
        """Remove the scratch directories of processes that are gone."""
        base = self.root / "tmp"
        removed = []
        for entry in sorted(base.iterdir()) if base.is_dir() else ():
            lock = entry if entry.suffix == ".lock" else base / f"{entry.name}.lock"
            if is_claimed(lock):
                continue
            if entry.suffix == ".lock":
                if not (base / entry.stem).exists():  # its directory is swept with it
                    entry.unlink(missing_ok=True)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            removed.append(str(entry))
        return removed

    def _sync(self) -> None:
        """Flush the driver's filesystem before a layer counts as present (moby#36135)."""
        fd = os.open(self.driver_home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _linux.syncfs(fd)
        finally:
            os.close(fd)

    @property
    def driver_home(self) -> Path:
        return self.root / self.driver_name

    def _commit(
        self,
        row: LayerRow,
        parent: LayerRow | None,
        diff_id: str,
        size: int,
        digest: str | None,
        names: Sequence[str],
        labels: Mapping[str, str],
    ) -> Layer:
        """Make ``row`` the committed layer with its ChainID, or merge it into an existing one."""
        new_id = diff_id if parent is None else chain_id([parent.id, diff_id])
        with self._lock.held():
            existing = self._graph.layer(new_id)
            if existing is not None and not existing.incomplete:
                with self._graph.transaction():
                    self._graph.update_layer(row.id, incomplete=True)
                with map_os_errors(f"remove duplicate of layer {new_id}"):
                    self.driver.remove(row.storage_id)
                    self._tar_split_path(row.storage_id).unlink(missing_ok=True)
                with self._graph.transaction():
                    self._graph.delete_layer(row.id)
                    self._add_names_labels(new_id, names, labels, replace_labels=False)
                return self.layer(new_id)
            for name in names:
                owner = self._graph.layer_for_name(name)
                if owner is not None:
                    raise AlreadyExists(f"layer name {name!r}: already names layer {owner}")
            if Feature.COMMIT in self.capabilities.features:
                assert isinstance(self.driver, Committer)
                with map_os_errors(f"commit layer {new_id} in driver {self.driver_name}"):
                    self.driver.commit(row.storage_id)
            with self._graph.transaction():
                self._mark_committed(row, new_id, diff_id, size, digest)
                self._add_names_labels(new_id, names, labels, replace_labels=True)
        return self.layer(new_id)

    def _mark_committed(
        self, row: LayerRow, new_id: str, diff_id: str, size: int, digest: str | None
    ) -> None:
        """Record ``row`` as the committed, verified layer ``new_id`` (in a transaction)."""
        self._graph.update_layer(
            row.id,
            id=new_id,
            kind=LayerKind.COMMITTED.value,
            diff_id=diff_id,
            size=size,
            digest=digest,
            incomplete=False,
        )

    def _add_names_labels(
        self,
        layer_id: str,
        names: Sequence[str],
        labels: Mapping[str, str],
        *,
        replace_labels: bool,
    ) -> None:
        for name in names:
            owner = self._graph.layer_for_name(name)
            if owner == layer_id:
                continue
            if owner is not None:
                raise AlreadyExists(f"layer name {name!r}: already names layer {owner}")
            self._graph.add_name(layer_id, name)
        if replace_labels:
            self._graph.set_labels(layer_id, labels)
        elif labels:
            self._graph.set_labels(layer_id, {**self._graph.labels(layer_id), **labels})

    def commit_layer(
        self,
        key: str,
        *,
        names: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
    ) -> Layer:
        """Turn active layer ``key`` into a committed layer whose id is its ChainID.

        Labels are replaced by ``labels`` (containerd's Commit does the same). If a committed
        layer with the same ChainID exists, ``key`` is removed and that layer returned.

        :raises FailedPrecondition: ``key`` is not active, is mounted, or is a container's.
        """
        self._check_open()
        names = [check_key("layer name", n) for n in names]
        checked = check_labels(labels)
        row = self._resolve(key)
        if row.kind != LayerKind.ACTIVE.value:
            raise FailedPrecondition(f"layer {key!r}: is {row.kind}; only active layers commit")
        if self._graph.containers_using(layer=row.id):
            raise FailedPrecondition(f"layer {key!r}: belongs to a container")
        self._reconcile_mounts()
        row = self._resolve(key)
        if row.mount_count:
            raise FailedPrecondition(f"layer {key!r}: is mounted ({row.mount_count}); unmount it")
        sink = DigestWriter(_Discard())
        self._write_diff(row, sink)
        parent = None if row.parent is None else self._graph.layer(row.parent)
        self._sync()
        return self._commit(row, parent, sink.digest, sink.size, None, names, checked)

    # -- reading layers --------------------------------------------------------------------

    def changes(self, ref: str) -> list[Change]:
        """The changes of layer ``ref`` against its parent, sorted by path."""
        self._check_open()
        row = self._resolve(ref)
        with self._changes(row) as (changes, _):
            return list(changes)

    @contextlib.contextmanager
    def _changes(self, row: LayerRow) -> Iterator[tuple[Iterator[Change], Path]]:
        """The change stream and the layer's root to read content from, while both hold."""
        parents = self._parents(row)
        with contextlib.ExitStack() as stack:
            root = stack.enter_context(self._materialized(row, parents, readonly=True))
            if Feature.CHANGES in self.capabilities.features:
                assert isinstance(self.driver, ChangeReporter)
                with map_os_errors(f"changes of layer {row.id!r}"):
                    yield self.driver.changes(row.storage_id, parents), root
                return
            parent_root = None
            if row.parent is not None:
                parent_row = self._graph.layer(row.parent)
                assert parent_row is not None
                parent_root = stack.enter_context(
                    self._materialized(parent_row, parents[1:], readonly=True)
                )
            with map_os_errors(f"changes of layer {row.id!r}"):
                yield naive_changes(parent_root, root), root

    def _write_diff(self, row: LayerRow, out: BinaryIO) -> None:
        with self._changes(row) as (changes, root), map_os_errors(f"diff of layer {row.id!r}"):
            write_changes_tar(root, changes, out)

    def diff(
        self, ref: str, out: BinaryIO, *, compression: Compression = Compression.NONE
    ) -> DiffResult:
        """Write the OCI layer tar of ``ref``'s changes to ``out``, compressed as asked."""
        self._check_open()
        row = self._resolve(ref)
        compression = Compression(compression)
        written = DigestWriter(out)
        compressor = open_compressor(written, compression)
        plain = DigestWriter(compressor)
        self._write_diff(row, plain)
        compressor.close()
        return DiffResult(plain.digest, written.digest, written.size, compression)

    def usage(self, ref: str) -> Usage:
        """Disk used by layer ``ref`` itself, parents excluded."""
        self._check_open()
        row = self._resolve(ref)
        with map_os_errors(f"usage of layer {ref!r}"):
            return self.driver.usage(row.storage_id)

    def set_quota(self, ref: str, size: int) -> None:
        """Limit the writable layer ``ref`` to ``size`` bytes.

        :raises Unsupported: the driver has no quota support.
        """
        self._check_open()
        row = self._resolve(ref)
        if Feature.QUOTA not in self.capabilities.features:
            raise Unsupported(f"driver {self.driver_name!r}: no quota support")
        if not isinstance(size, int) or size <= 0:
            raise InvalidArgument(f"quota size {size!r}: must be a positive number of bytes")
        assert isinstance(self.driver, QuotaSetter)
        with map_os_errors(f"set quota of layer {ref!r}"):
            self.driver.set_quota(row.storage_id, size)

    # -- names and labels ------------------------------------------------------------------

    def set_labels(self, ref: str, labels: Mapping[str, str]) -> Layer:
        """Replace every label of ``ref`` with ``labels``."""
        self._check_open()
        checked = check_labels(labels)
        with self._lock.held():
            row = self._resolve(ref)
            with self._graph.transaction():
                self._graph.set_labels(row.id, checked)
                self._graph.update_layer(row.id)
        return self.layer(row.id)

    def add_names(self, ref: str, names: Sequence[str]) -> Layer:
        """Give ``ref`` more names. :raises AlreadyExists: a name belongs to another layer."""
        self._check_open()
        checked = [check_key("layer name", n) for n in names]
        with self._lock.held():
            row = self._resolve(ref)
            with self._graph.transaction():
                self._add_names_labels(row.id, checked, {}, replace_labels=False)
                self._graph.update_layer(row.id)
        return self.layer(row.id)

    def remove_names(self, ref: str, names: Sequence[str]) -> Layer:
        """Take ``names`` away from ``ref``. :raises NotFound: one of them is not ``ref``'s."""
        self._check_open()
        with self._lock.held():
            row = self._resolve(ref)
            with self._graph.transaction():
                for name in names:
                    if self._graph.layer_for_name(name) != row.id:
                        raise NotFound(f"layer name {name!r}: not a name of layer {row.id}")
                    self._graph.remove_name(name)
                self._graph.update_layer(row.id)
        return self.layer(row.id)

    # -- mounts ----------------------------------------------------------------------------

    def _mount_target(self, row: LayerRow) -> Path:
        return self.runroot / "mounts" / row.storage_id

    def mount(self, ref: str, *, readonly: bool = False) -> Path:
        """Mount layer ``ref`` and return where. Counted: each mount needs an unmount.

        Committed layers and views always mount read-only. The first mount decides the
        mode; later ones share it.
        """
        self._check_open()
        with self._lock.held():
            row = self._resolve(ref)
            self._reconcile_row(row)
            row = self._resolve(ref)
            target = self._mount_target(row)
            if row.mount_count == 0:
                readonly = readonly or row.kind != LayerKind.ACTIVE.value
                with map_os_errors(f"describe mounts of layer {ref!r}"):
                    specs = self.driver.mounts(row.storage_id, self._parents(row), readonly)
                mount_all(specs, target)
            with self._graph.transaction():
                self._graph.update_layer(
                    row.id, mount_count=row.mount_count + 1, mount_point=str(target)
                )
        return target

    def unmount(self, ref: str, *, force: bool = False) -> None:
        """Drop one mount of ``ref``; the last one unmounts. ``force`` drops them all.

        :raises FailedPrecondition: ``ref`` is not mounted.
        """
        self._check_open()
        with self._lock.held():
            row = self._resolve(ref)
            self._reconcile_row(row)
            row = self._resolve(ref)
            if row.mount_count == 0 and not force:
                raise FailedPrecondition(f"layer {ref!r}: is not mounted")
            count = 0 if force else row.mount_count - 1
            if count == 0:
                unmount_all(self._mount_target(row))
            with self._graph.transaction():
                self._graph.update_layer(
                    row.id, mount_count=count, mount_point=row.mount_point if count else None
                )

    def _reconcile_row(self, row: LayerRow, points: set[str] | None = None) -> bool:
        """Reset ``row``'s mount count if its mount is gone. Returns whether it was stale."""
        if row.mount_count == 0:
            return False
        points = _linux.mount_points() if points is None else points
        if row.mount_point in points:
            return False
        with self._graph.transaction():
            self._graph.update_layer(row.id, mount_count=0, mount_point=None)
        return True

    def _unmount_orphans(self) -> list[str]:
        """Unmount what crashed processes left mounted under the run directory."""
        with self._lock.held():
            orphans = self._orphan_mounts(_linux.mount_points())
            # Deepest first; unmount_all takes submounts along with their parent.
            for point in sorted(orphans, key=len, reverse=True):
                if _linux.is_mountpoint(point):
                    unmount_all(Path(point))
                with contextlib.suppress(FileNotFoundError):
                    Path(point + ".lock").unlink()
        return orphans

    def _reconcile_mounts(self) -> None:
        """Make every mount count agree with ``/proc/self/mountinfo``."""
        with self._lock.held():
            # Read under the lock: another process may mount between a read and the lock.
            points = _linux.mount_points()
            for row in self._graph.all_layers():
                self._reconcile_row(row, points)

    # -- removing --------------------------------------------------------------------------

    def remove_layer(self, ref: str) -> None:
        """Remove layer ``ref`` and its storage.

        :raises FailedPrecondition: it has children, is mounted, or an image or container
            uses it.
        """
        self._check_open()
        with self._lock.held():
            row = self._resolve(ref)
            self._reconcile_row(row)
            row = self._resolve(ref)
            children = self._graph.children(row.id)
            if children:
                raise FailedPrecondition(
                    f"cannot remove layer {ref!r}: it has {len(children)} child layer(s)"
                )
            if row.mount_count:
                raise FailedPrecondition(
                    f"cannot remove layer {ref!r}: mounted {row.mount_count} time(s)"
                )
            users = self._graph.images_using_layer(row.id) or self._graph.containers_using(
                layer=row.id
            )
            if users:
                raise FailedPrecondition(f"cannot remove layer {ref!r}: used by {users[0]}")
            self._remove_row(row)

    def _remove_row(self, row: LayerRow) -> None:
        # Marked incomplete first: a crash in the middle leaves a layer the next open removes.
        with self._graph.transaction():
            self._graph.update_layer(row.id, incomplete=True)
        # Called for incomplete layers too, whose storage may be half made or absent: the
        # driver sweeps what is there, and NotFound means there was nothing.
        with contextlib.suppress(NotFound), map_os_errors(f"remove layer {row.id!r}"):
            self.driver.remove(row.storage_id)
        self._tar_split_path(row.storage_id).unlink(missing_ok=True)
        with self._graph.transaction():
            self._graph.delete_layer(row.id)

    def _stale_incomplete(self) -> list[LayerRow]:
        """Incomplete layers whose writer is gone (its per-layer lock is free)."""
        return [
            row
            for row in self._graph.all_layers()
            if row.incomplete and not is_claimed(self._layer_lock(row.storage_id))
        ]

    def _layer_lock(self, storage_id: str) -> Path:
        return self.root / "locks" / f"{storage_id}.lock"

    def _orphan_mounts(self, points: set[str]) -> list[str]:
        """Mounts under the run directory that no layer counts and no live process holds.

        ``mounts/<sid>`` belongs to a layer whose count says mounted; ``tmp/<nonce>`` to the
        process holding ``tmp/<nonce>.lock``. Anything else is what a crash left behind.
        """
        counted = {r.mount_point for r in self._graph.all_layers() if r.mount_count}
        mounts_dir = f"{self.runroot}/mounts/"
        tmp_dir = f"{self.runroot}/tmp/"
        orphans = []
        for point in sorted(points):
            if point.startswith(mounts_dir):
                top = mounts_dir + point[len(mounts_dir) :].split("/")[0]
                if top not in counted:
                    orphans.append(point)
            elif point.startswith(tmp_dir):
                nonce = point[len(tmp_dir) :].split("/")[0]
                if not is_claimed(self.runroot / "tmp" / f"{nonce}.lock"):
                    orphans.append(point)
        return orphans

    def _remove_stale_incomplete(self) -> list[str]:
        removed = []
        with self._lock.held():
            for row in self._stale_incomplete():
                if self._graph.layer(row.id) is None:
                    continue  # removed above, as a layer staged on another
                # Only incomplete layers can sit on an incomplete one (an image import
                # stages a whole chain): they go first, top down.
                for above in reversed(self._descendants(row.id)):
                    self._remove_row(above)
                    with contextlib.suppress(FileNotFoundError):
                        self._layer_lock(above.storage_id).unlink()
                    removed.append(above.id)
        return removed

    # -- check and repair ------------------------------------------------------------------

    def check(self) -> CheckReport:
        """Compare the graph with the driver's disk and the kernel's mounts; change nothing."""
        self._check_open()
        with self._lock.held():
            rows = self._graph.all_layers()
            known = {r.storage_id for r in rows}
            with map_os_errors(f"list layers of driver {self.driver_name}"):
                on_disk = set(self.driver.layers())
            points = _linux.mount_points()
            return CheckReport(
                orphan_storage=tuple(sorted(on_disk - known)),
                missing_storage=tuple(
                    r.id for r in rows if not r.incomplete and r.storage_id not in on_disk
                ),
                incomplete=tuple(r.id for r in self._stale_incomplete()),
                orphan_mounts=tuple(self._orphan_mounts(points)),
                stale_counts=tuple(
                    r.id for r in rows if r.mount_count and r.mount_point not in points
                ),
                orphan_records=tuple(
                    sorted(
                        record.stem
                        for record in (self.root / "tar-split").glob("*.tsz")
                        if record.stem not in known
                    )
                ),
            )

    def repair(self, report: CheckReport | None = None) -> CheckReport:
        """Fix what :meth:`check` finds (or what ``report`` lists); return what was fixed.

        Orphan storage is removed; layers whose storage is missing are removed from the graph
        with everything above them; stale incomplete layers are removed; orphan mounts are
        unmounted; stale counts are reset; orphan tar-split records are deleted.
        """
        self._check_open()
        report = report or self.check()
        fixed: dict[str, list[str]] = {f.name: [] for f in attrs.fields(CheckReport)}
        with self._lock.held():
            for storage_id in report.orphan_storage:
                if self._graph.layer_by_storage(storage_id) is None:
                    with map_os_errors(f"remove orphan storage {storage_id}"):
                        self.driver.remove(storage_id)
                    fixed["orphan_storage"].append(storage_id)
            for layer_id in report.missing_storage:
                for row in reversed(self._descendants(layer_id)):
                    self._drop_users(row.id)
                    self._remove_row(row)
                fixed["missing_storage"].append(layer_id)
            fixed["incomplete"] = self._remove_stale_incomplete()
            remaining = set(self._unmount_orphans())
            fixed["orphan_mounts"] = [p for p in report.orphan_mounts if p in remaining]
            points = _linux.mount_points()
            for layer_id in report.stale_counts:
                stale = self._graph.layer(layer_id)
                if stale is not None and self._reconcile_row(stale, points):
                    fixed["stale_counts"].append(layer_id)
            for storage_id in report.orphan_records:
                if self._graph.layer_by_storage(storage_id) is None:
                    self._tar_split_path(storage_id).unlink(missing_ok=True)
                    fixed["orphan_records"].append(storage_id)
        return CheckReport(**{k: tuple(v) for k, v in fixed.items()})

    def _descendants(self, layer_id: str) -> list[LayerRow]:
        """``layer_id`` and every layer above it, parents before children."""
        result = []
        todo = [layer_id]
        while todo:
            row = self._graph.layer(todo.pop(0))
            if row is None:
                continue
            result.append(row)
            todo.extend(self._graph.children(row.id))
        return result

    def _drop_users(self, layer_id: str) -> None:
        with self._graph.transaction():
            for container in self._graph.containers_using(layer=layer_id):
                self._graph.delete_container(container)
            for image in self._graph.images_using_layer(layer_id):
                for container in self._graph.containers_using(image=image):
                    self._graph.delete_container(container)
                self._graph.delete_image(image)


class _Discard(io.RawIOBase):
    """A sink for bytes that only need hashing."""

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)


def _drain(stream: BinaryIO) -> None:
    while stream.read(1 << 20):
        pass


def _backing_fs(path: Path) -> str:
    names = {
        _linux.EXT4_SUPER_MAGIC: "ext4",
        _linux.BTRFS_SUPER_MAGIC: "btrfs",
        _linux.TMPFS_MAGIC: "tmpfs",
        _linux.OVERLAYFS_SUPER_MAGIC: "overlay",
        0x58465342: "xfs",
    }
    try:
        magic = _linux.statfs_type(str(path))
    except OSError:
        return "unknown"
    return names.get(magic, hex(magic))
