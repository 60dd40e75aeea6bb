"""laminae.driverkit, the toolkit for driver authors: its surface, its cost, and the checks it
holds for every driver (storage ids, sizes)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

import laminae
from laminae import driverkit
from laminae._config import load_config
from laminae.drivers.btrfs import BtrfsDriver
from laminae.drivers.overlay import OverlayDriver
from laminae.drivers.vfs import VfsDriver


def test_all_lists_exactly_the_public_names() -> None:
    # Names load on first use: every name of __all__ resolves, and once all have, the
    # namespace holds no other public name.
    assert sorted(driverkit.__all__) == sorted(driverkit._HOMES)
    for name in driverkit.__all__:
        getattr(driverkit, name)
    public = {
        name
        for name, value in vars(driverkit).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(driverkit.__all__) == public
    assert len(driverkit.__all__) == len(public)


def test_public_names_come_from_underscored_modules() -> None:
    for name in driverkit.__all__:
        module = getattr(getattr(driverkit, name), "__module__", None)
        if module is not None and module != "pluggy":  # constants have none; hookimpl: pluggy
            assert module.rpartition(".")[2].startswith("_"), (name, module)


def test_importing_it_loads_no_images_store_or_http_client() -> None:
    code = (
        "import sys, laminae.driverkit; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('httpx', 'rich') or m.startswith(('laminae.images', 'laminae.store', "
        "'laminae.containers', 'laminae.cli', 'laminae.kernel._btrfs')))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == []


def test_btrfs_is_a_namespace_of_its_own() -> None:
    from laminae.driverkit import btrfs

    assert "create_snapshot" in btrfs.__all__
    assert all(not name.startswith("_") for name in btrfs.__all__)
    assert not set(btrfs.__all__) & set(driverkit.__all__)


# --- storage ids -------------------------------------------------------------------------------


@pytest.mark.parametrize("id", ["0", "a1", "0123456789abcdef", "f" * 32, "e" * 128])
def test_storage_ids_are_hex(id: str) -> None:
    assert driverkit.is_storage_id(id)
    driverkit.check_storage_id(id)


@pytest.mark.parametrize(
    "id",
    ["", "A1", "DEADBEEF", "../x", "..", "a/b", "-x", "tmp-a1", "a_b", "g", "a\n", " a", "e" * 129],
)
def test_what_is_not_a_storage_id_is_refused_by_name(id: str) -> None:
    assert not driverkit.is_storage_id(id)
    with pytest.raises(driverkit.InvalidArgument, match="invalid storage id") as info:
        driverkit.check_storage_id(id)
    assert repr(id) in str(info.value)


@pytest.mark.parametrize("driver", [VfsDriver, OverlayDriver, BtrfsDriver])
def test_every_builtin_driver_refuses_an_id_the_contract_does_not_allow(
    driver: type[VfsDriver | OverlayDriver | BtrfsDriver], tmp_path: Path
) -> None:
    # Only what check_storage_id refuses: no driver needs its own check, nor may it be laxer.
    instance = object.__new__(driver)  # no probe, no home: the check comes before either
    for method in (instance.remove, instance.usage):
        with pytest.raises(driverkit.InvalidArgument, match=r"invalid storage id 'UP'"):
            method("UP")


def test_the_store_makes_storage_ids_the_contract_allows(tmp_path: Path) -> None:
    with laminae.open_store(tmp_path / "root", runroot=tmp_path / "run", driver="vfs") as store:
        ids = [store.create_layer(f"layer-{n}").storage_id for n in range(3)]
    assert all(driverkit.is_storage_id(id) for id in ids), ids
    assert len(set(ids)) == 3


# --- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"), [("4096", 4096), ("64G", 64 << 30), ("64GiB", 64 << 30), ("2m", 2 << 20)]
)
def test_parse_size(text: str, size: int) -> None:
    assert driverkit.parse_size(text) == size


def test_a_fractional_size_is_refused_everywhere(tmp_path: Path) -> None:
    """A fractional size is none: not to the parser, in storage.toml or in a driver option."""
    with pytest.raises(driverkit.InvalidArgument, match=r"1\.5G"):
        driverkit.parse_size("1.5G")
    config = tmp_path / "storage.toml"
    config.write_text('[storage.limits]\nmax_bytes = "1.5G"\n')
    with pytest.raises(driverkit.InvalidArgument, match=r"1\.5G"):
        load_config(config, environ={})
    with pytest.raises(driverkit.InvalidArgument, match=r"1\.5G"):
        BtrfsDriver.probe(tmp_path, {"size": "1.5G"})
