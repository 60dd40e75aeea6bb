"""The graph, ``graph.db``, checked and never silently lost.

Each test damages the real graph of a vfs store that holds a committed layer (garbage written
in the middle, the file truncated, deleted or emptied) and opens, checks or repairs it, through
the API and through ``laminae`` in click's runner. What must hold: the error is a laminae
error naming ``graph.db`` (never a bare ``sqlite3`` error), ``check`` reports the damage and
exits non-zero, and no layer data is ever removed.
"""

from __future__ import annotations

import io
import os
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from tarbuild import make_tar

import laminae
from laminae.cli._main import cli
from laminae.store._graph import Graph

BASE_TAR = make_tar({"etc/hostname": b"box\n"}, dirs=("etc",))


@pytest.fixture(autouse=True)
def _environment(clean_environment: None) -> None:
    """Every test here runs in conftest's clean environment."""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A closed vfs store holding one committed layer, its WAL checkpointed into graph.db."""
    path = tmp_path / "root"
    with laminae.open_store(path, runroot=tmp_path / "run", driver="vfs") as store:
        store.apply_layer(io.BytesIO(BASE_TAR), names=["base"])
    assert not path.joinpath("graph.db-wal").exists()
    return path


def layer_data(root: Path) -> list[Path]:
    """Every file under the vfs home and the tar-split records: what must never be lost."""
    return sorted(p for d in ("vfs", "tar-split") for p in (root / d).rglob("*") if p.is_file())


def open_store(root: Path) -> laminae.Store:
    return laminae.open_store(root, runroot=root.parent / "run", driver="vfs")


def invoke(root: Path, *args: str) -> Result:
    config = root.parent / "storage.toml"
    config.write_text("")
    options = ["--config", str(config), "--root", str(root), "--runroot", str(root.parent / "run")]
    return CliRunner().invoke(cli, [*options, "--driver", "vfs", *args])


def garble_middle(graph: Path) -> None:
    """8 KiB of garbage in the middle of the file, on page boundaries: two pages lost."""
    size = graph.stat().st_size
    assert size >= 4 * 4096, size
    offset = (size // 2) // 4096 * 4096
    with graph.open("r+b") as f:
        f.seek(offset)
        f.write(bytes(range(256)) * 32)


def test_garbage_in_the_middle_is_reported_by_check(root: Path) -> None:
    before = layer_data(root)
    garble_middle(root / "graph.db")
    result = invoke(root, "check")
    assert result.exit_code != 0, result.output
    assert "graph.db" in result.output
    assert "damaged" in result.output or "malformed" in result.output
    assert "Traceback" not in result.output
    assert "restore graph.db from a backup" in result.output  # not "laminae repair fixes them"
    # repair must refuse rather than act on what a damaged graph says
    repaired = invoke(root, "repair")
    assert repaired.exit_code != 0
    assert "graph.db" in repaired.output
    assert layer_data(root) == before


def test_check_reports_damage_in_the_report(root: Path) -> None:
    before = layer_data(root)
    garble_middle(root / "graph.db")
    try:
        store = open_store(root)
    except laminae.CorruptLayer as exc:  # the schema pages were hit: the open names the file
        assert "graph.db" in str(exc)
    else:
        with store:
            report = store.check()
            assert report.graph_damage
            assert not report.ok
            assert any("graph.db is damaged" in p for p in report.problems())
            assert not report.orphan_storage
            with pytest.raises(laminae.CorruptLayer, match=r"graph\.db"):
                store.repair()
    assert layer_data(root) == before


def test_a_truncated_graph_is_a_corrupt_layer_naming_the_file(root: Path) -> None:
    before = layer_data(root)
    graph = root / "graph.db"
    os.truncate(graph, graph.stat().st_size // 2 + 100)
    with (
        pytest.raises(laminae.CorruptLayer, match=r"graph\.db") as caught,
        open_store(root) as store,
    ):
        store.check()
        store.layers()
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    result = invoke(root, "check")
    assert result.exit_code == laminae.CorruptLayer.exit_code, result.output
    assert "graph.db" in result.output
    assert layer_data(root) == before


def test_a_file_that_is_not_a_database_names_the_file(tmp_path: Path) -> None:
    graph = tmp_path / "graph.db"
    graph.write_bytes(b"not a database at all" * 400)
    with pytest.raises(laminae.CorruptLayer, match=r"graph\.db"):
        Graph(graph)


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_lost_graph_with_layers_refuses_to_open_as_new(root: Path, how: str) -> None:
    before = layer_data(root)
    graph = root / "graph.db"
    if how == "deleted":
        graph.unlink()
    else:
        graph.write_bytes(b"")
    with pytest.raises(laminae.FailedPrecondition) as caught:
        open_store(root)
    message = str(caught.value)
    assert str(root) in message
    assert "graph.db" in message
    assert "backup" in message
    for command in ("check", "repair"):
        result = invoke(root, command)
        assert result.exit_code == laminae.FailedPrecondition.exit_code, result.output
        assert "graph.db" in result.output
    assert layer_data(root) == before


def test_a_lost_graph_with_no_layers_opens_as_new(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with laminae.open_store(root, runroot=tmp_path / "run", driver="vfs"):
        pass
    (root / "graph.db").unlink()
    with open_store(root) as store:
        assert store.layers() == []
