"""The btrfs driver. Not implemented yet (issue 4): it registers, and its probe says so."""

from __future__ import annotations

from laminae import DriverRegistry, hookimpl

from .._pending import PendingDriver


class BtrfsDriver(PendingDriver):
    name = "btrfs"
    issue = 4


@hookimpl
def laminae_register_drivers(register: DriverRegistry) -> None:
    register(BtrfsDriver, priority=20)
