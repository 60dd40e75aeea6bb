"""laminae-blockfile: a laminae storage driver keeping every layer in an ext4 image file.

Installed, it registers the driver ``blockfile`` through the ``laminae.drivers`` entry
point; select it with ``laminae --driver blockfile`` or ``driver = "blockfile"`` in
``storage.toml``. See :mod:`laminae_blockfile._driver` for how it lays layers out. It is
written as any third-party driver can be: against :mod:`laminae.driverkit` alone.
"""

from __future__ import annotations

from laminae.driverkit import DriverRegistry, hookimpl

from ._driver import DEFAULT_SIZE, BlockfileDriver, BlockfileOptions, parse_options
from ._size import layer_size

__all__ = [
    "DEFAULT_SIZE",
    "BlockfileDriver",
    "BlockfileOptions",
    "laminae_register_drivers",
    "layer_size",
    "parse_options",
]


@hookimpl
def laminae_register_drivers(register: DriverRegistry) -> None:
    """Register :class:`BlockfileDriver`, below the built-in drivers in auto-selection.

    A priority of 5 (vfs has 10) means the store picks blockfile only when asked to by name:
    its size limit per layer is a choice a user makes, not a default to fall into.
    """
    register(BlockfileDriver, priority=5)
