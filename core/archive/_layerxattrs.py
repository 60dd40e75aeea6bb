"""The xattrs of a layer's files: which are content, and how the applier sets them.

Every xattr in a layer tar is content, ``trusted.*`` included, except overlayfs's own
(``trusted.overlay.*``, and ``user.overlay.*`` where overlayfs is mounted with ``userxattr``):
``redirect``, ``metacopy``, ``opaque``... are overlayfs's bookkeeping, and a forged one would let
a layer alias or hide content of other layers, so a tar that carries one is refused
(:func:`check_xattr_names`). The applier writes the opaque flag itself, where the layer's own
markers ask for it (:mod:`laminae.archive._whiteouts`).

Setting them follows the kernel's rules: ``chown`` clears ``security.capability``, so it is set
after the owner and last of all; ``user.*`` exists only on regular files and directories.

Used by the applier (:mod:`laminae.archive._apply`) and the detached apply
(:mod:`laminae.archive._overlayformat`).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import Final

from laminae._exceptions import InvalidArgument, Unsupported
from laminae.archive._tarheader import printable
from laminae.kernel._xattrs import set_xattr

__all__ = ["check_xattr_names", "is_overlay_xattr", "set_layer_xattr", "set_layer_xattrs"]

_OVERLAY_PREFIXES: Final = (b"trusted.overlay.", b"user.overlay.")
_CAPABILITY: Final = b"security.capability"


def is_overlay_xattr(name: bytes) -> bool:
    """Whether xattr ``name`` is overlayfs's own (``trusted.overlay.*``, ``user.overlay.*``)."""
    return name.startswith(_OVERLAY_PREFIXES)


def check_xattr_names(names: Iterable[bytes]) -> None:
    """Refuse overlayfs's own attributes in a layer tar: a forged one could hide or alias
    other layers.

    :raises InvalidArgument: one of ``names`` is overlayfs's.
    """
    for name in names:
        if is_overlay_xattr(name):
            raise InvalidArgument(
                f"xattr '{printable(name)}' is overlayfs's own bookkeeping; a layer may not "
                "carry it"
            )


def set_layer_xattrs(target: str | int, xattrs: dict[bytes, bytes], regular_or_dir: bool) -> None:
    """Set ``xattrs`` on ``target``, ``security.capability`` last (``chown`` clears it).

    overlayfs's own attributes are left out (a layer tar carrying one is refused before).

    :param target: an fd, or a path that is not followed (``/proc/self/fd/N/name``).
    :param regular_or_dir: whether ``target`` is a regular file or a directory; ``user.*``
        xattrs are left out of anything else, where the kernel refuses them.
    :raises Unsupported: the filesystem does not support one of them.
    """
    capability = None
    for name, value in sorted(xattrs.items()):
        if is_overlay_xattr(name):
            continue
        if name == _CAPABILITY:
            capability = value
            continue
        if name.startswith(b"user.") and not regular_or_dir:
            # The kernel allows user.* only on regular files and directories.
            continue
        set_layer_xattr(target, name, value)
    if capability is not None:
        set_layer_xattr(target, _CAPABILITY, capability)


def set_layer_xattr(target: str | int, name: bytes, value: bytes) -> None:
    """Set one xattr on ``target``.

    :raises Unsupported: the filesystem does not support xattrs (of that namespace).
    """
    try:
        set_xattr(target, name, value)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise Unsupported(
                f"xattr '{printable(name)}': not supported by the target filesystem"
            ) from exc
        raise
