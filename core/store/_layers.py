"""The layer store: one root, one driver, one graph, and the bookkeeping drivers never do.

The data path reads top to bottom: a tar is opened and decompressed, a layer is created and
marked *incomplete*, the driver applies the tar, the DiffID is verified, and the layer is
committed under its ChainID in one transaction. Nothing else ever clears the incomplete mark,
so a layer is either complete and verified or, after the next open, gone.

Concurrency: the graph is SQLite in WAL mode, so readers never wait. Every change to the graph
happens while the store lock (``flock`` on ``<root>/laminae.lock``) is held. Long filesystem
work (applying a tar, copying a parent) runs outside the store lock, under a per-layer lock
file that tells another process's cleanup "this incomplete layer is still being written".

:class:`LayerStore` is the public face; the work is done by the parts it is made of, one
module each: :mod:`._staging` (a layer in and out: the interface the image and container
pipelines get too), :mod:`._mounts` (mount counts and the kernel's table),
:mod:`._recovery` (check, repair and the sweep at open) and :mod:`._lookup` (references to
records).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, BinaryIO, Self, cast

from laminae._exceptions import (
    CorruptLayer,
    DriverUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unsupported,
    map_os_errors,
)
from laminae.archive._changes import Change
from laminae.archive._compression import (
    Compression,
    DigestReader,
    DigestWriter,
    open_compressor,
    open_decompressed,
    sniff_compression,
)
from laminae.archive._limits import Limits
from laminae.driverkit._contract import (
    Capabilities,
    Driver,
    Feature,
    MountSpec,
    QuotaSetter,
    Usage,
)
from laminae.driverkit._mount import mount_all, unmount_all
from laminae.driverkit._plugins import DriverEntry, find_drivers
from laminae.kernel import _filesystems
from laminae.kernel._locks import StoreLock
from laminae.store._graph import Graph, LayerRow
from laminae.store._lookup import layer_record, parent_storage_ids, resolve_layer
from laminae.store._mounts import Mounts, claim_runroot
from laminae.store._records import (
    CheckReport,
    DiffResult,
    Layer,
    LayerKind,
    StoreInfo,
    check_digest,
    check_key,
    check_labels,
)
from laminae.store._recovery import Recovery
from laminae.store._staging import Staging, add_names_labels

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

    :class:`~laminae.Store` adds images (:mod:`laminae.images._store`) and containers
    (:mod:`laminae.containers._store`) on top.
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
        graph_path = root / "graph.db"
        # An empty file is what SQLite takes for a new database, so it is as new as none.
        try:
            with map_os_errors(f"open graph {graph_path}"):
                new_graph = not graph_path.exists() or graph_path.stat().st_size == 0
            self._graph = Graph(graph_path)
        except BaseException:
            self._lock.close()
            raise
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
                claim_runroot(runroot, root, self._graph.store_id)
                home = root / entry.name
                with map_os_errors(f"create driver home {home}"):
                    home.mkdir(mode=0o700, exist_ok=True)
                    (root / "locks").mkdir(mode=0o700, exist_ok=True)
                self._entry = entry
                self.driver: Driver = entry.cls(home, options.get(entry.name, {}))
                if new_graph:
                    self._refuse_lost_graph(graph_path, home)
                if recorded is None:
                    with self._graph.transaction():
                        self._graph.set_meta("driver", entry.name)
                self._mounts = Mounts(runroot, self._graph, self._lock, self.driver)
                self._staging = Staging(
                    root, self._graph, self._lock, self.driver, entry, limits, self._mounts
                )
                self._recovery = Recovery(
                    root,
                    self._graph,
                    self._lock,
                    self.driver,
                    entry.name,
                    self._mounts,
                    self._staging,
                )
                self._recovery.sweep()
        except BaseException:
            if new_graph:
                self._forget_new_graph(graph_path)
            self._graph.close()
            self._lock.close()
            raise

    def _refuse_lost_graph(self, graph_path: Path, home: Path) -> None:
        """Refuse to open as new a store whose graph is gone but whose layers are not.

        Opened as new, its layers would be orphans to :meth:`check`, and :meth:`repair` would
        delete every one of them. Tar-split records count too: they outlive any driver.

        :raises FailedPrecondition: the driver home holds layers or tar-split records remain.
        """
        with map_os_errors(f"list layers in {home}"):
            layers = sum(1 for _ in self.driver.layers())
            records = sum(1 for _ in (self.root / "tar-split").glob("*.tsz"))
        if layers or records:
            with contextlib.suppress(Exception):
                self.driver.close()
            raise FailedPrecondition(
                f"store {self.root}: {graph_path} is missing or empty, but {home} holds "
                f"{layers} layer(s) and {self.root / 'tar-split'} {records} tar-split "
                "record(s); refusing to open it as a new store, whose repair would delete "
                f"them. Restore {graph_path} from a backup, or, to start afresh and lose the "
                f"layers, remove {home} and {self.root / 'tar-split'}"
            )

    def _forget_new_graph(self, path: Path) -> None:
        """Remove the graph this failed open created, so that a mistake (an unknown driver, an
        unusable run directory) leaves no empty store behind to be taken for a real one.

        Only under the lock, and only while no driver is recorded: a store that another
        process opened meanwhile records its driver first and is kept.
        """
        with contextlib.suppress(Exception), self._lock.held():
            if self._graph.meta("driver") is None:
                self._graph.close()
                for suffix in ("", "-wal", "-shm", "-journal"):
                    path.with_name(path.name + suffix).unlink(missing_ok=True)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def driver_name(self) -> str:
        return self._entry.name

    @property
    def capabilities(self) -> Capabilities:
        return self._entry.capabilities

    @property
    def driver_home(self) -> Path:
        return self.root / self.driver_name

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

    def layer(self, ref: str) -> Layer:
        """The layer ``ref`` names: an id, a unique id prefix, or a name.

        :raises NotFound: nothing matches.
        :raises InvalidArgument: ``ref`` is malformed or ambiguous.
        """
        self._check_open()
        return layer_record(self._graph, resolve_layer(self._graph, ref))

    def layers(self, *, kind: LayerKind | None = None) -> list[Layer]:
        """Every complete layer (of ``kind``), oldest first."""
        self._check_open()
        rows = self._graph.all_layers(None if kind is None else LayerKind(kind).value)
        return [layer_record(self._graph, r) for r in rows if not r.incomplete]

    # -- creating layers -------------------------------------------------------------------

    def _committed_parent(self, parent: str | None) -> LayerRow | None:
        return None if parent is None else self._staging.committed_parent(parent)

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
            self._staging.stage(parent_row, key=key, kind=kind),
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
                open_decompressed(
                    compressed or source,
                    max_bytes=self.limits.max_bytes,
                    max_ratio=self.limits.max_compression_ratio,
                    ratio_floor=self.limits.compression_ratio_floor_bytes,
                )
            )
            with self._staging.stage(parent_row) as staged:
                with self._staging.recording(staged, plain) as recorded:
                    self._staging.apply(staged, recorded)
                _drain(plain)
                if compressed is not None:
                    _drain(compressed)
                blob_digest = plain.digest if compressed is None else compressed.digest
                if digest is not None and blob_digest != digest:
                    raise CorruptLayer(f"layer tar: digest is {blob_digest}, expected {digest}")
                if diff_id is not None and plain.digest != diff_id:
                    raise CorruptLayer(f"layer tar: DiffID is {plain.digest}, expected {diff_id}")
                new_id = self._staging.commit(
                    staged.row,
                    parent_row,
                    plain.digest,
                    plain.size,
                    None if compressed is None else compressed.digest,
                    names,
                    checked,
                )
                return self.layer(new_id)
        raise AssertionError("unreachable")  # pragma: no cover

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
        row = resolve_layer(self._graph, key)
        if row.kind != LayerKind.ACTIVE.value:
            raise FailedPrecondition(f"layer {key!r}: is {row.kind}; only active layers commit")
        if self._graph.containers_using(layer=row.id):
            raise FailedPrecondition(f"layer {key!r}: belongs to a container")
        self._mounts.reconcile()
        row = resolve_layer(self._graph, key)
        if row.mount_count:
            raise FailedPrecondition(f"layer {key!r}: is mounted ({row.mount_count}); unmount it")
        sink = DigestWriter()
        self._staging.write_diff(row, sink)
        parent = None if row.parent is None else self._graph.layer(row.parent)
        new_id = self._staging.commit(row, parent, sink.digest, sink.size, None, names, checked)
        return self.layer(new_id)

    # -- reading layers --------------------------------------------------------------------

    def changes(self, ref: str) -> list[Change]:
        """The changes of layer ``ref`` against its parent, sorted by path."""
        self._check_open()
        row = resolve_layer(self._graph, ref)
        with self._staging.changes(row) as (changes, _):
            return list(changes)

    def diff(
        self, ref: str, out: BinaryIO, *, compression: Compression = Compression.NONE
    ) -> DiffResult:
        """Write the OCI layer tar of ``ref``'s changes to ``out``, compressed as asked.

        The tar is written from the changes as the driver reports them, so for a layer
        applied from a tar it may differ from that tar (order, header fields): its DiffID is
        in the result. :meth:`export_layer` writes a committed layer's own tar.
        """
        self._check_open()
        row = resolve_layer(self._graph, ref)
        return self._write_compressed(
            out, compression, lambda plain: self._staging.write_diff(row, plain)
        )

    def export_layer(
        self, ref: str, out: BinaryIO, *, compression: Compression = Compression.NONE
    ) -> DiffResult:
        """Write committed layer ``ref``'s own tar to ``out``, compressed as asked: the very
        tar it was applied from (replayed from its tar-split record), or for a layer committed
        from an active one its diff, checked to have the layer's DiffID.

        :raises FailedPrecondition: ``ref`` is not committed.
        :raises CorruptLayer: its files no longer give its DiffID (changed on disk, or a tar
            whose entries replaced each other, which its files cannot give back); raised at
            the end, so ``out`` then holds a tar to throw away.
        """
        self._check_open()
        row = resolve_layer(self._graph, ref)
        return self._write_compressed(
            out, compression, lambda plain: self._staging.write_layer_tar(row.id, plain)
        )

    @staticmethod
    def _write_compressed(
        out: BinaryIO, compression: Compression, write: Callable[[BinaryIO], None]
    ) -> DiffResult:
        compression = Compression(compression)
        written = DigestWriter(out)
        compressor = open_compressor(written, compression)
        plain = DigestWriter(compressor)
        write(cast(BinaryIO, plain))
        compressor.close()
        return DiffResult(plain.digest, written.digest, written.size, compression)

    def usage(self, ref: str) -> Usage:
        """Disk used by layer ``ref`` itself, parents excluded."""
        self._check_open()
        row = resolve_layer(self._graph, ref)
        with map_os_errors(f"usage of layer {ref!r}"):
            return self.driver.usage(row.storage_id)

    def set_quota(self, ref: str, size: int) -> None:
        """Limit the writable layer ``ref`` to ``size`` bytes.

        :raises Unsupported: the driver has no quota support.
        """
        self._check_open()
        row = resolve_layer(self._graph, ref)
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
            row = resolve_layer(self._graph, ref)
            with self._graph.transaction():
                self._graph.set_labels(row.id, checked)
                self._graph.update_layer(row.id)
        return self.layer(row.id)

    def add_names(self, ref: str, names: Sequence[str]) -> Layer:
        """Give ``ref`` more names. :raises AlreadyExists: a name belongs to another layer."""
        self._check_open()
        checked = [check_key("layer name", n) for n in names]
        with self._lock.held():
            row = resolve_layer(self._graph, ref)
            with self._graph.transaction():
                add_names_labels(self._graph, row.id, checked, {}, replace_labels=False)
                self._graph.update_layer(row.id)
        return self.layer(row.id)

    def remove_names(self, ref: str, names: Sequence[str]) -> Layer:
        """Take ``names`` away from ``ref``. :raises NotFound: one of them is not ``ref``'s."""
        self._check_open()
        with self._lock.held():
            row = resolve_layer(self._graph, ref)
            with self._graph.transaction():
                for name in names:
                    if self._graph.layer_for_name(name) != row.id:
                        raise NotFound(f"layer name {name!r}: not a name of layer {row.id}")
                    self._graph.remove_name(name)
                self._graph.update_layer(row.id)
        return self.layer(row.id)

    # -- mounts ----------------------------------------------------------------------------

    def mount(self, ref: str, *, readonly: bool = False) -> Path:
        """Mount layer ``ref`` and return where. Counted: each mount needs an unmount.

        Committed layers and views always mount read-only. The first mount decides the
        mode; later ones share it.
        """
        self._check_open()
        with self._lock.held():
            row = resolve_layer(self._graph, ref)
            self._mounts.reconcile_row(row)
            row = resolve_layer(self._graph, ref)
            target = self._mounts.target(row)
            if row.mount_count == 0:
                readonly = readonly or row.kind != LayerKind.ACTIVE.value
                parents = parent_storage_ids(self._graph, row)
                with map_os_errors(f"describe mounts of layer {ref!r}"):
                    specs = self.driver.mounts(row.storage_id, parents, readonly)
                mount_all(specs, target)
            with self._graph.transaction():
                self._graph.update_layer(
                    row.id, mount_count=row.mount_count + 1, mount_point=str(target)
                )
        return target

    def mount_specs(self, ref: str, *, readonly: bool = False) -> list[MountSpec]:
        """How to mount layer ``ref``, for a caller that performs the mounts itself (a
        containerd snapshotter returns them to containerd): nothing is mounted or counted.

        Committed layers and views are always described read-only. The store cannot see
        where the caller mounts, so the caller keeps its own count and unmounts before it
        commits or removes the layer. A writable description of a layer the store has
        mounted itself is refused: two writers on one layer corrupt it.

        :raises FailedPrecondition: ``readonly`` is false and the store has ``ref`` mounted.
        """
        self._check_open()
        with self._lock.held():
            row = resolve_layer(self._graph, ref)
            readonly = readonly or row.kind != LayerKind.ACTIVE.value
            if not readonly and row.mount_count and not self._mounts.reconcile_row(row):
                raise FailedPrecondition(
                    f"layer {ref!r}: is mounted by the store ({row.mount_count}); unmount it "
                    "before describing a writable mount"
                )
            parents = parent_storage_ids(self._graph, row)
            with map_os_errors(f"describe mounts of layer {ref!r}"):
                return list(self.driver.mounts(row.storage_id, parents, readonly))

    def unmount(self, ref: str, *, force: bool = False) -> None:
        """Drop one mount of ``ref``; the last one unmounts. ``force`` drops them all.

        :raises FailedPrecondition: ``ref`` is not mounted.
        """
        self._check_open()
        with self._lock.held():
            row = resolve_layer(self._graph, ref)
            self._mounts.reconcile_row(row)
            row = resolve_layer(self._graph, ref)
            if row.mount_count == 0 and not force:
                raise FailedPrecondition(f"layer {ref!r}: is not mounted")
            count = 0 if force else row.mount_count - 1
            if count == 0:
                unmount_all(self._mounts.target(row))
            with self._graph.transaction():
                self._graph.update_layer(
                    row.id, mount_count=count, mount_point=row.mount_point if count else None
                )

    # -- removing --------------------------------------------------------------------------

    def remove_layer(self, ref: str) -> None:
        """Remove layer ``ref`` and its storage.

        :raises FailedPrecondition: it has children, is mounted, or an image or container
            uses it.
        """
        self._check_open()
        with self._lock.held():
            row = resolve_layer(self._graph, ref)
            self._mounts.reconcile_row(row)
            row = resolve_layer(self._graph, ref)
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
            self._staging.remove(row)

    # -- check and repair ------------------------------------------------------------------

    def check(self, *, content: bool = False) -> CheckReport:
        """Compare the graph with the driver's disk and the kernel's mounts; change nothing.

        :param content: also re-derive each committed layer's DiffID from its files and
            report every layer whose files changed (reads every layer).
        """
        self._check_open()
        return self._recovery.check(content=content)

    def repair(self, report: CheckReport | None = None, *, force: bool = False) -> CheckReport:
        """Fix what :meth:`check` finds (or what ``report`` lists); return what was fixed.

        Layers whose storage is missing are removed from the graph with everything above
        them and the images and containers using them (listed in the result's
        ``dependents``); stale incomplete layers are removed; interrupted operations are
        finished; orphan mounts are unmounted; stale counts are reset; orphan tar-split
        records are deleted.

        :param force: also remove orphan storage and unreferenced layers, which are
            otherwise kept (and listed in the result's ``kept``).
        """
        self._check_open()
        return self._recovery.repair(report or self._recovery.check(), force=force)


def _drain(stream: BinaryIO) -> None:
    while stream.read(1 << 20):
        pass


def _backing_fs(path: Path) -> str:
    names = {
        _filesystems.EXT4_SUPER_MAGIC: "ext4",
        _filesystems.BTRFS_SUPER_MAGIC: "btrfs",
        _filesystems.TMPFS_MAGIC: "tmpfs",
        _filesystems.OVERLAYFS_SUPER_MAGIC: "overlay",
        0x58465342: "xfs",
    }
    try:
        magic = _filesystems.statfs_type(str(path))
    except OSError:
        return "unknown"
    return names.get(magic, hex(magic))
