"""The overlay driver's options: ``[storage.options.overlay]`` in ``storage.toml``.

Named as containers-storage names them where the meaning is the same:

``mountopt``
    Extra overlay mount options, comma separated (``"nodev,noatime"``), added to every
    overlay mount. Options the driver sets itself are refused here: the layer dirs
    (``lowerdir``, ``upperdir``, ``workdir``...), ``userxattr`` (set in a user namespace),
    and ``index``, ``redirect_dir``, ``metacopy``, ``nfs_export``: the native changes walk
    only an upper dir, which is right only while overlayfs keeps every change there, as
    plain whiteouts and opaque flags (the kernel's Documentation/filesystems/overlayfs.rst:
    "Redirect dir", "Metadata only copy up"). ``volatile`` goes in its own option.
``volatile``
    ``"true"``: mount writable layers with ``volatile`` (no sync to disk: for throwaway
    containers, whose data a crash may lose). Committing a layer still syncs it first.

containers-storage options that have no meaning here are refused by name with the reason,
so a ``storage.conf`` copied over fails loudly instead of silently doing less.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import attrs

from laminae.driverkit import InvalidArgument

__all__ = ["OverlayOptions", "parse_options"]

# Set by the driver on every mount, or naming the layer dirs; a user value would fight it.
_DRIVER_KEYS: Final = frozenset(
    {"lowerdir", "lowerdir+", "upperdir", "workdir", "datadir+", "userxattr", "volatile"}
)
# A value other than "off" would put changes outside the upper dir (redirects, metacopy) or
# tie uppers to lowers (index), and the native changes would miss them.
_NATIVE_DIFF_KEYS: Final = frozenset({"index", "redirect_dir", "metacopy", "nfs_export"})

_NOT_HERE: Final = {
    "size": "quotas need XFS project quotas, which this driver does not manage",
    "inodes": "quotas need XFS project quotas, which this driver does not manage",
    "mount_program": "FUSE overlay (fuse-overlayfs) is not supported; kernel overlayfs is",
    "force_mask": "it needs a FUSE mount program, which this driver does not use",
    "ignore_chown_errors": "layers keep their owners exactly; map a range of ids instead",
    "skip_mount_home": "the driver never mounts its home",
    "use_composefs": "composefs is not supported",
}
_TRUE: Final = frozenset({"true", "yes", "1", "on"})
_FALSE: Final = frozenset({"false", "no", "0", "off", ""})


@attrs.frozen
class OverlayOptions:
    """The parsed options.

    :param mountopt: extra mount options, in order.
    :param volatile: mount writable layers ``volatile``.
    """

    mountopt: tuple[str, ...] = ()
    volatile: bool = False


def _mountopt(value: str) -> tuple[str, ...]:
    options = []
    for option in (part.strip() for part in value.split(",")):
        if not option:
            continue
        key, _, setting = option.partition("=")
        if key in _DRIVER_KEYS:
            raise InvalidArgument(
                f"overlay option mountopt: {option!r} is set by the driver itself"
                + (" (use the volatile option)" if key == "volatile" else "")
            )
        if key in _NATIVE_DIFF_KEYS and setting != "off":
            raise InvalidArgument(
                f"overlay option mountopt: {option!r} is refused: the driver reads a layer's "
                f"changes from its upper dir alone, which needs {key}=off (the driver sets it)"
            )
        if key not in _NATIVE_DIFF_KEYS:  # "off" is what the driver sets anyway
            options.append(option)
    return tuple(options)


def _bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidArgument(f"overlay option {key}: {value!r} is not true or false")


def parse_options(options: Mapping[str, str]) -> OverlayOptions:
    """Check and parse ``options``.

    :raises InvalidArgument: an unknown key, a key that does not apply here, or a bad value;
        the message names it.
    """
    mountopt: tuple[str, ...] = ()
    volatile = False
    for key, value in options.items():
        if not isinstance(value, str):
            raise InvalidArgument(f"overlay option {key}: {value!r} is not a string")
        if key == "mountopt":
            mountopt = _mountopt(value)
        elif key == "volatile":
            volatile = _bool(key, value)
        elif key in _NOT_HERE:
            raise InvalidArgument(f"overlay option {key}: not supported here ({_NOT_HERE[key]})")
        else:
            raise InvalidArgument(f"overlay: unknown option {key!r} (known: mountopt, volatile)")
    return OverlayOptions(mountopt, volatile)
