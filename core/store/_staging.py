"""Staging: how a layer comes into a store, and how it goes back out as the very tar it was.

:class:`Staging` is the one interface through which the pipelines outside the store layer
(the image import and export of :mod:`laminae.images._transfer`, a container's commit) change
a store or read its layers back; they never reach into the store's graph or driver. The layer
store builds its own :meth:`~laminae.Store.apply_layer` and
:meth:`~laminae.Store.commit_layer` on it too: each is a pipeline of one layer.

The life of a staged layer::

    stage       an incomplete row and the driver's storage on a parent (committed, or
                staged itself), claimed by this process through a per-layer lock file
    record      the tar passes through a recorder of its exact bytes (its tar-split)
    apply       the driver writes the tar's files: on the parents' files, or detached
                (without them) and settled onto them later
    commit      the row takes its ChainID as its id and stops being incomplete, in one
                transaction; an equal layer committed meanwhile wins, and the copy goes

Nothing but a commit clears the incomplete mark. An error inside :meth:`Staging.stage`'s
block removes the layer; a process killed in the middle leaves a layer whose claim the kernel
has dropped, and the next open of the store removes it (:mod:`laminae.store._recovery`).

Going out, :meth:`Staging.write_layer_tar` replays the record against the layer's files, so an
exported layer has the DiffID it came in with.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, final

import attrs

from laminae._exceptions import (
    AlreadyExists,
    CorruptLayer,
    FailedPrecondition,
    LaminaeError,
    NotFound,
    map_os_errors,
)
from laminae.archive._apply import apply_tar
from laminae.archive._changes import Change, naive_changes
from laminae.archive._compression import DigestWriter
from laminae.archive._limits import Limits
from laminae.archive._write import write_changes_tar
from laminae.driverkit._contract import (
    Applier,
    Capabilities,
    ChangeReporter,
    Committer,
    DetachedApplier,
    Driver,
    Feature,
)
from laminae.driverkit._plugins import DriverEntry
from laminae.kernel import _filesystems
from laminae.kernel._locks import StoreLock, claim
from laminae.store._graph import Graph, LayerRow, now
from laminae.store._lookup import (
    image_layers,
    image_record,
    parent_storage_ids,
    resolve_image,
    resolve_layer,
)
from laminae.store._mounts import Mounts
from laminae.store._records import Image, Layer, LayerKind, chain_id

__all__ = [
    "StagedLayer",
    "Staging",
    "VerifiedLayer",
    "add_names_labels",
    "layer_lock_path",
    "pending_lock_path",
    "tar_split_path",
]


def tar_split_path(root: Path, storage_id: str) -> Path:
    """Where the tar-split record of the layer stored as ``storage_id`` is kept."""
    return root / "tar-split" / f"{storage_id}.tsz"


def pending_lock_path(root: Path, pending_id: str) -> Path:
    """The claim of a live process on its journal entry (see :meth:`Staging.collecting`)."""
    return root / "locks" / f"pending-{pending_id}.lock"


def layer_lock_path(root: Path, storage_id: str) -> Path:
    """The lock file a process holds while the layer stored as ``storage_id`` is its to write."""
    return root / "locks" / f"{storage_id}.lock"


def add_names_labels(
    graph: Graph,
    layer_id: str,
    names: Sequence[str],
    labels: Mapping[str, str],
    *,
    replace_labels: bool,
) -> None:
    """Give layer ``layer_id`` ``names`` and ``labels`` (in the caller's transaction).

    :param replace_labels: replace every label, rather than add to them.
    :raises AlreadyExists: a name belongs to another layer.
    """
    for name in names:
        owner = graph.layer_for_name(name)
        if owner == layer_id:
            continue
        if owner is not None:
            raise AlreadyExists(f"layer name {name!r}: already names layer {owner}")
        graph.add_name(layer_id, name)
    if replace_labels:
        graph.set_labels(layer_id, labels)
    elif labels:
        graph.set_labels(layer_id, {**graph.labels(layer_id), **labels})


@attrs.frozen
class StagedLayer:
    """An incomplete layer this process is writing: its row, and its parents' storage ids
    (immediate parent first), as :meth:`Staging.stage` made them."""

    row: LayerRow
    parents: tuple[str, ...]


@attrs.frozen
class VerifiedLayer:
    """A staged layer whose tar is applied and checked: what :meth:`Staging.commit_image`
    commits.

    :param diff_id: the digest of the uncompressed tar, checked against the image's config.
    :param size: the size of the uncompressed tar.
    :param digest: the digest of the blob as it came (compressed).
    """

    staged: StagedLayer
    diff_id: str
    size: int
    digest: str | None


@final
class Staging:
    """The layers of one store as the pipelines see them; see the module docstring.

    The store makes one when it opens and hands it down; nothing else makes one. Who calls
    what::

        image import    has_committed, committed_parent, stage, recording, apply (or
                        apply_detached, then settle; reset when it needs the parents),
                        commit_image, scratch for its spool files
        image export    image, image_layers, write_layer_tar, scratch
        the store       stage, recording, apply, commit (apply_layer, commit_layer),
                        changes and write_diff (diff), remove, collect and locked
                        (remove_image; undoing a container commit's layer)

    Importing one layer (what :meth:`laminae.Store.apply_layer` does)::

        parent = staging.committed_parent(ref)  # or None for a base layer
        with staging.stage(parent) as staged:
            with staging.recording(staged, tar) as recorded:
                staging.apply(staged, recorded)
            ...  # check the digest and the DiffID; an error here removes the layer
            layer_id = staging.commit(staged.row, parent, diff_id, size, digest, names, labels)

    :param root: the store's root directory.
    :param graph: the store's graph.
    :param lock: the store lock, taken for every change to the graph.
    :param driver: the store's driver.
    :param entry: the driver's entry (its name and capabilities).
    :param limits: the bounds every tar is applied within.
    :param mounts: the store's mounts, for the private mounts that reading and writing use.
    """

    __slots__ = ("_driver", "_entry", "_graph", "_lock", "_mounts", "limits", "root")

    def __init__(
        self,
        root: Path,
        graph: Graph,
        lock: StoreLock,
        driver: Driver,
        entry: DriverEntry,
        limits: Limits,
        mounts: Mounts,
    ) -> None:
        self.root = root
        self.limits = limits
        self._graph = graph
        self._lock = lock
        self._driver = driver
        self._entry = entry
        self._mounts = mounts

    @property
    def capabilities(self) -> Capabilities:
        """What the store's driver can do (:attr:`Feature.APPLY_DETACHED` decides how an
        import applies its layers)."""
        return self._entry.capabilities

    # -- bringing a layer in -----------------------------------------------------------------

    def has_committed(self, layer_id: str) -> bool:
        """Whether the committed layer ``layer_id`` (an id, not a name) is in the store."""
        row = self._graph.layer(layer_id)
        return row is not None and not row.incomplete and row.kind == LayerKind.COMMITTED.value

    def committed_parent(self, ref: str) -> LayerRow:
        """The committed layer ``ref``, checked to be one a new layer may be staged on.

        :raises NotFound: no layer ``ref``.
        :raises FailedPrecondition: it is not committed, or a child would be deeper than the
            driver supports.
        """
        row = resolve_layer(self._graph, ref)
        if row.kind != LayerKind.COMMITTED.value:
            raise FailedPrecondition(
                f"parent {ref!r}: is a{'n' if row.kind == 'active' else ''} {row.kind} layer; "
                "only committed layers can have children"
            )
        depth = row.depth + 1
        if depth > self.capabilities.max_depth:
            raise FailedPrecondition(
                f"parent {ref!r}: a child would have {depth} parents; driver "
                f"{self._entry.name!r} supports at most {self.capabilities.max_depth}"
            )
        return row

    @contextlib.contextmanager
    def stage(
        self,
        parent: LayerRow | None,
        *,
        key: str | None = None,
        kind: LayerKind = LayerKind.ACTIVE,
    ) -> Iterator[StagedLayer]:
        """An incomplete layer on ``parent`` (committed, or staged itself), claimed by us.

        The per-layer lock is held for the whole block: while it is, no other process's
        cleanup takes this incomplete layer for a crashed one. On an error in the block the
        layer and its storage go; after a normal exit the caller has committed it (or
        marked it complete itself), else the next open of the store removes it.

        :param key: the layer's id until it is committed; a random ``incomplete-`` one by
            default.
        :param kind: a view's storage is made read-only.
        :raises AlreadyExists: ``key`` is taken.
        :raises FailedPrecondition: a child of ``parent`` would be deeper than the driver
            supports.
        """
        if parent is not None and parent.depth + 1 > self.capabilities.max_depth:
            raise FailedPrecondition(
                f"layer {parent.id!r}: a child would have {parent.depth + 1} parents; driver "
                f"{self._entry.name!r} supports at most {self.capabilities.max_depth}"
            )
        key = f"incomplete-{secrets.token_hex(16)}" if key is None else key
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
        with claim(layer_lock_path(self.root, storage_id)):
            created = False
            try:
                with self._lock.held(), self._graph.transaction():
                    if self._graph.layer(key) is not None or self._graph.layer_for_name(key):
                        raise AlreadyExists(f"layer {key!r}: already exists")
                    if parent is not None and self._graph.layer(parent.id) is None:
                        raise NotFound(f"layer {parent.id!r}: removed while in use")
                    self._graph.insert_layer(row)
                parents = () if parent is None else (parent.storage_id, *self._parents(parent))
                with map_os_errors(f"create layer {key!r} in driver {self._entry.name}"):
                    self._driver.create(storage_id, parents, kind is not LayerKind.VIEW)
                created = True
                yield StagedLayer(row, parents)
            except BaseException:
                with self._lock.held():
                    # Also when create itself failed: it may have written part of the layer
                    # (a timed-out copy, a full disk), and no one else knows the id.
                    if created or storage_id in set(self._list_storage()):
                        with contextlib.suppress(LaminaeError, OSError):
                            self._driver.remove(storage_id)
                    tar_split_path(self.root, storage_id).unlink(missing_ok=True)
                    with self._graph.transaction():
                        current = self._graph.layer_by_storage(storage_id)
                        if current is not None:
                            self._graph.delete_layer(current.id)
                raise

    def _list_storage(self) -> list[str]:
        with contextlib.suppress(LaminaeError, OSError):
            return list(self._driver.layers())
        return []

    @contextlib.contextmanager
    def recording(self, staged: StagedLayer, tar: BinaryIO) -> Iterator[BinaryIO]:
        """``tar``, passed through a recorder of its exact bytes
        (:mod:`laminae.archive._tarsplit`), to be applied onto ``staged``.

        The record lets :meth:`write_layer_tar` give back the very tar that was applied, so
        an exported image keeps its DiffIDs and its config (containers/storage and Moby keep
        tar-split data for the same reason).
        """
        # Imported here: a store that only reads never loads the recorder.
        from laminae.archive._tarsplit import TarSplitRecorder

        row = staged.row
        path = tar_split_path(self.root, row.storage_id)
        with map_os_errors(f"record tar-split of layer {row.id!r}"):
            path.parent.mkdir(mode=0o700, exist_ok=True)
            out = open(path, "wb")  # noqa: SIM115 (closed below, and unlinked on error)
        try:
            try:
                recorder = TarSplitRecorder(tar, out, self.limits)
                yield recorder
                # Finishing and closing write the rest of the record: on a full store root
                # that fails, and must say so as a laminae error.
                with map_os_errors(f"record tar-split of layer {row.id!r}"):
                    while recorder.read(1 << 20):  # the applier may stop at the end blocks
                        pass
                    recorder.finish()
                    out.close()
            finally:
                if not out.closed:
                    # Already failing: the record is unlinked below, and a flush error of
                    # a full disk would only hide the error that says what happened.
                    with contextlib.suppress(OSError):
                        out.close()
            if not recorder.exact:
                # A later entry replaced a file an earlier one referenced: the files cannot
                # give the tar back, so keep no record (export then diffs, and checks).
                path.unlink()
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def apply(self, staged: StagedLayer, tar: BinaryIO) -> None:
        """Apply ``tar``, which passes through :meth:`recording`, onto ``staged`` and its
        parents' files."""
        row = staged.row
        what = f"apply layer tar onto {row.id!r}"
        if Feature.APPLY in self.capabilities.features:
            assert isinstance(self._driver, Applier)
            with map_os_errors(what):
                self._driver.apply(row.storage_id, staged.parents, tar, self.limits)
            return
        with (
            self._mounts.materialized(row, staged.parents, readonly=False) as path,
            map_os_errors(what),
        ):
            apply_tar(path, tar, limits=self.limits)

    def apply_detached(self, staged: StagedLayer, tar: BinaryIO) -> object:
        """Apply ``tar`` (passing through :meth:`recording`) onto ``staged`` without its
        parents' files, where the driver declares :attr:`Feature.APPLY_DETACHED`.

        :returns: what :meth:`settle` needs.
        :raises ParentsNeeded: the tar needs the parents' files; :meth:`reset` the layer and
            :meth:`apply` it once they are there.
        """
        assert isinstance(self._driver, DetachedApplier)
        with map_os_errors(f"apply layer tar onto {staged.row.id!r}"):
            return self._driver.apply_detached(staged.row.storage_id, tar, self.limits)

    def settle(self, staged: StagedLayer, pending: object) -> None:
        """Settle a detached apply onto the parents, once every parent is applied.

        :raises ParentsNeeded: as for :meth:`apply_detached`.
        """
        assert isinstance(self._driver, DetachedApplier)
        with map_os_errors(f"settle layer {staged.row.id!r} on its parents"):
            self._driver.settle(staged.row.storage_id, staged.parents, pending)

    def reset(self, staged: StagedLayer) -> None:
        """Empty ``staged`` again (storage and record), for a second apply."""
        with map_os_errors(f"reset staged layer {staged.row.id!r}"):
            self._driver.remove(staged.row.storage_id)
            self._driver.create(staged.row.storage_id, staged.parents, True)
        tar_split_path(self.root, staged.row.storage_id).unlink(missing_ok=True)

    def commit(
        self,
        row: LayerRow,
        parent: LayerRow | None,
        diff_id: str,
        size: int,
        digest: str | None,
        names: Sequence[str],
        labels: Mapping[str, str],
    ) -> str:
        """Make ``row`` (staged, or an active layer) the committed layer with its ChainID, or
        merge it into an existing one (which then gets ``names`` and ``labels`` added).

        :param parent: the committed layer ``row`` is on.
        :returns: the committed layer's id.
        :raises AlreadyExists: a name belongs to another layer.
        """
        self._sync()
        new_id = diff_id if parent is None else chain_id([parent.id, diff_id])
        with self._lock.held():
            existing = self._graph.layer(new_id)
            if existing is not None and not existing.incomplete:
                with self._graph.transaction():
                    self._graph.update_layer(row.id, incomplete=True)
                with map_os_errors(f"remove duplicate of layer {new_id}"):
                    self._driver.remove(row.storage_id)
                    tar_split_path(self.root, row.storage_id).unlink(missing_ok=True)
                with self._graph.transaction():
                    self._graph.delete_layer(row.id)
                    add_names_labels(self._graph, new_id, names, labels, replace_labels=False)
                return new_id
            for name in names:
                owner = self._graph.layer_for_name(name)
                if owner is not None:
                    raise AlreadyExists(f"layer name {name!r}: already names layer {owner}")
            self._commit_in_driver(row, new_id)
            with self._graph.transaction():
                self._mark_committed(row, new_id, diff_id, size, digest)
                add_names_labels(self._graph, new_id, names, labels, replace_labels=True)
        return new_id

    def commit_image(
        self,
        layers: Sequence[VerifiedLayer],
        base: str | None,
        *,
        image_id: str,
        manifest_digest: str | None,
        config: bytes,
        manifest: bytes | None,
        names: Sequence[str],
    ) -> Image:
        """Commit every staged layer (base first) and record the image, in one transaction.

        A layer that another process committed meanwhile is kept, and the staged copy
        dropped; ChainIDs are equal, so its content is too. An image already recorded under
        ``image_id`` is kept, and gets ``names``.

        :param layers: the staged layers, base first, each on the one before.
        :param base: the committed layer the first of ``layers`` is on.
        :param image_id: the image's id, the digest of ``config``.
        """
        self._sync()
        duplicates: list[str] = []
        with self._lock.held():
            parent = base
            for layer in layers:
                new_id = layer.diff_id if parent is None else chain_id([parent, layer.diff_id])
                if not self.has_committed(new_id):
                    self._commit_in_driver(layer.staged.row, new_id)
                parent = new_id
            with self._graph.transaction():
                parent = base
                for layer in layers:
                    row = layer.staged.row
                    new_id = layer.diff_id if parent is None else chain_id([parent, layer.diff_id])
                    if self.has_committed(new_id):
                        for child in self._graph.children(row.id):
                            self._graph.update_layer(child, parent=new_id)
                        self._graph.delete_layer(row.id)
                        duplicates.append(row.storage_id)
                    else:
                        self._mark_committed(row, new_id, layer.diff_id, layer.size, layer.digest)
                    parent = new_id
                if self._graph.image(image_id) is None:
                    self._graph.insert_image(image_id, parent, manifest_digest, config, manifest)
                for name in names:
                    self._graph.add_image_name(image_id, name)
        for storage_id in duplicates:
            with contextlib.suppress(LaminaeError, OSError):
                self._driver.remove(storage_id)
            tar_split_path(self.root, storage_id).unlink(missing_ok=True)
        return self.image(image_id)

    def _commit_in_driver(self, row: LayerRow, new_id: str) -> None:
        """Tell a driver that declares :attr:`Feature.COMMIT` that ``row`` is final."""
        if Feature.COMMIT in self.capabilities.features:
            assert isinstance(self._driver, Committer)
            with map_os_errors(f"commit layer {new_id} in driver {self._entry.name}"):
                self._driver.commit(row.storage_id)

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

    def _sync(self) -> None:
        """Flush the driver's filesystem before a layer counts as present (moby#36135)."""
        fd = os.open(self.root / self._entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _filesystems.syncfs(fd)
        finally:
            os.close(fd)

    # -- reading a layer back ----------------------------------------------------------------

    def image(self, ref: str) -> Image:
        """The image ``ref`` names, as :meth:`laminae.Store.image`.

        :raises NotFound: none does.
        """
        return image_record(self._graph, resolve_image(self._graph, ref))

    def image_layers(self, ref: str) -> list[Layer]:
        """The layers of image ``ref``, base first, as :meth:`laminae.Store.image_layers`."""
        return image_layers(self._graph, resolve_image(self._graph, ref))

    @contextlib.contextmanager
    def changes(self, row: LayerRow) -> Iterator[tuple[Iterator[Change], Path]]:
        """The change stream of ``row`` against its parent, and the layer's root to read
        content from, while both hold."""
        parents = self._parents(row)
        with contextlib.ExitStack() as stack:
            root = stack.enter_context(self._mounts.materialized(row, parents, readonly=True))
            if Feature.CHANGES in self.capabilities.features:
                assert isinstance(self._driver, ChangeReporter)
                with map_os_errors(f"changes of layer {row.id!r}"):
                    yield self._driver.changes(row.storage_id, parents), root
                return
            parent_root = None
            if row.parent is not None:
                parent_row = self._graph.layer(row.parent)
                assert parent_row is not None
                parent_root = stack.enter_context(
                    self._mounts.materialized(parent_row, parents[1:], readonly=True)
                )
            with map_os_errors(f"changes of layer {row.id!r}"):
                yield naive_changes(parent_root, root), root

    def write_diff(self, row: LayerRow, out: BinaryIO) -> None:
        """Write the OCI layer tar of ``row``'s changes against its parent to ``out``."""
        with self.changes(row) as (changes, root), map_os_errors(f"diff of layer {row.id!r}"):
            write_changes_tar(root, changes, out)

    def write_layer_tar(self, layer_id: str, out: BinaryIO) -> None:
        """Write committed layer ``layer_id``'s tar: the very bytes applied, when recorded,
        else its diff.

        The DiffID is known only at the end, so a caller that must not publish a wrong tar
        writes to a place it can throw away (the CLI's output file appears only on success;
        an image export's blobs are renamed into place only when verified).

        :raises FailedPrecondition: the layer is not committed.
        :raises CorruptLayer: the tar written does not have the layer's DiffID (its files
            changed on disk, or a layer without a record diffs differently).
        """
        row = resolve_layer(self._graph, layer_id)
        if row.kind != LayerKind.COMMITTED.value:
            raise FailedPrecondition(f"layer {layer_id!r}: is {row.kind}, not committed")
        try:
            found = self.layer_tar_digest(row, out)
        except CorruptLayer as exc:  # a file its tar-split record names is gone
            raise CorruptLayer(f"layer {row.id}: {exc}; refusing to export it") from exc
        if found != row.diff_id:
            raise CorruptLayer(
                f"layer {row.id}: its files give a tar with DiffID {found}, not its "
                f"DiffID {row.diff_id}; refusing to export it (`laminae check --content` "
                "lists every such layer)"
            )

    def layer_tar_digest(self, row: LayerRow, out: BinaryIO | None = None) -> str:
        """The DiffID that committed layer ``row``'s files give now, writing the tar to
        ``out`` if given: its tar-split record replayed against its files, else its diff."""
        # Imported here: a store that never exports never loads the replayer.
        from laminae.archive._tarsplit import replay_tar

        sink = DigestWriter(out)
        record = tar_split_path(self.root, row.storage_id)
        if record.exists():
            with (
                open(record, "rb") as recorded,
                self._mounts.materialized(row, self._parents(row), readonly=True) as root,
            ):
                replay_tar(recorded, root, sink)
        else:
            self.write_diff(row, sink)
        return sink.digest

    def _parents(self, row: LayerRow) -> list[str]:
        return parent_storage_ids(self._graph, row)

    # -- the store around a pipeline -----------------------------------------------------------

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
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

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """The store lock, held for the block (re-entrant within this process)."""
        return self._lock.held()

    def collect(self, layer_id: str | None) -> list[str]:
        """Remove ``layer_id`` and its parents, top down, while nothing else holds them: no
        child layer, image, container, layer name or mount. Call it with the store lock held.

        :returns: the ids of the layers removed.
        """
        removed: list[str] = []
        self._mounts.reconcile()
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
            self.remove(row)
            removed.append(layer_id)
            layer_id = row.parent
        return removed

    @contextlib.contextmanager
    def collecting(self, layer_id: str | None, operation: str) -> Iterator[None]:
        """Collect ``layer_id`` (:meth:`collect`) when the block ends, however it ends; and
        if this process dies first, at the next open of the store.

        The journal of the operations that take two steps, so that each completes or leaves
        nothing: removing an image (the image row goes, then its layers), creating, removing
        and committing a container (a layer is made or dropped, and a row says who holds it).
        Before the first step a ``pending`` row names the layer the operation may leave
        unheld, claimed by this process through a lock file; when the block ends the layer
        is collected, which removes it only if nothing holds it by then, and the row goes.
        A row whose claim the kernel dropped is a crash's: :mod:`laminae.store._recovery`
        collects its layer when the store next opens.

        :param layer_id: the layer to collect, and its parents; ``None`` journals nothing.
        :param operation: what is being done, for the journal's readers.
        """
        if layer_id is None:
            yield
            return
        pending_id = secrets.token_hex(16)
        with claim(pending_lock_path(self.root, pending_id)):
            with self._lock.held(), self._graph.transaction():
                self._graph.insert_pending(pending_id, operation, layer_id)
            try:
                yield
            except BaseException:
                # The block's error is the one to see; a collection that fails here is
                # left to the next open, which finds the row unclaimed.
                with contextlib.suppress(LaminaeError, OSError):
                    self.finish_pending(pending_id, layer_id)
                raise
            self.finish_pending(pending_id, layer_id)

    def finish_pending(self, pending_id: str, layer_id: str) -> list[str]:
        """Collect ``layer_id`` and drop journal entry ``pending_id``; the ids removed."""
        with self._lock.held():
            removed = self.collect(layer_id)
            with self._graph.transaction():
                self._graph.delete_pending(pending_id)
        return removed

    def remove(self, row: LayerRow) -> None:
        """Remove layer ``row``: its storage, its tar-split record and its row.

        Checks nothing (the caller has); call it with the store lock held.
        """
        # Marked incomplete first: a crash in the middle leaves a layer the next open removes.
        with self._graph.transaction():
            self._graph.update_layer(row.id, incomplete=True)
        # Called for incomplete layers too, whose storage may be half made or absent: the
        # driver sweeps what is there, and NotFound means there was nothing.
        with contextlib.suppress(NotFound), map_os_errors(f"remove layer {row.id!r}"):
            self._driver.remove(row.storage_id)
        tar_split_path(self.root, row.storage_id).unlink(missing_ok=True)
        with self._graph.transaction():
            self._graph.delete_layer(row.id)
            self._graph.pass_pending_down(row.id, row.parent)
