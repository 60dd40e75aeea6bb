"""The vfs driver: layers as full copies in plain directories; runs anywhere, needs no root."""

from __future__ import annotations

from laminae.driverkit import DriverRegistry, hookimpl

from ._driver import VfsDriver

__all__ = ["VfsDriver", "laminae_register_drivers"]


@hookimpl
def laminae_register_drivers(register: DriverRegistry) -> None:
    register(VfsDriver, priority=10)
