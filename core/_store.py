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
import hashlib
import io
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any, BinaryIO, final

import attrs

from . import _linux
from ._archive import Limits, apply_tar, write_changes_tar
from ._changes import Change, naive_changes
from ._compression import (
    Compression,
    DigestReader,
    DigestWriter,
    open_compressor,
    open_decompressed,
    sniff_compression,
)
from ._config import StoreConfig, load_config
from ._driver import (
    Applier,
    Capabilities,
    ChangeReporter,
    Committer,
    Driver,
    Feature,
    QuotaSetter,
    Usage,
)
from ._exceptions import (
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
from ._graph import Graph, LayerRow, now
from ._image import ImageConfig, Manifest
from ._locks import StoreLock, claim, is_claimed
from ._mount import mount_all, mounted, unmount_all
from ._plugins import DriverEntry, available_drivers
from ._records import (
    ID_PREFIX,
    CheckReport,
    Container,
    DiffResult,
    Image,
    Layer,
    LayerKind,
    StoreInfo,
    chain_id,
    check_digest,
    check_key,
    check_labels,
    parse_time,
)
from ._reference import ImageLocation, local_name

if TYPE_CHECKING:
    from ._progress import Progress
    from ._registry import RegistryOptions

__all__ = ["Store", "open_store"]


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


def open_store(
    root: str | Path | None = None,
    *,
    runroot: str | Path | None = None,
    driver: str | None = None,
    driver_options: Mapping[str, str] | None = None,
    config: StoreConfig | None = None,
    limits: Limits | None = None,
) -> Store:
    """Open (or create) the store at ``root``.

    Arguments override ``config``; with no ``config``, :func:`laminae.load_config` finds one
    (``$LAMINAE_CONFIG``, ``~/.config/laminae/storage.toml``, ``/etc/laminae/storage.toml``).

    :raises InvalidArgument: a bad root, driver name or option.
    :raises DriverUnavailable: no driver (or not the named one) can run here.
    :raises FailedPrecondition: the store was made by another driver than the one named.
    """
    config = config or load_config()
    root_path = Path(root) if root is not None else config.graphroot
    run_path = Path(runroot) if runroot is not None else config.runroot
    for what, path in (("root", root_path), ("runroot", run_path)):
        if not str(path) or "\x00" in str(path):
            raise InvalidArgument(f"store {what} {str(path)!r}: not a usable path")
        if path.exists() and not path.is_dir():
            raise InvalidArgument(f"store {what} {path}: exists and is not a directory")
    root_path = root_path.absolute()
    run_path = run_path.absolute()
    options = {name: dict(opts) for name, opts in config.driver_options.items()}
    name = driver if driver is not None else config.driver
    if driver_options is not None:
        if name is None:
            raise InvalidArgument("driver options given without naming a driver")
        options[name] = {**options.get(name, {}), **driver_options}
    with map_os_errors(f"create store directories {root_path}, {run_path}"):
        root_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        run_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Store(
        root_path, run_path, name, options, config.driver_priority, limits or config.limits
    )


@final
class Store:
    """Layers, images and containers in one root, stored by one driver.

    Use :func:`open_store` to get one; close it (or use it as a context manager) when done.
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
                    available_drivers(), root, driver, recorded, priority, options
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

    def __enter__(self) -> Store:
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
        from ._tarsplit import TarSplitRecorder

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
                self._graph.update_layer(
                    row.id,
                    id=new_id,
                    kind=LayerKind.COMMITTED.value,
                    diff_id=diff_id,
                    size=size,
                    digest=digest,
                    incomplete=False,
                )
                self._add_names_labels(new_id, names, labels, replace_labels=True)
        return self.layer(new_id)

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
                for child in self._graph.children(row.id):
                    # Only incomplete layers can sit on an incomplete one; they go first.
                    child_row = self._graph.layer(child)
                    if child_row is not None:
                        self._remove_row(child_row)
                self._remove_row(row)
                with contextlib.suppress(FileNotFoundError):
                    self._layer_lock(row.storage_id).unlink()
                removed.append(row.id)
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
            )

    def repair(self, report: CheckReport | None = None) -> CheckReport:
        """Fix what :meth:`check` finds (or what ``report`` lists); return what was fixed.

        Orphan storage is removed; layers whose storage is missing are removed from the graph
        with everything above them; stale incomplete layers are removed; orphan mounts are
        unmounted; stale counts are reset.
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

    # -- staged layers: the image pipeline's internals (see _transfer.py) -----------------

    def _has_committed(self, layer_id: str) -> bool:
        row = self._graph.layer(layer_id)
        return row is not None and not row.incomplete and row.kind == LayerKind.COMMITTED.value

    def _committed_row(self, layer_id: str) -> LayerRow:
        row = self._committed_parent(layer_id)
        assert row is not None
        return row

    @contextlib.contextmanager
    def _stage_layer(self, parent: LayerRow | None) -> Iterator[tuple[LayerRow, list[str]]]:
        """An incomplete layer on ``parent`` (committed, or staged itself), claimed by us.

        On an error in the block the layer and its storage go; after a normal exit the
        caller has committed it (or it is left incomplete for the next open to remove).
        """
        if parent is not None and parent.depth + 1 > self.capabilities.max_depth:
            raise FailedPrecondition(
                f"layer {parent.id!r}: a child would have {parent.depth + 1} parents; driver "
                f"{self.driver_name!r} supports at most {self.capabilities.max_depth}"
            )
        key = f"incomplete-{secrets.token_hex(16)}"
        with self._new_storage(key, parent, LayerKind.ACTIVE) as staged:
            try:
                yield staged
            except BaseException:
                self._tar_split_path(staged[0].storage_id).unlink(missing_ok=True)
                raise

    def _apply_detached(self, row: LayerRow, tar: BinaryIO) -> object:
        """Apply ``tar`` (passing through :meth:`_recording`) onto ``row`` without its parents
        (:class:`DetachedApplier`)."""
        from ._driver import DetachedApplier

        assert isinstance(self.driver, DetachedApplier)
        with map_os_errors(f"apply layer tar onto {row.id!r}"):
            return self.driver.apply_detached(row.storage_id, tar, self.limits)

    def _settle_detached(self, row: LayerRow, parents: list[str], pending: object) -> None:
        from ._driver import DetachedApplier

        assert isinstance(self.driver, DetachedApplier)
        with map_os_errors(f"settle layer {row.id!r} on its parents"):
            self.driver.settle(row.storage_id, parents, pending)

    def _reset_staged(self, row: LayerRow, parents: list[str]) -> None:
        """Empty staged layer ``row`` again, for a second apply."""
        with map_os_errors(f"reset staged layer {row.id!r}"):
            self.driver.remove(row.storage_id)
            self.driver.create(row.storage_id, parents, True)
        self._tar_split_path(row.storage_id).unlink(missing_ok=True)

    def _commit_import(
        self,
        staged: Sequence[tuple[LayerRow | None, str, int, str]],
        base: str | None,
        manifest: Manifest,
        config: ImageConfig,
        names: Sequence[str],
    ) -> Image:
        """Commit every staged layer (base first) and record the image, in one transaction.

        A layer that another process committed meanwhile is kept, and the staged copy
        dropped; ChainIDs are equal, so its content is too.
        """
        self._sync()
        duplicates: list[str] = []
        image_id = config.digest
        with self._lock.held():
            parent = base
            for row, diff_id, _, _ in staged:
                assert row is not None
                new_id = diff_id if parent is None else chain_id([parent, diff_id])
                if not self._has_committed(new_id) and Feature.COMMIT in self.capabilities.features:
                    assert isinstance(self.driver, Committer)
                    with map_os_errors(f"commit layer {new_id} in driver {self.driver_name}"):
                        self.driver.commit(row.storage_id)
                parent = new_id
            with self._graph.transaction():
                parent = base
                for row, diff_id, size, digest in staged:
                    assert row is not None
                    new_id = diff_id if parent is None else chain_id([parent, diff_id])
                    if self._has_committed(new_id):
                        for child in self._graph.children(row.id):
                            self._graph.update_layer(child, parent=new_id)
                        self._graph.delete_layer(row.id)
                        duplicates.append(row.storage_id)
                    else:
                        self._graph.update_layer(
                            row.id,
                            id=new_id,
                            kind=LayerKind.COMMITTED.value,
                            diff_id=diff_id,
                            size=size,
                            digest=digest,
                            incomplete=False,
                        )
                    parent = new_id
                if self._graph.image(image_id) is None:
                    self._graph.insert_image(
                        image_id, parent, manifest.digest, config.raw, manifest.raw
                    )
                for name in names:
                    self._graph.add_image_name(image_id, name)
        for storage_id in duplicates:
            with contextlib.suppress(LaminaeError, OSError):
                self.driver.remove(storage_id)
            self._tar_split_path(storage_id).unlink(missing_ok=True)
        return self.image(image_id)

    def _write_layer_tar(self, layer_id: str, out: BinaryIO) -> None:
        """Write committed layer ``layer_id``'s tar: the very bytes applied, when recorded.

        :raises CorruptLayer: the tar written does not have the layer's DiffID (its files
            changed on disk, or a layer without a record diffs differently).
        """
        from ._tarsplit import replay_tar

        row = self._resolve(layer_id)
        if row.kind != LayerKind.COMMITTED.value:
            raise FailedPrecondition(f"layer {layer_id!r}: is {row.kind}, not committed")
        sink = DigestWriter(out)
        record = self._tar_split_path(row.storage_id)
        if record.exists():
            with (
                open(record, "rb") as recorded,
                self._materialized(row, self._parents(row), readonly=True) as root,
            ):
                replay_tar(recorded, root, sink)
        else:
            self._write_diff(row, sink)
        if sink.digest != row.diff_id:
            raise CorruptLayer(
                f"layer {row.id}: its files give a tar with DiffID {sink.digest}, not its "
                f"DiffID {row.diff_id}"
            )

    # -- images ----------------------------------------------------------------------------

    def _to_image(self, row: Any) -> Image:
        return Image(
            id=row["id"],
            top_layer=row["top_layer"],
            names=self._graph.image_names(row["id"]),
            manifest_digest=row["manifest_digest"],
            config=row["config"],
            manifest=row["manifest"],
            created=parse_time(row["created"]),
        )

    def _resolve_image(self, ref: str) -> Any:
        if not isinstance(ref, str) or not ref:
            raise InvalidArgument(f"image reference {ref!r}: empty or not a string")
        row = self._graph.image(ref) or self._graph.image(f"sha256:{ref}")
        if row is None:
            named = self._graph.image_for_name(ref)
            if named is None and ":" not in ref.rpartition("/")[2] and "@" not in ref:
                named = self._graph.image_for_name(f"{ref}:latest")
            if named is None and ID_PREFIX.fullmatch(ref):
                matches = self._graph.match_image_prefix(ref.removeprefix("sha256:"))
                if len(matches) > 1:
                    raise InvalidArgument(f"image reference {ref!r}: ambiguous, give more digits")
                named = matches[0] if matches else None
            row = None if named is None else self._graph.image(named)
        if row is None:
            raise NotFound(f"image {ref!r}: no such image")
        return row

    def create_image(
        self,
        top_layer: str | None,
        *,
        names: Sequence[str] = (),
        config: bytes | None = None,
        manifest_digest: str | None = None,
        manifest: bytes | None = None,
    ) -> Image:
        """Record an image whose root filesystem is committed layer ``top_layer``.

        Its id is the sha256 of ``config`` (the OCI ImageID) when given, else random.
        A name already used by another image moves to this one, as ``docker tag`` does.
        """
        self._check_open()
        check_digest("manifest digest", manifest_digest)
        checked = [check_key("image name", n) for n in names]
        if config is not None and not isinstance(config, bytes):
            raise InvalidArgument("image config: must be bytes")
        image_id = (
            "sha256:" + hashlib.sha256(config).hexdigest()
            if config is not None
            else secrets.token_hex(32)
        )
        with self._lock.held():
            top = None
            if top_layer is not None:
                top_row = self._resolve(top_layer)
                if top_row.kind != LayerKind.COMMITTED.value:
                    raise FailedPrecondition(
                        f"layer {top_layer!r}: an image needs a committed layer"
                    )
                top = top_row.id
            if self._graph.image(image_id) is not None:
                raise AlreadyExists(f"image {image_id}: already exists")
            with self._graph.transaction():
                self._graph.insert_image(image_id, top, manifest_digest, config, manifest)
                for name in checked:
                    self._graph.add_image_name(image_id, name)
        return self.image(image_id)

    def image(self, ref: str) -> Image:
        """The image ``ref`` names: an id, a unique id prefix, or a name ("x" is "x:latest").

        :raises NotFound: none does.
        """
        self._check_open()
        return self._to_image(self._resolve_image(ref))

    def images(self) -> list[Image]:
        """Every image, oldest first."""
        self._check_open()
        return [self._to_image(r) for r in self._graph.all_images()]

    def image_layers(self, ref: str) -> list[Layer]:
        """The layers of image ``ref``, base first."""
        self._check_open()
        row = self._resolve_image(ref)
        if row["top_layer"] is None:
            return []
        return [self._to_layer(r) for r in reversed(self._graph.chain(row["top_layer"]))]

    def tag_image(self, ref: str, name: str) -> Image:
        """Give image ``ref`` the name ``name`` (moved from another image that had it)."""
        self._check_open()
        name = check_key("image name", local_name(name))
        with self._lock.held():
            row = self._resolve_image(ref)
            with self._graph.transaction():
                self._graph.add_image_name(row["id"], name)
        return self.image(row["id"])

    def remove_image(self, ref: str) -> list[str]:
        """Remove image ``ref``, or only its name ``ref`` when it has others (``docker rmi``).

        Removing the image also removes each of its layers, top down, that nothing else
        holds: no child layer, image, container, layer name or mount.

        :returns: the ids of the layers removed.
        :raises FailedPrecondition: a container uses the image.
        """
        self._check_open()
        with self._lock.held():
            row = self._resolve_image(ref)
            names = self._graph.image_names(row["id"])
            given = ref if ref in names else local_name(ref) if _is_name(ref) else None
            if given in names and len(names) > 1:
                with self._graph.transaction():
                    self._graph.remove_image_name(given)
                return []
            users = self._graph.containers_using(image=row["id"])
            if users:
                raise FailedPrecondition(
                    f"cannot remove image {ref!r}: used by container {users[0]}"
                )
            with self._graph.transaction():
                self._graph.delete_image(row["id"])
            return self._collect(row["top_layer"])

    def _collect(self, layer_id: str | None) -> list[str]:
        """Remove ``layer_id`` and its parents, top down, while nothing else holds them."""
        removed: list[str] = []
        self._reconcile_mounts()
        while layer_id is not None:
            row = self._graph.layer(layer_id)
            if (
                row is None
                or row.mount_count
                or self._graph.children(layer_id)
                or self._graph.names(layer_id)
                or self._graph.images_using_layer(layer_id)
                or self._graph.containers_using(layer=layer_id)
            ):
                break
            self._remove_row(row)
            removed.append(layer_id)
            layer_id = row.parent
        return removed

    def import_image(
        self,
        source: str | ImageLocation,
        *,
        names: Sequence[str] = (),
        platform: str | None = None,
        registry: RegistryOptions | None = None,
        progress: Progress | None = None,
        jobs: int | None = None,
    ) -> Image:
        """Import an image from an OCI layout, an archive or a registry.

        ``source`` is spelled as skopeo spells it: ``oci:DIR[:REF]``,
        ``oci-archive:FILE[:REF]``, ``docker-archive:FILE[:REF]``, ``docker://REFERENCE``.
        Every blob's digest and size and every layer's DiffID are checked before anything
        becomes visible; layers the store has (same ChainID) are not fetched again.

        :param names: the image's names; by default the source's own (its reference).
        :param platform: ``os/arch[/variant]`` to pick from a multi-platform index; this
            host's by default.
        :param jobs: layers fetched and applied at once (3).
        :raises CorruptLayer: a digest, size or DiffID does not match (names the blob).
        """
        from ._transports import import_from

        self._check_open()
        return import_from(self, source, names, platform, registry, progress, jobs)

    def export_image(
        self,
        ref: str,
        destination: str | ImageLocation,
        *,
        compression: Compression | None = None,
        registry: RegistryOptions | None = None,
        progress: Progress | None = None,
        jobs: int | None = None,
    ) -> str:
        """Write image ``ref`` to an OCI layout, an archive or a registry.

        :param destination: spelled as for :meth:`import_image`.
        :param compression: of the layers (gzip by default; a docker-archive is plain).
        :returns: the digest of the manifest written.
        """
        from ._transports import export_to

        self._check_open()
        return export_to(self, ref, destination, compression, registry, progress, jobs)

    def pull(
        self,
        reference: str,
        *,
        platform: str | None = None,
        registry: RegistryOptions | None = None,
        progress: Progress | None = None,
        jobs: int | None = None,
    ) -> Image:
        """:meth:`import_image` from a registry; ``docker://`` may be left out."""
        if not reference.startswith("docker://"):
            reference = f"docker://{reference}"
        return self.import_image(
            reference, platform=platform, registry=registry, progress=progress, jobs=jobs
        )

    def push(
        self,
        ref: str,
        destination: str | None = None,
        *,
        compression: Compression | None = None,
        registry: RegistryOptions | None = None,
        progress: Progress | None = None,
        jobs: int | None = None,
    ) -> str:
        """:meth:`export_image` to a registry: ``destination`` (``docker://`` may be left
        out) or, by default, the reference ``ref`` names."""
        destination = destination or ref
        if not destination.startswith("docker://"):
            destination = f"docker://{destination}"
        return self.export_image(
            ref,
            destination,
            compression=compression,
            registry=registry,
            progress=progress,
            jobs=jobs,
        )

    # -- containers ------------------------------------------------------------------------

    def _to_container(self, row: Any) -> Container:
        return Container(
            id=row["id"],
            name=row["name"],
            image=row["image"],
            layer=row["layer"],
            created=parse_time(row["created"]),
        )

    def _resolve_container(self, ref: str) -> Any:
        if not isinstance(ref, str) or not ref:
            raise InvalidArgument(f"container reference {ref!r}: empty or not a string")
        row = self._graph.container(ref)
        if row is None:
            named = self._graph.container_for_name(ref)
            row = None if named is None else self._graph.container(named)
        if row is None:
            raise NotFound(f"container {ref!r}: no such container")
        return row

    def create_container(
        self,
        image: str | None,
        *,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Container:
        """Create a container: an active layer on ``image``'s top layer (empty if none)."""
        self._check_open()
        if name is not None:
            check_key("container name", name)
            if self._graph.container_for_name(name) is not None:
                raise AlreadyExists(f"container name {name!r}: already in use")
        image_row = None if image is None else self._resolve_image(image)
        container_id = secrets.token_hex(32)
        top = None if image_row is None else image_row["top_layer"]
        layer = self.create_layer(container_id, top, labels=labels)
        try:
            with self._lock.held(), self._graph.transaction():
                if name is not None and self._graph.container_for_name(name) is not None:
                    raise AlreadyExists(f"container name {name!r}: already in use")
                self._graph.insert_container(
                    container_id, name, None if image_row is None else image_row["id"], layer.id
                )
        except BaseException:
            self.remove_layer(layer.id)
            raise
        return self.container(container_id)

    def container(self, ref: str) -> Container:
        """The container ``ref`` names (id or name). :raises NotFound: none does."""
        self._check_open()
        return self._to_container(self._resolve_container(ref))

    def containers(self) -> list[Container]:
        """Every container, oldest first."""
        self._check_open()
        return [self._to_container(r) for r in self._graph.all_containers()]

    def remove_container(self, ref: str, *, force: bool = False) -> None:
        """Remove a container and its layer.

        :param force: unmount the container's layer first, however often it is mounted.
        :raises FailedPrecondition: its layer is mounted (and not ``force``).
        """
        self._check_open()
        with self._lock.held():
            row = self._resolve_container(ref)
            layer = self._resolve(row["layer"])
            self._reconcile_row(layer)
            if self._resolve(row["layer"]).mount_count:
                if not force:
                    raise FailedPrecondition(
                        f"cannot remove container {ref!r}: its layer is mounted"
                    )
                self.unmount(layer.id, force=True)
            with self._graph.transaction():
                self._graph.delete_container(row["id"])
            self.remove_layer(layer.id)

    def mount_container(self, ref: str) -> Path:
        """Mount container ``ref``'s writable root and return where (counted, as
        :meth:`mount`: each mount needs an :meth:`unmount_container`).

        :raises NotFound: no container ``ref``.
        """
        self._check_open()
        return self.mount(self._resolve_container(ref)["layer"])

    def unmount_container(self, ref: str, *, force: bool = False) -> None:
        """Drop one mount of container ``ref``; the last one unmounts. ``force`` drops all.

        :raises FailedPrecondition: it is not mounted (and not ``force``).
        """
        self._check_open()
        with self._lock.held():
            layer = self._resolve(self._resolve_container(ref)["layer"])
            self._reconcile_row(layer)
            if force and not self._resolve(layer.id).mount_count:
                return  # nothing to drop (and no mount point to remove)
            self.unmount(layer.id, force=force)

    def container_changes(self, ref: str) -> list[Change]:
        """What container ``ref`` changed against its image, sorted by path (mounted or not).

        As ``docker diff`` lists them: every directory above a change is listed as modified
        too, whichever driver found the changes (:func:`laminae._containers.with_parent_dirs`).
        """
        from ._containers import with_parent_dirs

        self._check_open()
        return with_parent_dirs(self.changes(self._resolve_container(ref)["layer"]))

    def export_container(
        self, ref: str, out: BinaryIO, *, compression: Compression = Compression.NONE
    ) -> DiffResult:
        """Write container ``ref``'s changes to ``out`` as an OCI layer tar, compressed as
        asked (``docker export`` writes the whole tree; this writes the layer, as
        :meth:`diff` does)."""
        self._check_open()
        return self.diff(self._resolve_container(ref)["layer"], out, compression=compression)

    def commit_container(
        self,
        ref: str,
        name: str | None = None,
        *,
        message: str | None = None,
        author: str | None = None,
    ) -> Image:
        """Commit container ``ref``'s changes as a new layer and a new image (``docker commit``).

        The container keeps its layer and may stay mounted; the parent image is untouched.
        The new image's config is the parent's with one more DiffID and history entry
        (``comment`` is ``message``); see :mod:`laminae._containers`.

        :param name: the new image's name (``x`` is ``x:latest``), moved from another image
            that had it.
        :raises NotFound: no container ``ref``.
        :raises InvalidArgument: ``name`` is no valid image name.
        """
        from ._containers import commit_container

        self._check_open()
        return commit_container(self, ref, name, message=message, author=author)

    def container_config(self, ref: str) -> ImageConfig | None:
        """The config of container ``ref``'s image (Env, Cmd, WorkingDir... for a bundle);
        ``None`` when it has no image or the image no config.

        :raises NotFound: no container ``ref``.
        """
        from ._containers import image_config

        self._check_open()
        image = self._resolve_container(ref)["image"]
        return None if image is None else image_config(self.image(image))


class _Discard(io.RawIOBase):
    """A sink for bytes that only need hashing."""

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)


def _drain(stream: BinaryIO) -> None:
    while stream.read(1 << 20):
        pass


def _is_name(ref: str) -> bool:
    try:
        local_name(ref)
    except InvalidArgument:
        return False
    return True


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
