"""The snapshotter's own table: containerd's snapshot names, each with its kind, parent name,
labels and times, and the laminae layer that holds its files.

containerd's model and laminae's differ in one way that matters: laminae content-addresses
committed layers (a committed layer's id is its ChainID), so two snapshot names may share one
layer (two empty commits on one parent do; so do a name containerd's unpacker gives a layer
and the layer ``laminae image import`` made from the same image). A name is therefore never a
layer's name or label in the store's graph: it is a row here, in ``snapshots.db`` beside the
graph, owned by this package alone (containerd's ``snapshots/storage`` keeps the same table).

``owned`` says whether the snapshotter made the layer (and may remove it when no name uses it
any more) or found it in the store (a layer an image holds: never removed from here). A layer
it made that no name uses but the store would not remove yet (a layer of the store's own was
stacked on it) waits in ``unused_layers`` for Cleanup. A commit in progress is written in
``pending_commits`` first: the store's commit and this table's are two transactions, and a
crash between them is finished on the next start.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import final

import attrs

from laminae._exceptions import AlreadyExists, NotFound, map_os_errors

__all__ = ["Kind", "Snapshot", "SnapshotTable"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    parent TEXT REFERENCES snapshots(name),
    layer TEXT NOT NULL,
    owned INTEGER NOT NULL,
    labels TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    held TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
CREATE INDEX IF NOT EXISTS snapshots_layer ON snapshots(layer);
CREATE TABLE IF NOT EXISTS unused_layers (layer TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS pending_commits (
    key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    storage TEXT NOT NULL,
    labels TEXT NOT NULL
);
"""


class Kind(Enum):
    """containerd's snapshot kinds (the wire enum has the same names)."""

    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


@attrs.frozen
class Snapshot:
    """One snapshot as containerd sees it, and the laminae layer behind it.

    :param parent: the parent snapshot's *name* (``None`` for a base).
    :param layer: the id of the laminae layer holding the files.
    :param owned: the snapshotter made ``layer``, and removes it when no name uses it.
    :param held: a layer the store keeps mounted for this snapshot's mounts (the lower stack,
        when containerd cannot mount the driver's description; see ``_service``).
    """

    name: str
    kind: Kind
    parent: str | None
    layer: str
    owned: bool
    labels: Mapping[str, str]
    created: datetime
    updated: datetime
    held: str | None = None


def now() -> datetime:
    """The time a change is stamped with (UTC, microseconds as containerd keeps them)."""
    return datetime.now(UTC)


@final
class SnapshotTable:
    """The name → layer table in ``path`` (SQLite, WAL). Not shared between threads: the
    server serialises calls (see :mod:`laminae.snapshotter._service`).

    :param path: the database file; made with its directory if missing.
    """

    __slots__ = ("_db",)

    def __init__(self, path: Path) -> None:
        with map_os_errors(f"open snapshot table {path}"):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def _row(
        self, row: tuple[str, str, str | None, str, int, str, str, str, str | None]
    ) -> Snapshot:
        name, kind, parent, layer, owned, labels, created, updated, held = row
        return Snapshot(
            name,
            Kind(kind),
            parent,
            layer,
            bool(owned),
            json.loads(labels),
            datetime.fromisoformat(created),
            datetime.fromisoformat(updated),
            held,
        )

    def find(self, name: str) -> Snapshot | None:
        """The snapshot ``name``, or ``None``."""
        row = self._db.execute("SELECT * FROM snapshots WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._row(row)

    def get(self, name: str) -> Snapshot:
        """The snapshot ``name``. :raises NotFound: there is none."""
        found = self.find(name)
        if found is None:
            raise NotFound(f"snapshot {name!r}: does not exist")
        return found

    def all(self) -> Iterator[Snapshot]:
        """Every snapshot, by name."""
        for row in self._db.execute("SELECT * FROM snapshots ORDER BY name").fetchall():
            yield self._row(row)

    def children(self, name: str) -> list[str]:
        """The names of the snapshots whose parent is ``name``."""
        rows = self._db.execute("SELECT name FROM snapshots WHERE parent = ?", (name,))
        return [row[0] for row in rows.fetchall()]

    def users_of_layer(self, layer: str) -> list[str]:
        """The names whose files are layer ``layer``."""
        rows = self._db.execute("SELECT name FROM snapshots WHERE layer = ?", (layer,))
        return [row[0] for row in rows.fetchall()]

    def add(self, snapshot: Snapshot) -> None:
        """Record ``snapshot``. :raises AlreadyExists: its name is taken."""
        try:
            self._db.execute(
                "INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    snapshot.name,
                    snapshot.kind.value,
                    snapshot.parent,
                    snapshot.layer,
                    int(snapshot.owned),
                    json.dumps(dict(snapshot.labels), sort_keys=True),
                    snapshot.created.isoformat(),
                    snapshot.updated.isoformat(),
                    snapshot.held,
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"snapshot {snapshot.name!r}: already exists") from exc

    def replace(self, old: str, new: Snapshot) -> None:
        """Remove ``old`` and record ``new`` in one transaction (a commit: the active
        snapshot's name goes, the committed one's comes)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("DELETE FROM snapshots WHERE name = ?", (old,))
            self._db.execute("DELETE FROM pending_commits WHERE key = ?", (old,))
            self.add(new)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def update(self, name: str, labels: Mapping[str, str], updated: datetime) -> None:
        """Set the labels and the updated time of ``name``."""
        self._db.execute(
            "UPDATE snapshots SET labels = ?, updated = ? WHERE name = ?",
            (json.dumps(dict(labels), sort_keys=True), updated.isoformat(), name),
        )

    def set_held(self, name: str, held: str | None) -> None:
        """Record the layer the store keeps mounted for ``name`` (``None``: none)."""
        self._db.execute("UPDATE snapshots SET held = ? WHERE name = ?", (held, name))

    def remove(self, name: str) -> None:
        """Forget ``name``."""
        self._db.execute("DELETE FROM snapshots WHERE name = ?", (name,))

    def owned_layers(self) -> set[str]:
        """Every layer the snapshotter made that a name still uses."""
        rows = self._db.execute("SELECT DISTINCT layer FROM snapshots WHERE owned = 1")
        return {row[0] for row in rows.fetchall()}

    def mark_unused(self, layer: str) -> None:
        """Remember that layer ``layer`` is the snapshotter's and no name uses it."""
        self._db.execute("INSERT OR IGNORE INTO unused_layers VALUES (?)", (layer,))

    def unused_layers(self) -> list[str]:
        """The layers :meth:`mark_unused` remembers."""
        return [row[0] for row in self._db.execute("SELECT layer FROM unused_layers")]

    def forget_unused(self, layer: str) -> None:
        """Layer ``layer`` is gone (or used again)."""
        self._db.execute("DELETE FROM unused_layers WHERE layer = ?", (layer,))

    def begin_commit(self, key: str, name: str, storage: str, labels: Mapping[str, str]) -> None:
        """Remember that ``key`` (whose layer's storage id is ``storage``) is being committed
        as ``name``; :meth:`replace` forgets it."""
        self._db.execute(
            "INSERT OR REPLACE INTO pending_commits VALUES (?, ?, ?, ?)",
            (key, name, storage, json.dumps(dict(labels), sort_keys=True)),
        )

    def pending_commits(self) -> list[tuple[str, str, str, dict[str, str]]]:
        """The commits begun and not recorded: ``(key, name, storage id, labels)``."""
        rows = self._db.execute("SELECT key, name, storage, labels FROM pending_commits")
        return [(k, n, s, json.loads(labels)) for k, n, s, labels in rows.fetchall()]

    def end_commit(self, key: str) -> None:
        """Forget the pending commit of ``key`` (it failed, or was recorded)."""
        self._db.execute("DELETE FROM pending_commits WHERE key = ?", (key,))
