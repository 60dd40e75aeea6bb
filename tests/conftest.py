"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import laminae
from laminae.drivers.btrfs import loop_btrfs

# The registry fixtures (Debian's docker-registry, plain, htpasswd, token, TLS), for every
# module; loaded here, before any module imports the helpers, so pytest rewrites its asserts.
pytest_plugins = ["registryserver"]


@pytest.fixture(params=["vfs", "overlay", "btrfs"])
def each_driver_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[laminae.Store]:
    """A fresh store of each built-in driver in turn (btrfs on a loop-mounted btrfs)."""
    if request.param == "btrfs":
        root = request.getfixturevalue("btrfs") / "store"
    else:
        root = tmp_path / "root"
    with laminae.open_store(root, runroot=tmp_path / "run", driver=request.param) as store:
        yield store
        for layer in store.layers():
            if layer.mount_count:
                store.unmount(layer.id, force=True)


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[Path]:
    """The root of a fresh loop-mounted btrfs, unmounted and detached after the test."""
    base = tmp_path / "btrfs-fs"
    base.mkdir()
    with loop_btrfs(base) as home:
        yield home.parent


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing of the caller's environment reaches the command under test: no LAMINAE_*, no
    registry credentials, and a home and runtime directory of the test's own."""
    for name in list(os.environ):
        if name.startswith("LAMINAE_") or name == "REGISTRY_AUTH_FILE":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg-run"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
