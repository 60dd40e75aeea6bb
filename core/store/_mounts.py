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
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import final

from laminae._exceptions import map_os_errors
from laminae.driverkit._contract import Driver
from laminae.driverkit._mount import mounted, unmount_all
from laminae.kernel import _mountinfo
from laminae.kernel._locks import StoreLock, claim, is_claimed
from laminae.store._graph import Graph, LayerRow

__all__ = ["Mounts"]


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
        with (
            claim(self.runroot / "tmp" / f"{nonce}.lock"),
            mounted(specs, self.runroot / "tmp" / nonce) as path,
        ):
            yield path
