"""The driver registry: pluggy hooks, contract checks at registration, auto-selection, and
which drivers are loaded for a store (a built-in one alone, or every installed one)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pluggy
import pytest

import laminae
from laminae import driverkit
from laminae.driverkit import _plugins
from laminae.drivers.vfs._driver import VfsDriver


def manager_with(*plugins: object) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("laminae")
    pm.add_hookspecs(_plugins._Hooks)
    for plugin in plugins:
        pm.register(plugin)
    return pm


class Registers:
    def __init__(self, *classes: type, priority: int = 0) -> None:
        self.classes = classes
        self.priority = priority

    @driverkit.hookimpl
    def laminae_register_drivers(self, register: driverkit.DriverRegistry) -> None:
        for cls in self.classes:
            register(cls, priority=self.priority)


class Unavailable(VfsDriver):
    name = "unavailable"

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, str]) -> None:
        raise laminae.DriverUnavailable("needs a pony")


def test_registered_driver_is_listed_with_its_origin() -> None:
    drivers = _plugins.available_drivers(manager_with(Registers(VfsDriver, priority=3)))
    assert list(drivers) == ["vfs"]
    assert drivers["vfs"].priority == 3
    assert drivers["vfs"].origin.startswith("plugin ")


def test_declared_feature_must_be_implemented() -> None:
    class Liar(VfsDriver):
        name = "liar"
        capabilities = laminae.Capabilities(features={laminae.Feature.QUOTA})

    with pytest.raises(laminae.InvalidArgument, match="declares 'quota'"):
        _plugins.available_drivers(manager_with(Registers(Liar)))


def test_missing_required_method_is_named() -> None:
    class Half:
        name = "half"
        capabilities = laminae.Capabilities()

        @classmethod
        def probe(cls, home: Path, options: Mapping[str, str]) -> None: ...

    with pytest.raises(laminae.InvalidArgument, match="'create'"):
        _plugins.available_drivers(manager_with(Registers(Half)))


def test_same_name_twice_is_refused() -> None:
    with pytest.raises(laminae.InvalidArgument, match="registered twice"):
        _plugins.available_drivers(manager_with(Registers(VfsDriver), Registers(VfsDriver)))


def test_misspelt_hook_fails_loudly() -> None:
    class Typo:
        @driverkit.hookimpl
        def laminae_register_driver(self, register: driverkit.DriverRegistry) -> None: ...

    pm = manager_with(Typo())
    with pytest.raises(pluggy.PluginValidationError, match="laminae_register_driver"):
        pm.check_pending()


def test_probe_reports_the_reason() -> None:
    drivers = _plugins.available_drivers(manager_with(Registers(Unavailable, VfsDriver)))
    assert drivers["unavailable"].probe(Path("/tmp"), {}) == "needs a pony"
    assert drivers["vfs"].probe(Path("/tmp"), {}) is None


def test_auto_selection_skips_drivers_that_cannot_run(tmp_path: Path) -> None:
    drivers = {
        "unavailable": laminae.DriverEntry("unavailable", Unavailable, 99, "test"),
        "vfs": laminae.DriverEntry("vfs", VfsDriver, 1, "test"),
    }
    from laminae.store._layers import _select_driver

    assert _select_driver(drivers, tmp_path, None, None, (), {}).name == "vfs"
    with pytest.raises(laminae.DriverUnavailable, match="needs a pony"):
        _select_driver(drivers, tmp_path, None, None, ("unavailable",), {})
    with pytest.raises(laminae.DriverUnavailable, match="needs a pony"):
        _select_driver(drivers, tmp_path, "unavailable", None, (), {})


# -- which drivers are loaded ------------------------------------------------------------------


def test_built_in_name_loads_that_driver_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_scan() -> None:
        raise AssertionError("read every distribution's entry points")

    monkeypatch.setattr(importlib.metadata, "distributions", no_scan)
    monkeypatch.setattr(_plugins, "plugin_manager", no_scan)
    assert _plugins.built_in_drivers() == {"vfs", "overlay", "btrfs"}
    drivers = _plugins.find_drivers("vfs")
    assert list(drivers) == ["vfs"]
    assert drivers["vfs"].cls is VfsDriver
    monkeypatch.undo()  # the version of laminae is looked up only now
    assert drivers["vfs"].origin == f"laminae {importlib.metadata.version('laminae')}"


def test_other_names_and_auto_selection_load_every_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    class Extra(VfsDriver):
        name = "extra"

    monkeypatch.setattr(_plugins, "plugin_manager", lambda: manager_with(Registers(Extra)))
    assert list(_plugins.find_drivers("extra")) == ["extra"]
    assert list(_plugins.find_drivers(None)) == ["extra"]


THIRD_PARTY = """
from laminae import driverkit
from laminae.drivers.vfs import VfsDriver


class Mine(VfsDriver):
    name = {name!r}


@driverkit.hookimpl
def laminae_register_drivers(register):
    register(Mine, priority=100)
"""

CHECK = """
import sys
import laminae

root, run, name = sys.argv[1:]
for driver in ("vfs", name):
    try:
        with laminae.open_store(root + driver, runroot=run + driver, driver=driver) as store:
            print(driver, "opens:", store.info().driver_origin)
    except laminae.LaminaeError as exc:
        print(driver, "fails:", exc)
try:
    print("all:", sorted(laminae.available_drivers()))
except laminae.LaminaeError as exc:
    print("all fails:", exc)
"""


def third_party(tmp_path: Path, entry_point: str, name: str) -> list[str]:
    """What a process sees with distribution ``thirdparty`` installed: a module that registers
    driver ``name``, declared as ``entry_point`` of group laminae.drivers."""
    site = tmp_path / "site"
    info = site / "thirdparty-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[laminae.drivers]\n{entry_point} = thirdparty\n")
    (site / "thirdparty.py").write_text(textwrap.dedent(THIRD_PARTY.format(name=name)))
    done = subprocess.run(
        [sys.executable, "-c", CHECK, str(tmp_path / "root-"), str(tmp_path / "run-"), name],
        env={"PYTHONPATH": str(site), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


def test_third_party_driver_is_found_by_its_entry_point(tmp_path: Path) -> None:
    version = importlib.metadata.version("laminae")
    assert third_party(tmp_path, "mine", "mine") == [
        f"vfs opens: laminae {version}",
        "mine opens: thirdparty 1.0",
        "all: ['btrfs', 'mine', 'overlay', 'vfs']",
    ]


def test_third_party_driver_cannot_take_a_built_in_name(tmp_path: Path) -> None:
    # Registering a class named vfs: the registry refuses the second one. A store asking for
    # vfs by name loads laminae's alone, so it still opens with laminae's.
    lines = third_party(tmp_path, "mine", "vfs")
    assert lines[0] == f"vfs opens: laminae {importlib.metadata.version('laminae')}"
    assert "driver 'vfs' registered twice: by " in lines[2]
    assert "thirdparty 1.0" in lines[2]


def test_third_party_entry_point_cannot_take_a_built_in_name(tmp_path: Path) -> None:
    # pluggy alone would load whichever distribution came first on sys.path under that name.
    lines = third_party(tmp_path, "vfs", "vfs")
    assert lines[0] == f"vfs opens: laminae {importlib.metadata.version('laminae')}"
    assert lines[2] == (
        "all fails: thirdparty 1.0: entry point 'vfs' of group 'laminae.drivers' takes the name "
        "of a driver built into laminae; rename it"
    )


RAISING = """
from laminae import driverkit


@driverkit.hookimpl
def laminae_register_drivers(register):
    raise RuntimeError("no licence key")
"""

LISTING = """
import sys
import laminae
from laminae.cli._main import main

root, run = sys.argv[1:]
with laminae.open_store(root, runroot=run) as store:
    print("opens:", store.driver_name)
main(["--root", root, "--runroot", run, "drivers"])
"""


def test_a_plugin_whose_hook_raises_is_listed_as_broken(tmp_path: Path) -> None:
    """An installed distribution whose register hook raises: every other driver still
    works (auto-selection included), and `laminae drivers` names it with its error."""
    site = tmp_path / "site"
    info = site / "raising-2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: raising\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text("[laminae.drivers]\nraising = raising\n")
    (site / "raising.py").write_text(RAISING)
    (tmp_path / "storage.toml").write_text('[storage]\ndriver_priority = ["vfs"]\n')
    done = subprocess.run(
        [sys.executable, "-c", LISTING, str(tmp_path / "root"), str(tmp_path / "run")],
        env={
            "PYTHONPATH": str(site),
            "HOME": str(tmp_path),
            "LAMINAE_CONFIG": str(tmp_path / "storage.toml"),
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "opens: vfs"
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert rows["raising"] == [
        "raising",
        "-",
        "raising 2.0",
        "broken: laminae_register_drivers raised RuntimeError: no licence key",
        "-",
    ]
    assert rows["vfs"][3] == "ok"


def test_an_unknown_driver_in_driver_priority_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "storage.toml"
    config.write_text('[storage]\ndriver_priority = ["zfs", "vfs"]\n')
    with pytest.raises(laminae.InvalidArgument) as raised:
        laminae.open_store(
            tmp_path / "root", runroot=tmp_path / "run", config=laminae.load_config(config)
        )
    assert str(raised.value).startswith(f"{config}: storage.driver_priority: driver 'zfs'")
    assert not (tmp_path / "root").exists()
