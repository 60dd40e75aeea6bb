"""The overlay driver: layers as overlayfs layer dirs, stacked up to the kernel's 500 lowers,
applied without mounting and diffed from their upper dir alone; rootless in a user namespace."""

from __future__ import annotations

from laminae.driverkit import DriverRegistry, hookimpl

from ._driver import OverlayDriver

__all__ = ["OverlayDriver", "laminae_register_drivers"]


@hookimpl
def laminae_register_drivers(register: DriverRegistry) -> None:
    register(OverlayDriver, priority=30)
