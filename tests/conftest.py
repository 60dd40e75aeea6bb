"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from laminae.drivers.btrfs import loop_btrfs

# The registry fixtures (Debian's docker-registry, plain, htpasswd, token, TLS), for every
# module; loaded here, before any module imports the helpers, so pytest rewrites its asserts.
pytest_plugins = ["registryserver"]


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[Path]:
    """The root of a fresh loop-mounted btrfs, unmounted and detached after the test."""
    base = tmp_path / "btrfs-fs"
    base.mkdir()
    with loop_btrfs(base) as home:
        yield home.parent
