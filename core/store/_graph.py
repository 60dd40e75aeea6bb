"""The layer graph in SQLite: layers, names, labels, images and containers.

One file, ``graph.db`` in the store root, in WAL mode so readers never wait for a writer.
Every change runs in one transaction (``BEGIN IMMEDIATE``) while the store lock is held; this
module does no locking of its own and knows nothing of drivers.

Every statement goes through one boundary, :func:`map_sqlite_errors`, so that no
``sqlite3`` exception leaves this module: a damaged file is a :class:`CorruptLayer` naming
``graph.db``, a full disk a :class:`ResourceExhausted`, and so on.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, final

import attrs

from laminae._exceptions import (
    AlreadyExists,
    CorruptLayer,
    FailedPrecondition,
    LaminaeError,
    ResourceExhausted,
    map_os_errors,
)

__all__ = ["Graph", "LayerRow", "map_sqlite_errors", "now", "recorded_driver"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,
    storage_id TEXT NOT NULL UNIQUE,
    parent TEXT REFERENCES layers(id) ON UPDATE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('committed', 'active', 'view')),
    depth INTEGER NOT NULL,
    diff_id TEXT,
    digest TEXT,
    size INTEGER,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    incomplete INTEGER NOT NULL DEFAULT 0,
    mount_count INTEGER NOT NULL DEFAULT 0,
    mount_point TEXT
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
CREATE TABLE IF NOT EXISTS layer_names (
    name TEXT PRIMARY KEY,
    layer TEXT NOT NULL REFERENCES layers(id) ON DELETE CASCADE ON UPDATE CASCADE
);
CREATE INDEX IF NOT EXISTS layer_names_layer ON layer_names(layer);
CREATE TABLE IF NOT EXISTS labels (
    layer TEXT NOT NULL REFERENCES layers(id) ON DELETE CASCADE ON UPDATE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (layer, key)
);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    top_layer TEXT REFERENCES layers(id) ON UPDATE CASCADE,
    manifest_digest TEXT,
    config BLOB,
    created TEXT NOT NULL,
    manifest BLOB
);
CREATE TABLE IF NOT EXISTS image_names (
    name TEXT PRIMARY KEY,
    image TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS containers (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    image TEXT REFERENCES images(id),
    layer TEXT NOT NULL REFERENCES layers(id) ON UPDATE CASCADE,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    id TEXT PRIMARY KEY,
    operation TEXT NOT NULL,
    collect TEXT NOT NULL,
    created TEXT NOT NULL
);
"""


# SQLite's primary result codes (https://sqlite.org/rescode.html), the low byte of
# ``sqlite_errorcode``; the extended codes add detail in the high bits.
_SQLITE_FULL = 13
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_CONSTRAINT_PRIMARYKEY = 1555
_SQLITE_CONSTRAINT_UNIQUE = 2067


@contextlib.contextmanager
def map_sqlite_errors(path: Path) -> Iterator[None]:
    """Translate a ``sqlite3`` error raised inside the block into the laminae tree.

    The message names the graph file, since a user who sees "database disk image is
    malformed" must learn which file is damaged. The original stays reachable as
    ``__cause__``.

    :param path: the graph file.
    :raises CorruptLayer: the file is damaged or is not a database.
    :raises ResourceExhausted: the filesystem is full.
    :raises AlreadyExists: a row with the same key exists (two writers raced).
    :raises FailedPrecondition: another constraint failed, or the graph is closed.
    :raises LaminaeError: any other SQLite error (I/O, permissions, a lock held too long).
    """
    try:
        yield
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        primary = None if code is None else code & 0xFF
        message = f"graph {path}: {exc}"
        if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            raise CorruptLayer(
                f"{message}; the store's graph.db is damaged: restore it from a backup"
            ) from exc
        if primary == _SQLITE_FULL:
            raise ResourceExhausted(message) from exc
        if code in (_SQLITE_CONSTRAINT_PRIMARYKEY, _SQLITE_CONSTRAINT_UNIQUE):
            raise AlreadyExists(message) from exc
        if isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError):
            raise FailedPrecondition(message) from exc
        raise LaminaeError(message) from exc


def recorded_driver(path: Path) -> str | None:
    """The driver the graph file at ``path`` records, read without writing anything.

    For ``laminae drivers``, which must not create or change a store. SQLite opening a WAL
    database read-only makes its ``-wal`` and ``-shm`` files when they are missing, which they
    are once the last writer closed it, having checkpointed the WAL into the file: so without
    a ``-wal`` the file is read as immutable, and with one (a store open now) read-only.

    :returns: ``None`` when there is no graph, an empty one (a new store), or no driver in it.
    :raises LaminaeError: the file cannot be read (as :func:`map_sqlite_errors` says, or
        :func:`map_os_errors`: a root this user may not enter).
    """
    with map_os_errors(f"read graph {path}"):
        try:
            size = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None
    if size == 0:
        return None
    live = path.with_name(path.name + "-wal").exists()
    uri = f"{path.absolute().as_uri()}?{'mode=ro' if live else 'immutable=1'}"
    with map_sqlite_errors(path):
        db = sqlite3.connect(uri, uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'driver'").fetchone()
        finally:
            db.close()
    return None if row is None else str(row[0])


def now() -> str:
    """The current time as the graph stores it: ISO 8601, UTC, microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


@attrs.frozen
class LayerRow:
    """A ``layers`` row as stored."""

    id: str
    storage_id: str
    parent: str | None
    kind: str
    depth: int
    diff_id: str | None
    digest: str | None
    size: int | None
    created: str
    updated: str
    incomplete: bool
    mount_count: int
    mount_point: str | None


_LAYER_COLUMNS = ", ".join(f.name for f in attrs.fields(LayerRow))


def _layer(row: sqlite3.Row | None) -> LayerRow | None:
    if row is None:
        return None
    values = dict(row)
    values["incomplete"] = bool(values["incomplete"])
    return LayerRow(**values)


@final
class Graph:
    """The store's graph database. Methods read or write; :meth:`transaction` groups writes."""

    __slots__ = ("_db", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        with map_sqlite_errors(path):
            self._db = self._open(path)
        try:
            with map_sqlite_errors(path):
                self._prepare()
        except BaseException:
            self._db.close()
            raise

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), never implied.
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        db.row_factory = sqlite3.Row
        return db

    def _prepare(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # FULL: a committed layer's row must survive a power cut once commit returns.
        self._db.execute("PRAGMA synchronous=FULL")
        # executescript commits on its own; the statements are idempotent (IF NOT EXISTS).
        self._db.executescript(_SCHEMA)
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(images)")}
        if "manifest" not in columns:  # a store made before images kept their manifest
            self._db.execute("ALTER TABLE images ADD COLUMN manifest BLOB")
        with self.transaction():
            if self.meta("schema") is None:
                self.set_meta("schema", str(SCHEMA_VERSION))
            # The store's identity, which its claims on mounts carry. A ``meta`` row, so a
            # store made before stores had one gets one here and older readers ignore it.
            if self.meta("store_id") is None:
                self.set_meta("store_id", secrets.token_hex(16))

    def close(self) -> None:
        with map_sqlite_errors(self.path):
            self._db.close()

    def integrity_problems(self) -> list[str]:
        """What SQLite's own integrity check finds wrong with the file; empty if nothing.

        ``quick_check``: it reads every page and checks the b-trees and records, but skips the
        index-against-table comparison of ``integrity_check``, which takes far longer on a
        large graph and finds nothing a damaged page would not show first.
        """
        try:
            with map_sqlite_errors(self.path):
                rows = self._db.execute("PRAGMA quick_check").fetchall()
        except CorruptLayer as exc:  # damage bad enough that the check itself cannot run
            return [str(exc.__cause__)]
        lines = [str(r[0]) for r in rows]
        return [] if lines == ["ok"] else lines

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block as one transaction; an exception rolls everything back."""
        if self._db.in_transaction:
            yield
            return
        self._run("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            # A damaged file may fail the rollback too; the first error is the one to see.
            with contextlib.suppress(LaminaeError):
                self._run("ROLLBACK")
            raise
        self._run("COMMIT")

    # Every statement goes through these three, inside the one translation boundary.

    def _run(self, sql: str, args: Sequence[Any] = ()) -> None:
        with map_sqlite_errors(self.path):
            self._db.execute(sql, args)

    def _one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        with map_sqlite_errors(self.path):
            row: sqlite3.Row | None = self._db.execute(sql, args).fetchone()
        return row

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with map_sqlite_errors(self.path):
            return self._db.execute(sql, args).fetchall()

    # -- meta ------------------------------------------------------------------------------

    @property
    def store_id(self) -> str:
        """The store's random identity, made with the graph and never changed."""
        value = self.meta("store_id")
        assert value is not None  # set in __init__
        return value

    def meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        self._run(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- layers ----------------------------------------------------------------------------

    def insert_layer(self, row: LayerRow) -> None:
        values = attrs.asdict(row)
        values["incomplete"] = int(row.incomplete)
        marks = ", ".join("?" for _ in values)
        self._run(f"INSERT INTO layers ({_LAYER_COLUMNS}) VALUES ({marks})", tuple(values.values()))

    def layer(self, layer_id: str) -> LayerRow | None:
        return _layer(self._one(f"SELECT {_LAYER_COLUMNS} FROM layers WHERE id = ?", (layer_id,)))

    def layer_by_storage(self, storage_id: str) -> LayerRow | None:
        return _layer(
            self._one(f"SELECT {_LAYER_COLUMNS} FROM layers WHERE storage_id = ?", (storage_id,))
        )

    def all_layers(self, kind: str | None = None) -> list[LayerRow]:
        if kind is None:
            rows = self._all(f"SELECT {_LAYER_COLUMNS} FROM layers ORDER BY created, id")
        else:
            rows = self._all(
                f"SELECT {_LAYER_COLUMNS} FROM layers WHERE kind = ? ORDER BY created, id", (kind,)
            )
        return [r for r in map(_layer, rows) if r is not None]

    def update_layer(self, layer_id: str, **fields: Any) -> None:
        if "incomplete" in fields:
            fields["incomplete"] = int(fields["incomplete"])
        fields.setdefault("updated", now())
        sets = ", ".join(f"{name} = ?" for name in fields)
        self._run(f"UPDATE layers SET {sets} WHERE id = ?", (*fields.values(), layer_id))

    def delete_layer(self, layer_id: str) -> None:
        self._run("DELETE FROM layers WHERE id = ?", (layer_id,))

    def chain(self, layer_id: str) -> list[LayerRow]:
        """The layer and its parents, the layer first, the base last."""
        rows = self._all(
            f"""WITH RECURSIVE chain(id, n) AS (
                    SELECT ?, 0
                    UNION ALL
                    SELECT layers.parent, chain.n + 1 FROM layers JOIN chain ON layers.id = chain.id
                    WHERE layers.parent IS NOT NULL
                )
                SELECT {", ".join("layers." + c for c in _LAYER_COLUMNS.split(", "))}
                FROM chain JOIN layers ON layers.id = chain.id ORDER BY chain.n""",
            (layer_id,),
        )
        return [r for r in map(_layer, rows) if r is not None]

    def children(self, layer_id: str) -> list[str]:
        return [r["id"] for r in self._all("SELECT id FROM layers WHERE parent = ?", (layer_id,))]

    def match_prefix(self, prefix: str) -> list[str]:
        """Layer ids starting with ``prefix`` (``sha256:`` optional for committed ids)."""
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self._all(
            "SELECT id FROM layers WHERE id LIKE ? ESCAPE '\\' OR id LIKE ? ESCAPE '\\' LIMIT 2",
            (escaped + "%", "sha256:" + escaped + "%"),
        )
        return [r["id"] for r in rows]

    # -- names and labels ------------------------------------------------------------------

    def layer_for_name(self, name: str) -> str | None:
        row = self._one("SELECT layer FROM layer_names WHERE name = ?", (name,))
        return None if row is None else str(row["layer"])

    def names(self, layer_id: str) -> tuple[str, ...]:
        rows = self._all("SELECT name FROM layer_names WHERE layer = ? ORDER BY name", (layer_id,))
        return tuple(r["name"] for r in rows)

    def add_name(self, layer_id: str, name: str) -> None:
        self._run("INSERT INTO layer_names (name, layer) VALUES (?, ?)", (name, layer_id))

    def remove_name(self, name: str) -> None:
        self._run("DELETE FROM layer_names WHERE name = ?", (name,))

    def labels(self, layer_id: str) -> dict[str, str]:
        rows = self._all("SELECT key, value FROM labels WHERE layer = ? ORDER BY key", (layer_id,))
        return {r["key"]: r["value"] for r in rows}

    def set_labels(self, layer_id: str, labels: Mapping[str, str]) -> None:
        self._run("DELETE FROM labels WHERE layer = ?", (layer_id,))
        with map_sqlite_errors(self.path):
            self._db.executemany(
                "INSERT INTO labels (layer, key, value) VALUES (?, ?, ?)",
                [(layer_id, k, v) for k, v in labels.items()],
            )

    # -- images and containers -------------------------------------------------------------

    def insert_image(
        self,
        image_id: str,
        top_layer: str | None,
        manifest_digest: str | None,
        config: bytes | None,
        manifest: bytes | None = None,
    ) -> None:
        self._run(
            "INSERT INTO images (id, top_layer, manifest_digest, config, manifest, created) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (image_id, top_layer, manifest_digest, config, manifest, now()),
        )

    def match_image_prefix(self, prefix: str) -> list[str]:
        """Image ids starting with ``prefix`` (``sha256:`` optional)."""
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self._all(
            "SELECT id FROM images WHERE id LIKE ? ESCAPE '\\' OR id LIKE ? ESCAPE '\\' LIMIT 2",
            (escaped + "%", "sha256:" + escaped + "%"),
        )
        return [r["id"] for r in rows]

    def remove_image_name(self, name: str) -> None:
        self._run("DELETE FROM image_names WHERE name = ?", (name,))

    def image(self, image_id: str) -> sqlite3.Row | None:
        return self._one("SELECT * FROM images WHERE id = ?", (image_id,))

    def all_images(self) -> list[sqlite3.Row]:
        return self._all("SELECT * FROM images ORDER BY created, id")

    def image_names(self, image_id: str) -> tuple[str, ...]:
        rows = self._all("SELECT name FROM image_names WHERE image = ? ORDER BY name", (image_id,))
        return tuple(r["name"] for r in rows)

    def image_for_name(self, name: str) -> str | None:
        row = self._one("SELECT image FROM image_names WHERE name = ?", (name,))
        return None if row is None else str(row["image"])

    def add_image_name(self, image_id: str, name: str) -> None:
        # A name moves to the newest image that claims it, as `docker tag` does.
        self._run(
            "INSERT INTO image_names (name, image) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET image = excluded.image",
            (name, image_id),
        )

    def delete_image(self, image_id: str) -> None:
        self._run("DELETE FROM images WHERE id = ?", (image_id,))

    def images_using_layer(self, layer_id: str) -> list[str]:
        rows = self._all("SELECT id FROM images WHERE top_layer = ?", (layer_id,))
        return [r["id"] for r in rows]

    def insert_container(
        self, container_id: str, name: str | None, image: str | None, layer: str
    ) -> None:
        self._run(
            "INSERT INTO containers (id, name, image, layer, created) VALUES (?, ?, ?, ?, ?)",
            (container_id, name, image, layer, now()),
        )

    def container(self, container_id: str) -> sqlite3.Row | None:
        return self._one("SELECT * FROM containers WHERE id = ?", (container_id,))

    def container_for_name(self, name: str) -> str | None:
        row = self._one("SELECT id FROM containers WHERE name = ?", (name,))
        return None if row is None else str(row["id"])

    def all_containers(self) -> list[sqlite3.Row]:
        return self._all("SELECT * FROM containers ORDER BY created, id")

    def containers_using(self, *, layer: str | None = None, image: str | None = None) -> list[str]:
        if layer is not None:
            rows = self._all("SELECT id FROM containers WHERE layer = ?", (layer,))
        else:
            rows = self._all("SELECT id FROM containers WHERE image = ?", (image,))
        return [r["id"] for r in rows]

    def delete_container(self, container_id: str) -> None:
        self._run("DELETE FROM containers WHERE id = ?", (container_id,))

    # -- the journal of operations in two steps ---------------------------------------------

    def insert_pending(self, pending_id: str, operation: str, collect: str) -> None:
        self._run(
            "INSERT INTO pending (id, operation, collect, created) VALUES (?, ?, ?, ?)",
            (pending_id, operation, collect, now()),
        )

    def all_pending(self) -> list[tuple[str, str, str]]:
        """Every journal entry as ``(id, operation, layer to collect)``, oldest first."""
        rows = self._all("SELECT id, operation, collect FROM pending ORDER BY created, id")
        return [(r["id"], r["operation"], r["collect"]) for r in rows]

    def pass_pending_down(self, layer_id: str, parent: str | None) -> None:
        """``layer_id`` is removed: journal entries that would collect it collect its parent
        instead (or nothing, for a base layer), so a collection killed half way down a chain
        is finished from where it stopped."""
        if parent is None:
            self._run("DELETE FROM pending WHERE collect = ?", (layer_id,))
        else:
            self._run("UPDATE pending SET collect = ? WHERE collect = ?", (parent, layer_id))

    def delete_pending(self, pending_id: str) -> None:
        self._run("DELETE FROM pending WHERE id = ?", (pending_id,))

    def unreferenced_layers(self) -> list[str]:
        """Complete committed layers that no child layer, image, container, name or mount
        holds, oldest first."""
        rows = self._all(
            """SELECT id FROM layers AS l
               WHERE kind = 'committed' AND incomplete = 0 AND mount_count = 0
                 AND NOT EXISTS (SELECT 1 FROM layers AS c WHERE c.parent = l.id)
                 AND NOT EXISTS (SELECT 1 FROM images WHERE top_layer = l.id)
                 AND NOT EXISTS (SELECT 1 FROM containers WHERE layer = l.id)
                 AND NOT EXISTS (SELECT 1 FROM layer_names WHERE layer = l.id)
               ORDER BY created, id"""
        )
        return [r["id"] for r in rows]

    def counts(self) -> tuple[int, int, int]:
        row = self._one(
            "SELECT (SELECT count(*) FROM layers), (SELECT count(*) FROM images), "
            "(SELECT count(*) FROM containers)"
        )
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])
