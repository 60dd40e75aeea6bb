"""The driver registry: pluggy hooks, contract checks at registration, auto-selection."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pluggy
import pytest

import laminae
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

    @laminae.hookimpl
    def laminae_register_drivers(self, register: laminae.DriverRegistry) -> None:
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
        @laminae.hookimpl
        def laminae_register_driver(self, register: laminae.DriverRegistry) -> None: ...

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
