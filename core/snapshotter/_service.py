"""containerd's snapshotter, on a laminae store: what each call of the Snapshots service does.

containerd's model is kept exactly. A snapshot is a *name* with its own kind (active, view,
committed), parent name, labels, and created and updated times (equal until an Update); the
name → layer table (:mod:`laminae.snapshotter._table`) maps it to the laminae layer that holds
its files:

- **Prepare** and **View** create an active layer or a view on the parent's layer (the parent
  must be committed) and return its mounts, described (:meth:`Store.mount_specs`), for
  containerd to perform. The server mounts only where containerd cannot (a stack deeper than
  its one page of mount options), as a declared fallback (:meth:`Snapshotter._describe`).
- **Commit** turns the active layer into a committed one. laminae names committed layers by
  ChainID, so the committed layer may be one the store already had; the new name shares it.
- **Commit to a ChainID name** (``<namespace>/<n>/sha256:...``, as containerd names unpacked
  layers) of a committed layer the store already has on the same parent: the name goes on the
  store's layer and the fresh copy is dropped.
- **Prepare with** ``containerd.io/snapshot.ref`` (containerd's unpacker sets it to the
  ChainID it is about to unpack): when the store already holds that committed layer on the
  same parent (``laminae image import`` made it from the same image), the name is recorded
  on it and the call answers AlreadyExists, as containerd's remote snapshotters do; the
  unpacker then skips the layer. One copy on disk.
- **Remove** forgets a name; the layer goes when no other name uses it and the snapshotter
  made it (a layer an image of the store holds is never removed from here).

The errors are laminae's (:mod:`laminae._exceptions`), named as containerd's ``errdefs`` would
name them; :mod:`laminae.snapshotter._server` maps them to gRPC codes. Calls are serialised by
one lock: the store's own locks order processes, not the threads of one server.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, final

import attrs

from laminae._exceptions import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unsupported,
)
from laminae.snapshotter._filters import matches_any, parse_filter
from laminae.snapshotter._table import Kind, Snapshot, SnapshotTable, now
from laminae.store._records import LayerKind, check_labels

if TYPE_CHECKING:
    from laminae._store import Store
    from laminae.driverkit._contract import MountSpec, Usage
    from laminae.store._records import Layer

__all__ = ["REF_LABEL", "Mount", "Snapshotter", "to_mounts"]

REF_LABEL = "containerd.io/snapshot.ref"
"""The label containerd's unpacker puts on an unpack's Prepare: the ChainID it will commit."""

LAYER_PREFIX = "containerd-"
"""The ids of the active layers and views the snapshotter makes (for Cleanup to find)."""

_CHAIN_ID = re.compile(r"sha256:[0-9a-f]{64}$")
_IMMUTABLE = frozenset({"name", "parent", "kind", "created_at", "created", "updated_at"})


@attrs.frozen
class Mount:
    """One mount as containerd's ``containerd.types.Mount`` carries it."""

    type: str
    source: str
    options: tuple[str, ...]


def to_mounts(specs: Sequence[MountSpec]) -> list[Mount]:
    """A driver's mount specs as containerd mounts them.

    An overlay's directories become ``lowerdir=``, ``upperdir=`` and ``workdir=`` options; a
    bind mount is ``rbind`` (containerd binds only when the options say so).

    :raises Unsupported: a spec mounts below the layer's root, which containerd 1.6's Mount
        cannot say.
    """
    mounts = []
    for spec in specs:
        if spec.target:
            raise Unsupported(
                f"the driver mounts {spec.type} at {spec.target!r} below the root; containerd's "
                "mounts are all at the root"
            )
        options = list(spec.options)
        if spec.type == "overlay":
            if spec.workdir is not None:
                options.append(f"workdir={spec.workdir}")
            if spec.upperdir is not None:
                options.append(f"upperdir={spec.upperdir}")
            options.append("lowerdir=" + ":".join(spec.lowerdirs))
        elif spec.type == "bind" and not {"bind", "rbind"} & set(options):
            options.append("rbind")
        mounts.append(Mount(spec.type, spec.source, tuple(options)))
    return mounts


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def fits_containerd(mount: Mount) -> bool:
    """Whether containerd 1.6 mounts ``mount`` with one ``mount(2)``: an overlay's options
    must fit in a page, after containerd has made the lowerdirs relative to their common
    directory (its ``compactLowerdirOption``, which it tries from a page less 512 bytes on).
    """
    if mount.type != "overlay":
        return True
    data = ",".join(mount.options)
    if len(os.fsencode(data)) < PAGE_SIZE - 512:
        return True
    others = [o for o in mount.options if not o.startswith("lowerdir=")]
    lowers = next((o for o in mount.options if o.startswith("lowerdir=")), "lowerdir=")
    dirs = lowers[len("lowerdir=") :].split(":")
    # By characters, then up one directory: containerd's own longestCommonPrefix and path.Dir.
    prefix = os.path.commonprefix(dirs)  # noqa: RUF071
    common = os.path.dirname(prefix) if len(dirs) > 1 else ""
    if common not in ("", "/"):
        relative = ":".join(d[len(common) + 1 :] for d in dirs)
        data = ",".join([*others, f"lowerdir={relative}"])
    return len(os.fsencode(data)) < PAGE_SIZE


def _check_name(what: str, name: str) -> str:
    if not name:
        raise InvalidArgument(f"{what}: must not be empty")
    return name


@final
class Snapshotter:
    """containerd's Snapshotter on ``store``, with its table in
    ``<store root>/containerd/snapshots.db``. Close it when done (the store stays open).
    """

    __slots__ = ("_lock", "_store", "_table")

    def __init__(self, store: Store) -> None:
        self._store = store
        self._table = SnapshotTable(store.root / "containerd" / "snapshots.db")
        self._lock = threading.Lock()
        self._finish_commits()

    def _finish_commits(self) -> None:
        """Record the commits a crash interrupted after the store committed the layer (found
        by its storage id, which a commit keeps); forget those it interrupted before. Either
        way the table agrees with the store again."""
        for key, name, storage, labels in self._table.pending_commits():
            active = self._table.find(key)
            layer = next((x for x in self._store.layers() if x.storage_id == storage), None)
            done = layer is not None and layer.kind is LayerKind.COMMITTED
            if active is None or layer is None or not done or self._table.find(name):
                self._table.end_commit(key)
                continue
            stamp = now()
            self._table.replace(
                key,
                Snapshot(name, Kind.COMMITTED, active.parent, layer.id, True, labels, stamp, stamp),
            )

    def close(self) -> None:
        """Close the table."""
        with self._lock:
            self._table.close()

    # -- creating --------------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """Create active snapshot ``key`` on committed ``parent`` ("" for none).

        :raises AlreadyExists: ``key`` is taken, or the ``containerd.io/snapshot.ref``
            target exists (and now names a layer of the store: see the module docstring).
        :raises NotFound: ``parent`` does not exist.
        :raises InvalidArgument: ``parent`` is not committed.
        """
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """Create read-only snapshot ``key`` of committed ``parent``; as :meth:`prepare`."""
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        _check_name("snapshot key", key)
        checked = check_labels(labels)
        with self._lock:
            if self._table.find(key) is not None:
                raise AlreadyExists(f"snapshot {key!r}: already exists")
            base = self._committed(parent) if parent else None
            target = checked.get(REF_LABEL)
            if kind is Kind.ACTIVE and target:
                self._adopt(target, base, checked)
            layer = self._store.create_layer(
                LAYER_PREFIX + secrets.token_hex(16),
                None if base is None else base.layer,
                view=kind is Kind.VIEW,
            )
            stamp = now()
            try:
                mounts, held = self._describe(layer.id, kind, None)
                try:
                    self._table.add(
                        Snapshot(
                            key, kind, parent or None, layer.id, True, checked, stamp, stamp, held
                        )
                    )
                except BaseException:
                    self._release(held)
                    raise
            except BaseException:
                self._store.remove_layer(layer.id)
                raise
            return mounts

    def _committed(self, name: str) -> Snapshot:
        parent = self._table.get(name)
        if parent.kind is not Kind.COMMITTED:
            raise InvalidArgument(f"parent {name!r}: is not a committed snapshot")
        return parent

    def _adopt(self, target: str, base: Snapshot | None, labels: Mapping[str, str]) -> None:
        """Record ``target`` on the store's committed layer of that ChainID, if it has one on
        ``base``'s layer, and raise AlreadyExists; return if there is nothing to adopt."""
        if self._table.find(target) is not None:
            raise AlreadyExists(f"target snapshot {target!r}: already exists")
        layer = self._chain_layer(target, None if base is None else base.layer)
        if layer is None:
            return
        stamp = now()
        owned = layer.id in self._table.owned_layers()
        parent = None if base is None else base.name
        self._table.add(
            Snapshot(target, Kind.COMMITTED, parent, layer.id, owned, labels, stamp, stamp)
        )
        raise AlreadyExists(f"target snapshot {target!r}: already exists (layer {layer.id})")

    def _chain_layer(self, name: str, parent: str | None) -> Layer | None:
        """The store's committed layer whose id is the ChainID ``name`` ends with, if it lies
        on layer ``parent``. A ChainID names content (containerd verified each DiffID as it
        unpacked), so the name may share that layer."""
        chain_id = _CHAIN_ID.search(name)
        if chain_id is None:
            return None
        try:
            layer = self._store.layer(chain_id.group())
        except NotFound:
            return None
        if layer.kind is not LayerKind.COMMITTED or layer.parent != parent:
            return None
        return layer

    def _describe(self, layer: str, kind: Kind, held: str | None) -> tuple[list[Mount], str | None]:
        """The mounts of ``layer`` for containerd, and the layer the store holds mounted for
        them (``held``: one it holds already).

        When containerd cannot mount the driver's description (an overlay of more lowers than
        its ``mount(2)`` takes in a page), the server mounts the parent layer itself, read-only
        and counted by the store, and describes an overlay on that one lower (a view: a bind
        of it). The mount lasts until the snapshot is committed or removed.

        :raises Unsupported: the description does not fit and is no overlay on parents.
        """
        readonly = kind is not Kind.ACTIVE
        mounts = to_mounts(self._store.mount_specs(layer, readonly=readonly))
        if held is None and all(fits_containerd(m) for m in mounts):
            return mounts, None
        parent = self._store.layer(layer).parent
        if parent is None or [m.type for m in mounts] != ["overlay"]:
            raise Unsupported(
                f"layer {layer}: containerd cannot mount the driver's description in one "
                "mount(2), and it is no overlay on parent layers the server could mount"
            )
        point = self._hold(parent, again=held == parent)
        if readonly:
            return [Mount("bind", str(point), ("ro", "rbind"))], parent
        options = [o for o in mounts[0].options if not o.startswith("lowerdir=")]
        return [Mount("overlay", "overlay", (*options, f"lowerdir={point}"))], parent

    def _hold(self, layer: str, *, again: bool) -> Path:
        """Mount ``layer`` read-only through the store; ``again``: a snapshot holds it already,
        only its path is wanted (the count stays, unless the mount went away meanwhile)."""
        point = self._store.mount(layer, readonly=True)
        if again and self._store.layer(layer).mount_count > 1:
            self._store.unmount(layer)
        return point

    def _release(self, held: str | None) -> None:
        """Drop the store mount a snapshot held (gone already after a reboot: nothing to do)."""
        if held is None:
            return
        with contextlib.suppress(FailedPrecondition, NotFound):
            self._store.unmount(held)

    # -- reading ---------------------------------------------------------------------------

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of active snapshot or view ``key``.

        :raises NotFound: ``key`` does not exist.
        :raises FailedPrecondition: ``key`` is committed.
        """
        with self._lock:
            snapshot = self._table.get(key)
            if snapshot.kind is Kind.COMMITTED:
                raise FailedPrecondition(f"snapshot {key!r}: is committed, not active or a view")
            mounts, held = self._describe(snapshot.layer, snapshot.kind, snapshot.held)
            if held != snapshot.held:
                self._table.set_held(key, held)
            return mounts

    def stat(self, key: str) -> Snapshot:
        """Snapshot ``key``. :raises NotFound: it does not exist."""
        with self._lock:
            return self._table.get(key)

    def walk(self, filters: Sequence[str]) -> list[Snapshot]:
        """Every snapshot that matches one of ``filters`` (containerd's filter syntax; all
        of them with none). :raises InvalidArgument: a filter does not parse."""
        parsed = [parse_filter(text) for text in filters]
        with self._lock:
            return [s for s in self._table.all() if matches_any(parsed, s)]

    def usage(self, key: str) -> Usage:
        """Disk used by ``key``'s own layer. :raises NotFound: it does not exist."""
        with self._lock:
            return self._store.usage(self._table.get(key).layer)

    # -- changing --------------------------------------------------------------------------

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> Snapshot:
        """Commit active snapshot ``key`` as ``name``, with ``labels``; ``key`` is gone.

        :raises NotFound: ``key`` does not exist.
        :raises FailedPrecondition: ``key`` is not active.
        :raises AlreadyExists: ``name`` is taken.
        """
        _check_name("snapshot name", name)
        checked = check_labels(labels)
        with self._lock:
            active = self._table.get(key)
            if active.kind is not Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r}: is {active.kind.value}, not active")
            if self._table.find(name) is not None:
                raise AlreadyExists(f"snapshot {name!r}: already exists")
            self._release(active.held)
            self._table.set_held(key, None)
            work = self._store.layer(active.layer)
            self._table.begin_commit(key, name, work.storage_id, checked)
            try:
                layer = self._chain_layer(name, work.parent)
                if layer is not None:
                    # containerd unpacked a layer the store has (``ctr images import`` unpacks
                    # without the snapshot.ref label): keep the store's copy, drop the new one.
                    self._store.remove_layer(work.id)
                else:
                    layer = self._store.commit_layer(work.id)
            except BaseException:
                self._table.end_commit(key)
                raise
            # The store may have had the layer already (a ChainID name, or the commit's own
            # ChainID: the active layer was then thrown away, and the storage is the old
            # layer's): that layer is not ours unless another name of ours uses it.
            owned = layer.storage_id == work.storage_id or layer.id in self._table.owned_layers()
            self._table.forget_unused(layer.id)
            stamp = now()
            committed = Snapshot(
                name, Kind.COMMITTED, active.parent, layer.id, owned, checked, stamp, stamp
            )
            self._table.replace(key, committed)
            return committed

    def update(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> Snapshot:
        """Change the labels of ``name``, as containerd's Update does.

        No ``fieldpaths``: the labels become ``labels``. ``labels`` replaces them too;
        ``labels.<key>`` sets that one label from ``labels`` (or removes it, when ``labels``
        has no value for it).

        :raises NotFound: ``name`` does not exist.
        :raises InvalidArgument: a field path names an immutable field or none at all.
        """
        _check_name("snapshot name", name)
        checked = {k: v for k, v in check_labels(labels).items() if v}
        with self._lock:
            snapshot = self._table.get(name)
            updated = dict(snapshot.labels)
            if not fieldpaths:
                updated = checked
            for path in fieldpaths:
                if path.startswith("labels."):
                    label = path[len("labels.") :]
                    if label in checked:
                        updated[label] = checked[label]
                    else:
                        updated.pop(label, None)
                elif path == "labels":
                    updated = checked
                else:
                    why = "is immutable" if path in _IMMUTABLE else "is no field of a snapshot"
                    raise InvalidArgument(f"cannot update {path!r} of snapshot {name!r}: {why}")
            stamp = now()
            self._table.update(name, updated, stamp)
            return self._table.get(name)

    def remove(self, key: str) -> None:
        """Remove snapshot ``key``; its layer too when nothing else uses it.

        :raises NotFound: ``key`` does not exist.
        :raises FailedPrecondition: a snapshot has ``key`` for parent.
        """
        with self._lock:
            snapshot = self._table.get(key)
            children = self._table.children(key)
            if children:
                raise FailedPrecondition(
                    f"cannot remove snapshot {key!r}: it has child {children[0]!r}"
                )
            self._release(snapshot.held)
            if snapshot.owned:
                # Remembered first: a crash between the two steps leaves work for Cleanup.
                self._table.mark_unused(snapshot.layer)
            self._table.remove(key)
            if snapshot.owned and not self._table.users_of_layer(snapshot.layer):
                self._remove_layer(snapshot.layer)
            else:
                self._table.forget_unused(snapshot.layer)

    def _remove_layer(self, layer: str) -> bool:
        """Remove an unused layer of ours, or leave it marked for Cleanup if the store still
        needs it (another layer of the store stacks on it). Returns whether it is gone."""
        try:
            self._store.remove_layer(layer)
        except NotFound:
            pass
        except FailedPrecondition:
            self._table.mark_unused(layer)
            return False
        self._table.forget_unused(layer)
        return True

    def cleanup(self) -> list[str]:
        """Remove the layers of the snapshotter that no name uses (left by a crash, or kept
        while the store needed them). Returns their ids."""
        with self._lock:
            used = {s.layer for s in self._table.all()}
            candidates = set(self._table.unused_layers())
            candidates.update(
                layer.id
                for layer in self._store.layers()
                if layer.id.startswith(LAYER_PREFIX) and layer.id not in used
            )
            return [layer for layer in sorted(candidates - used) if self._remove_layer(layer)]
