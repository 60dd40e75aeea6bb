"""Where a store's layers are mounted, and how the counts in the graph stay true.

Two kinds of mount live under the run directory:

- ``<runroot>/mounts/<storage id>``: a layer mounted for a user. The graph counts its
  mounts (``mount_count``, ``mount_point``); the first mount makes it, the last unmount takes
  it away (:meth:`laminae.Store.mount`).
- ``<runroot>/tmp/<nonce>``: a private mount the store makes for its own reading or writing
  of a layer (:meth:`Mounts.materialized`), claimed by ``tmp/<nonce>.lock`` while in use.

A process that dies leaves both kinds behind, and a count that says "mounted" where the
kernel says otherwise (a reboot empties the run directory). ``/proc/self/mountinfo`` is the
truth: :meth:`Mounts.reconcile` makes the counts agree with it, :meth:`Mounts.unmount_orphans`
takes away what no count and no live process holds.

A run directory may be shared with things the store did not make: another store's mounts
under a shared ``/run``, a user's bind mount. The store touches only what it can attribute to
itself. It marks its run directory (:func:`claim_runroot`) and refuses one marked by another
store; ``mounts/<storage id>`` is its own only if the storage id is one of its layers, and
``tmp/<nonce>`` only if the claim file names its id (:attr:`laminae.store._graph.Graph.store_id`).
Anything else under the run directory is foreign and left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import final

from laminae._exceptions import FailedPrecondition, map_os_errors
from laminae.driverkit._contract import Driver
from laminae.driverkit._mount import mounted, unmount_all
from laminae.kernel import _mountinfo
from laminae.kernel._locks import StoreLock, claim, is_claimed
from laminae.store._graph import Graph, LayerRow

__all__ = ["MARKER", "Mounts", "claim_runroot"]

MARKER = "laminae-store.json"
"""The file in a run directory naming the store that uses it: ``{"id": ..., "root": ...}``."""


def _read_marker(path: Path) -> dict[str, str] | None:
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or garbage: it names no store, so none can be displaced
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _holds_store(root: str) -> bool:
    """Whether ``root`` still holds a store (a graph)."""
    return bool(root) and os.path.isabs(root) and (Path(root) / "graph.db").exists()


def claim_runroot(runroot: Path, root: Path, store_id: str) -> None:
    """Mark ``runroot`` as the run directory of the store ``store_id`` at ``root``.

    Two stores sharing a run directory would each take the other's mounts for their own
    crash's leftovers; so the first store to use a run directory writes its marker there, and
    another store is refused while the marked store still exists. A marker whose root holds no
    store any more (the store was deleted or moved) is taken over.

    :raises FailedPrecondition: another store, still present, uses ``runroot``.
    """
    marker = runroot / MARKER
    # Resolved, so that one store reached by two spellings of its root is one store.
    mine = {"id": store_id, "root": os.path.realpath(root)}
    with map_os_errors(f"mark run directory {runroot}"):
        # Written whole, then linked into place: the link fails if a marker is there, so two
        # stores opening at once cannot both believe the directory is theirs.
        draft = runroot / f".{MARKER}.{secrets.token_hex(8)}"
        draft.write_text(json.dumps(mine))
        try:
            try:
                os.link(draft, marker)
                return
            except FileExistsError:
                pass
            found = _read_marker(marker) or {}
            if found == mine:
                return
            other = found.get("root", "")
            if other == mine["root"] or not _holds_store(other):
                # The marked store is gone (or moved here): the directory is free.
                os.replace(draft, marker)
                return
        finally:
            draft.unlink(missing_ok=True)
    # The same id at another root is a copy of this store: the two would take each other's
    # mounts for their own as surely as two different stores.
    what = "a copy of this store" if found.get("id") == store_id else "another store"
    raise FailedPrecondition(
        f"run directory {runroot} is used by {what}, at {other}; the store at {root} needs "
        f"its own (give --runroot, or remove {marker} if the store at {other} is gone)"
    )


@final
class Mounts:
    """The mounts of one store: its run directory, its graph's counts and the kernel's table.

    :param runroot: the store's run directory.
    :param graph: the store's graph, whose counts are kept true.
    :param lock: the store lock, taken for every change to the counts.
    :param driver: the store's driver, which describes a layer's mounts.
    """

    __slots__ = ("_driver", "_graph", "_lock", "runroot")

    def __init__(self, runroot: Path, graph: Graph, lock: StoreLock, driver: Driver) -> None:
        self.runroot = runroot
        self._graph = graph
        self._lock = lock
        self._driver = driver

    def target(self, row: LayerRow) -> Path:
        """Where layer ``row`` is mounted for users."""
        return self.runroot / "mounts" / row.storage_id

    def reconcile_row(self, row: LayerRow, points: set[str] | None = None) -> bool:
        """Reset ``row``'s mount count if its mount is gone. Returns whether it was stale.

        :param points: the mount points the kernel has, when the caller read them already.
        """
        if row.mount_count == 0:
            return False
        points = _mountinfo.mount_points() if points is None else points
        if row.mount_point in points:
            return False
        with self._graph.transaction():
            self._graph.update_layer(row.id, mount_count=0, mount_point=None)
        return True

    def reconcile(self) -> None:
        """Make every mount count agree with ``/proc/self/mountinfo``."""
        with self._lock.held():
            # Read under the lock: another process may mount between a read and the lock.
            points = _mountinfo.mount_points()
            for row in self._graph.all_layers():
                self.reconcile_row(row, points)

    def orphans(self, points: set[str]) -> list[str]:
        """Mounts of this store under the run directory that no count and no live process holds.

        ``mounts/<sid>`` belongs to a layer whose count says mounted; ``tmp/<nonce>`` to the
        process holding ``tmp/<nonce>.lock``. Of the rest, what this store made (see the
        module docstring) is what a crash left behind; :meth:`foreign` is everything else.
        """
        return self._sorted(points)[0]

    def foreign(self, points: set[str]) -> list[str]:
        """Mounts under the run directory that are not this store's: never touched."""
        return self._sorted(points)[1]

    def _sorted(self, points: set[str]) -> tuple[list[str], list[str]]:
        """This store's orphan mounts, and the foreign ones, under the run directory."""
        rows = self._graph.all_layers()
        counted = {r.mount_point for r in rows if r.mount_count}
        ours = {str(self.target(r)) for r in rows}
        mounts_dir = f"{self.runroot}/mounts/"
        tmp_dir = f"{self.runroot}/tmp/"
        orphans: list[str] = []
        foreign: list[str] = []
        for point in sorted(points):
            if point.startswith(mounts_dir):
                top = mounts_dir + point[len(mounts_dir) :].split("/")[0]
                if top not in ours:
                    foreign.append(point)
                elif top not in counted:
                    orphans.append(point)
            elif point.startswith(tmp_dir):
                lock = self.runroot / "tmp" / f"{point[len(tmp_dir) :].split('/')[0]}.lock"
                if not self._claimed_by_us(lock):
                    foreign.append(point)
                elif not is_claimed(lock):
                    orphans.append(point)
        return orphans, foreign

    def _claimed_by_us(self, lock: Path) -> bool:
        """Whether claim file ``lock`` names this store (see :meth:`materialized`)."""
        try:
            return lock.read_text().strip() == self._graph.store_id
        except (OSError, UnicodeDecodeError):
            return False

    def unmount_orphans(self) -> list[str]:
        """Unmount what crashed processes left mounted under the run directory."""
        with self._lock.held():
            orphans = self.orphans(_mountinfo.mount_points())
            # Deepest first; unmount_all takes submounts along with their parent.
            for point in sorted(orphans, key=len, reverse=True):
                if _mountinfo.is_mountpoint(point):
                    unmount_all(Path(point))
                with contextlib.suppress(FileNotFoundError):
                    Path(point + ".lock").unlink()
        return orphans

    @contextlib.contextmanager
    def materialized(
        self, row: LayerRow, parents: Sequence[str], *, readonly: bool
    ) -> Iterator[Path]:
        """The layer's root as a path, for the store's own reading and writing.

        A single bind mount needs no mount at all: its source *is* the tree. Anything else
        is mounted privately under ``<runroot>/tmp`` for the duration.
        """
        with map_os_errors(f"describe mounts of layer {row.id!r}"):
            specs = self._driver.mounts(row.storage_id, parents, readonly)
        if len(specs) == 1 and specs[0].type == "bind" and not specs[0].target:
            yield Path(specs[0].source)
            return
        nonce = secrets.token_hex(8)
        (self.runroot / "tmp").mkdir(mode=0o700, exist_ok=True)
        lock = self.runroot / "tmp" / f"{nonce}.lock"
        with claim(lock):
            # The claim names the store before anything is mounted: a crash after this
            # leaves a mount the store's next sweep can tell for its own.
            lock.write_text(self._graph.store_id)
            with mounted(specs, self.runroot / "tmp" / nonce) as path:
                yield path
