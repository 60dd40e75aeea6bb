"""The overlay driver. Not implemented yet (issue 3): it registers, and its probe says so."""

from __future__ import annotations

from laminae import DriverRegistry, hookimpl

from .._pending import PendingDriver


class OverlayDriver(PendingDriver):
    name = "overlay"
    issue = 3


@hookimpl
def laminae_register_drivers(register: DriverRegistry) -> None:
    register(OverlayDriver, priority=30)
