"""A store on a shared host touches only the mounts it made.

Other stores, and users, mount things next to a store: under its run directory, under another
store's, under the default one, under its scratch directory. Opening the store, checking and
repairing it, and working with its images and containers (through the API and the command
line) must leave every such mount mounted, and its contents whole. Stores that differ only in
their root get run directories of their own, and a store refuses another's run directory.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from imagebuild import write_layout
from tarbuild import make_tar

import laminae
from laminae import images
from laminae._config import load_config
from laminae.cli._main import cli

pytestmark = pytest.mark.root

BASE = make_tar({"etc/os-release": b"ID=laminae\n", "bin/sh": b"#!shell\n"}, dirs=["etc", "bin"])


def mount_points() -> set[str]:
    """The mount points of this process's namespace, from the kernel's table."""
    with open("/proc/self/mountinfo") as table:
        return {line.split()[4] for line in table}


class Foreign:
    """Mounts made here, as another store or a user would: tmpfs and binds of a marked tree."""

    def __init__(self, tmp_path: Path) -> None:
        self.source = tmp_path / "foreign-source"
        self.source.mkdir()
        (self.source / "precious").write_bytes(b"not yours\n")
        self.points: list[Path] = []

    def bind(self, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(self.source), str(target)], check=True)
        self.points.append(target)

    def tmpfs(self, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "foreign", str(target)], check=True)
        (target / "precious").write_bytes(b"not yours\n")
        self.points.append(target)

    def assert_intact(self) -> None:
        """Every foreign mount is still mounted and still shows its file."""
        mounted = mount_points()
        missing = [str(p) for p in self.points if str(p) not in mounted]
        assert missing == [], f"foreign mounts taken away: {missing}"
        for point in self.points:
            assert (point / "precious").read_bytes() == b"not yours\n", point
        assert (self.source / "precious").read_bytes() == b"not yours\n"

    def unmount(self) -> None:
        for point in reversed(self.points):
            subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture
def foreign(tmp_path: Path) -> Iterator[Foreign]:
    made = Foreign(tmp_path)
    try:
        yield made
    finally:
        made.unmount()


@pytest.fixture
def config(tmp_path: Path) -> laminae.StoreConfig:
    """Defaults for a user whose runtime directory is in ``tmp_path``: no host path is used."""
    home = tmp_path / "home"
    home.mkdir()
    environ = {"HOME": str(home), "XDG_RUNTIME_DIR": str(tmp_path / "xdg")}
    return load_config(tmp_path / "empty.toml", environ=environ, uid=1000)


@pytest.fixture(autouse=True)
def empty_config_file(tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text("")


def surround(foreign: Foreign, tmp_path: Path, root: Path, run: Path) -> None:
    """Put foreign mounts everywhere a store of ``root`` and ``run`` might look."""
    foreign.bind(run / "mounts" / ("ab" * 32))  # looks like a storage id, is not this store's
    foreign.tmpfs(run / "mounts" / "someone-elses")
    foreign.tmpfs(run / "tmp" / "0123456789abcdef")
    (run / "tmp" / "0123456789abcdef.lock").write_text("")  # an unclaimed, anonymous claim
    foreign.bind(run / "tmp" / "fedcba9876543210")
    (run / "tmp" / "fedcba9876543210.lock").write_text("another store's id")
    foreign.bind(root / "tmp" / "scratch-lookalike")  # in the store's own scratch directory
    foreign.tmpfs(tmp_path / "other-run" / "mounts" / ("cd" * 32))
    foreign.bind(tmp_path / "other-run" / "tmp" / "00000000aaaaaaaa")
    foreign.tmpfs(tmp_path / "elsewhere")


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_open_check_repair_and_containers_leave_foreign_mounts(
    tmp_path: Path, foreign: Foreign, driver: str
) -> None:
    root, run = tmp_path / "root", tmp_path / "run"
    with laminae.open_store(root, runroot=run, driver=driver):
        pass
    surround(foreign, tmp_path, root, run)
    write_layout(tmp_path / "layout", [BASE], platform=str(images.Platform.host()))
    with laminae.open_store(root, runroot=run) as store:
        foreign.assert_intact()
        report = store.check()
        assert report.orphan_mounts == ()
        # listed as notes, so that a user who sees them under the run directory knows
        assert set(report.foreign_mounts) == {
            str(run / "mounts" / ("ab" * 32)),
            str(run / "mounts" / "someone-elses"),
            str(run / "tmp" / "0123456789abcdef"),
            str(run / "tmp" / "fedcba9876543210"),
        }, report.foreign_mounts
        assert report.ok
        assert store.repair(report).orphan_mounts == ()
        store.repair()
        foreign.assert_intact()
        store.import_image(f"oci:{tmp_path / 'layout'}:v1", names=["base"])
        container = store.create_container("base", name="web")
        where = store.mount_container("web")
        (where / "new").write_bytes(b"x")
        assert [c.path for c in store.container_changes("web")] == ["/new"]
        store.commit_container("web", "committed")
        store.unmount_container("web")
        store.remove_container(container.id)
        store.remove_image("committed")
        assert store.check().ok
        foreign.assert_intact()
    with laminae.open_store(root, runroot=run) as store:
        assert store.check().ok
    foreign.assert_intact()


def test_the_command_line_leaves_foreign_mounts(tmp_path: Path, foreign: Foreign) -> None:
    root, run = tmp_path / "root", tmp_path / "run"
    where = ["--config", str(tmp_path / "empty.toml"), "--root", str(root), "--runroot", str(run)]

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(cli, [*where, "--driver", "vfs", *args])
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return result.stdout

    invoke("info")
    surround(foreign, tmp_path, root, run)
    write_layout(tmp_path / "layout", [BASE], platform=str(images.Platform.host()))
    invoke("image", "ls")
    foreign.assert_intact()
    invoke("check")
    invoke("repair")
    foreign.assert_intact()
    invoke("image", "import", f"oci:{tmp_path / 'layout'}:v1", "--name", "base")
    container = invoke("container", "create", "--image", "base").strip()
    invoke("container", "mount", container)
    invoke("container", "ls")
    invoke("container", "unmount", container)
    invoke("container", "rm", container)
    invoke("image", "rm", "base")
    invoke("check")
    foreign.assert_intact()


def test_stores_given_only_a_root_get_run_directories_of_their_own(
    tmp_path: Path, config: laminae.StoreConfig, foreign: Foreign
) -> None:
    default = config.runroot
    assert default == tmp_path / "xdg" / "laminae"
    with laminae.open_store(config=config, driver="vfs") as store:
        assert store.runroot == default  # the default store keeps the default directory
    # The default store's run directory, in use: nothing another store does may touch it.
    surround(foreign, tmp_path, config.graphroot, default)
    with (
        laminae.open_store(tmp_path / "one", config=config, driver="vfs") as one,
        laminae.open_store(tmp_path / "two", config=config, driver="vfs") as two,
    ):
        assert len({one.runroot, two.runroot, default}) == 3
        assert one.runroot.parent == two.runroot.parent == default.parent
        # The same root by another spelling is the same store, with the same directory.
        with laminae.open_store(
            tmp_path / "x" / ".." / "one", config=config, driver="vfs"
        ) as again:
            assert again.runroot == one.runroot
        one.check()
        two.repair()
        foreign.assert_intact()
    # Stable: the next open of a root finds the same directory.
    with laminae.open_store(tmp_path / "one", config=config) as one_again:
        assert one_again.runroot == one.runroot
    with laminae.open_store(config=config) as store:
        assert store.check().orphan_mounts == ()
    foreign.assert_intact()


def test_the_command_line_with_only_root_does_not_share_a_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The documented `laminae --root /tmp/store ...`, as root: the real defaults, so the run
    # directories are made beside /run/laminae, and removed at the end.
    for name in ("LAMINAE_RUNROOT", "LAMINAE_ROOT", "LAMINAE_DRIVER"):
        monkeypatch.delenv(name, raising=False)
    runroots: list[Path] = []
    try:
        for name in ("a", "b"):
            result = CliRunner().invoke(
                cli,
                [
                    *("--config", str(tmp_path / "empty.toml"), "--root", str(tmp_path / name)),
                    *("--driver", "vfs", "info", "--json"),
                ],
            )
            assert result.exit_code == 0, result.stderr
            runroots.append(Path(json.loads(result.stdout)["runroot"]))
        assert runroots[0] != runroots[1]
        assert Path("/run/laminae") not in runroots
        assert {r.parent for r in runroots} == {Path("/run")}
    finally:
        for runroot in runroots:
            if runroot != Path("/run/laminae"):  # never the host's default store's
                shutil.rmtree(runroot, ignore_errors=True)


def test_a_run_directory_of_another_store_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with laminae.open_store(tmp_path / "first", runroot=run, driver="vfs"):
        pass
    with pytest.raises(laminae.FailedPrecondition) as refused:
        laminae.open_store(tmp_path / "second", runroot=run, driver="vfs")
    message = str(refused.value)
    assert str(tmp_path / "first") in message
    assert str(tmp_path / "second") in message
    assert str(run) in message
    # The command line says the same, and exits with the precondition's code.
    result = CliRunner().invoke(
        cli,
        [
            *("--config", str(tmp_path / "empty.toml"), "--root", str(tmp_path / "second")),
            *("--runroot", str(run), "--driver", "vfs", "info"),
        ],
    )
    assert result.exit_code == laminae.FailedPrecondition.exit_code
    assert str(tmp_path / "first") in result.stderr
    # The first store still opens; once it is gone, its run directory is free again.
    with laminae.open_store(tmp_path / "first", runroot=run):
        pass
    subprocess.run(["rm", "-r", str(tmp_path / "first")], check=True)
    with laminae.open_store(tmp_path / "second", runroot=run, driver="vfs") as second:
        assert second.runroot == run


def test_a_copy_of_a_store_does_not_share_its_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with laminae.open_store(tmp_path / "first", runroot=run, driver="vfs"):
        pass
    subprocess.run(["cp", "-a", str(tmp_path / "first"), str(tmp_path / "copy")], check=True)
    with pytest.raises(laminae.FailedPrecondition, match="a copy of this store"):
        laminae.open_store(tmp_path / "copy", runroot=run)


def test_the_stores_own_leftover_mounts_are_still_swept(tmp_path: Path, foreign: Foreign) -> None:
    root, run = tmp_path / "root", tmp_path / "run"
    with laminae.open_store(root, runroot=run, driver="vfs") as store:
        store_id = store._graph.store_id
        layer = store.create_layer("c")
    surround(foreign, tmp_path, root, run)
    # What this store's own process, killed mid-operation, leaves: a private mount whose
    # claim names the store, and a layer mount the graph never counted.
    ours = [run / "tmp" / "1111222233334444", run / "mounts" / layer.storage_id]
    for target in ours:
        target.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "leftover", str(target)], check=True)
    (run / "tmp" / "1111222233334444.lock").write_text(store_id)
    try:
        with laminae.open_store(root, runroot=run) as store:
            assert store.check().ok
        assert not {str(p) for p in ours} & mount_points()
        foreign.assert_intact()
    finally:
        for target in ours:
            subprocess.run(["umount", "-q", str(target)], check=False)


def test_a_store_made_before_stores_had_an_id_gets_one(tmp_path: Path) -> None:
    root, run = tmp_path / "root", tmp_path / "run"
    with laminae.open_store(root, runroot=run, driver="vfs") as store:
        store.create_layer("kept")
    # As an older laminae left it: no id in the graph, no marker in the run directory.
    with sqlite3.connect(root / "graph.db") as db:
        db.execute("DELETE FROM meta WHERE key = 'store_id'")
    db.close()
    (run / "laminae-store.json").unlink()
    with laminae.open_store(root, runroot=run) as store:
        store_id = store._graph.store_id
        assert [layer.id for layer in store.layers()] == ["kept"]
    marker = json.loads((run / "laminae-store.json").read_text())
    assert marker == {"id": store_id, "root": str(root)}
    with laminae.open_store(root, runroot=run) as store:
        assert store._graph.store_id == store_id
