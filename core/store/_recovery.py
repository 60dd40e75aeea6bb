"""What a crash leaves behind in a store, found (check) and taken away (repair, and each open).

A process killed in the middle of its work leaves:

- incomplete layers, whose per-layer lock the kernel has dropped (an apply, a commit, an
  import's whole chain of staged layers);
- scratch directories under ``<root>/tmp`` whose claim is gone (an import's spool files);
- mounts under the run directory that no count and no live process holds, and counts that
  say "mounted" where the kernel says otherwise (:mod:`laminae.store._mounts`);
- journal entries of operations in two steps (:meth:`Staging.collecting`), whose layer the
  next open collects, finishing the operation.

Only what the store can tell for its own is taken away: mounts it made (their claims carry
the store's id), never a mount someone else put under its run directory or its scratch
directory. Such foreign mounts are not in the report and no repair touches them.

Each open of the store takes these away (:meth:`Recovery.sweep`), under the store lock so that
another process's work in progress is told apart by its claims. What no crash explains, such
as storage the graph does not know or a layer whose storage is gone, only :meth:`Recovery.check`
reports and only :meth:`Recovery.repair` changes. A repair says everything it removes, the
images and containers that went with a lost layer included, and removes what the store cannot
tell for its own (storage no layer owns, layers nothing holds) only when forced.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import final

import attrs

from laminae._exceptions import CorruptLayer, NotFound, map_os_errors
from laminae.driverkit._contract import Driver
from laminae.kernel import _mountinfo
from laminae.kernel._locks import StoreLock, is_claimed
from laminae.store._graph import Graph, LayerRow
from laminae.store._mounts import Mounts
from laminae.store._records import CheckReport, LayerKind
from laminae.store._staging import Staging, layer_lock_path, pending_lock_path, tar_split_path

__all__ = ["Recovery"]


@final
class Recovery:
    """Check and repair of one store; see the module docstring.

    :param root: the store's root directory.
    :param graph: the store's graph.
    :param lock: the store lock, held for every check and change.
    :param driver: the store's driver.
    :param driver_name: its name, for messages.
    :param mounts: the store's mounts.
    :param staging: the store's staging, which removes layers.
    """

    __slots__ = ("_driver", "_driver_name", "_graph", "_lock", "_mounts", "_staging", "root")

    def __init__(
        self,
        root: Path,
        graph: Graph,
        lock: StoreLock,
        driver: Driver,
        driver_name: str,
        mounts: Mounts,
        staging: Staging,
    ) -> None:
        self.root = root
        self._graph = graph
        self._lock = lock
        self._driver = driver
        self._driver_name = driver_name
        self._mounts = mounts
        self._staging = staging

    def sweep(self) -> None:
        """Take away what crashed processes left: done by every open of the store."""
        self._remove_stale_incomplete()
        self._finish_stale_pending()
        self._remove_stale_scratch()
        self._mounts.reconcile()
        self._mounts.unmount_orphans()

    def check(self, *, content: bool = False) -> CheckReport:
        """Compare the graph with the driver's disk and the kernel's mounts; change nothing.

        SQLite's integrity check of ``graph.db`` runs first: a damaged graph is reported
        alone, since its rows cannot be trusted to tell orphans from layers.

        :param content: also re-derive every committed layer's DiffID from its files (and
            its tar-split record), as ``podman system check`` does; reads every layer. Done
            after the store lock is let go, a layer at a time, so that the store stays usable.
        """
        with self._lock.held():
            damage = self._graph.integrity_problems()
            if damage:
                return CheckReport(graph_damage=tuple(damage))
            rows = self._graph.all_layers()
            known = {r.storage_id for r in rows}
            with map_os_errors(f"list layers of driver {self._driver_name}"):
                on_disk = set(self._driver.layers())
            points = _mountinfo.mount_points()
            missing = tuple(r.id for r in rows if not r.incomplete and r.storage_id not in on_disk)
            report = CheckReport(
                orphan_storage=tuple(sorted(on_disk - known)),
                missing_storage=missing,
                dependents=tuple(self._dependents(missing)),
                incomplete=tuple(r.id for r in self._stale_incomplete()),
                orphan_mounts=tuple(self._mounts.orphans(points)),
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
                interrupted=tuple(f"{op}: {layer}" for _, op, layer in self._stale_pending()),
                unreferenced=tuple(self._graph.unreferenced_layers()),
                foreign_mounts=tuple(self._mounts.foreign(points)),
            )
        if not content:
            return report
        committed = [r for r in rows if r.kind == LayerKind.COMMITTED.value and r.id not in missing]
        return attrs.evolve(report, content_mismatch=tuple(self._content_mismatches(committed)))

    def _content_mismatches(self, rows: list[LayerRow]) -> list[str]:
        found = []
        for row in rows:
            current = self._graph.layer(row.id)
            if current is None or current.incomplete:
                continue  # removed since the check began
            try:
                digest = self._staging.layer_tar_digest(current)
            except NotFound:
                continue
            except CorruptLayer as exc:  # a file its tar-split record names is gone
                found.append(f"{current.id}: {exc}")
                continue
            if digest != current.diff_id:
                found.append(f"{current.id}: its files give DiffID {digest}, not {current.diff_id}")
        return found

    def repair(self, report: CheckReport, *, force: bool = False) -> CheckReport:
        """Fix what ``report`` lists; return what was fixed, and in ``kept`` what was not.

        Layers whose storage is missing are removed from the graph with everything above
        them and every image and container using them (all listed in ``dependents``); stale
        incomplete layers are removed; interrupted operations are finished; orphan mounts are
        unmounted; stale counts are reset; orphan tar-split records are deleted. Orphan
        storage and unreferenced layers are removed only when ``force`` is given: the first
        may be data the graph lost track of, the second layers applied on their own.

        :raises CorruptLayer: ``report`` says the graph is damaged: nothing is changed, since
            repairs chosen from a damaged graph could delete the layers it lost track of.
        """
        if report.graph_damage:
            raise CorruptLayer(
                f"graph {self._graph.path} is damaged; nothing was repaired: "
                "restore graph.db from a backup"
            )
        fixed: dict[str, list[str]] = {f.name: [] for f in attrs.fields(CheckReport)}
        with self._lock.held():
            for storage_id in report.orphan_storage:
                if self._graph.layer_by_storage(storage_id) is not None:
                    continue
                if not force:
                    fixed["kept"].append(
                        f"orphan storage {storage_id}: owned by no layer; --force removes it"
                    )
                    continue
                with map_os_errors(f"remove orphan storage {storage_id}"):
                    self._driver.remove(storage_id)
                fixed["orphan_storage"].append(storage_id)
            for layer_id in report.missing_storage:
                fixed["dependents"].extend(self._dependents([layer_id]))
                for row in reversed(self._descendants(layer_id)):
                    self._drop_users(row.id)
                    self._staging.remove(row)
                fixed["missing_storage"].append(layer_id)
            fixed["incomplete"] = self._remove_stale_incomplete()
            fixed["interrupted"] = self._finish_stale_pending()
            remaining = set(self._mounts.unmount_orphans())
            fixed["orphan_mounts"] = [p for p in report.orphan_mounts if p in remaining]
            points = _mountinfo.mount_points()
            for layer_id in report.stale_counts:
                stale = self._graph.layer(layer_id)
                if stale is not None and self._mounts.reconcile_row(stale, points):
                    fixed["stale_counts"].append(layer_id)
            for storage_id in report.orphan_records:
                if self._graph.layer_by_storage(storage_id) is None:
                    tar_split_path(self.root, storage_id).unlink(missing_ok=True)
                    fixed["orphan_records"].append(storage_id)
            for layer_id in report.unreferenced:
                if not force:
                    fixed["kept"].append(f"layer {layer_id}: unreferenced; --force removes it")
                    continue
                fixed["unreferenced"].extend(self._staging.collect(layer_id))
        return CheckReport(**{k: tuple(v) for k, v in fixed.items()})

    def _dependents(self, layer_ids: tuple[str, ...] | list[str]) -> list[str]:
        """What goes with ``layer_ids`` in a repair: the layers above them, and the images
        and containers using any of these."""
        found: list[str] = []
        for layer_id in layer_ids:
            for row in self._descendants(layer_id):
                if row.id != layer_id:
                    found.append(f"layer {row.id}")
                for container in self._graph.containers_using(layer=row.id):
                    found.append(f"container {container}")
                for image in self._graph.images_using_layer(row.id):
                    found.extend(
                        f"container {c}" for c in self._graph.containers_using(image=image)
                    )
                    found.append(f"image {image}")
        return list(dict.fromkeys(found))

    def _stale_pending(self) -> list[tuple[str, str, str]]:
        """Journal entries whose process is gone (its claim is free)."""
        return [
            entry
            for entry in self._graph.all_pending()
            if not is_claimed(pending_lock_path(self.root, entry[0]))
        ]

    def _finish_stale_pending(self) -> list[str]:
        """Finish the operations of dead processes: collect what each may have left."""
        finished = []
        with self._lock.held():
            for pending_id, operation, layer_id in self._stale_pending():
                self._staging.finish_pending(pending_id, layer_id)
                with contextlib.suppress(FileNotFoundError):
                    pending_lock_path(self.root, pending_id).unlink()
                finished.append(f"{operation}: {layer_id}")
        return finished

    def _stale_incomplete(self) -> list[LayerRow]:
        """Incomplete layers whose writer is gone (its per-layer lock is free)."""
        return [
            row
            for row in self._graph.all_layers()
            if row.incomplete and not is_claimed(layer_lock_path(self.root, row.storage_id))
        ]

    def _remove_stale_incomplete(self) -> list[str]:
        removed = []
        with self._lock.held():
            for row in self._stale_incomplete():
                if self._graph.layer(row.id) is None:
                    continue  # removed above, as a layer staged on another
                # Only incomplete layers can sit on an incomplete one (an image import
                # stages a whole chain): they go first, top down.
                for above in reversed(self._descendants(row.id)):
                    self._staging.remove(above)
                    with contextlib.suppress(FileNotFoundError):
                        layer_lock_path(self.root, above.storage_id).unlink()
                    removed.append(above.id)
        return removed

    def _remove_stale_scratch(self) -> list[str]:
        """Remove the scratch directories of processes that are gone."""
        base = self.root / "tmp"
        removed: list[str] = []
        if not base.is_dir():
            return removed
        # The store never mounts under its scratch directories; a mount there is someone
        # else's, and removing the tree would delete what it shows.
        points = _mountinfo.mount_points()
        for entry in sorted(base.iterdir()):
            lock = entry if entry.suffix == ".lock" else base / f"{entry.name}.lock"
            if is_claimed(lock):
                continue
            if any(p == str(entry) or p.startswith(f"{entry}/") for p in points):
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
