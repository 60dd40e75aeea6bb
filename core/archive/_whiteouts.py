"""Whiteouts and opaque directories, in the two forms a layer carries them.

In an OCI layer tar (image-spec "Whiteouts"), an empty file ``.wh.<name>`` hides ``<name>`` of
the lower layers, and ``.wh..wh..opq`` hides every lower child of its directory. In an overlayfs
layer directory, a ``0:0`` character device hides a name, and the xattr
``trusted.overlay.opaque=y`` (``user.overlay.opaque`` when overlayfs is mounted with
``userxattr``, as in a user namespace) hides what is below a directory.

Read by the applier (both forms), the detached apply and what it settles against, the
changes-tar writer and the tar-split recorder (which never refers to a whiteout file by path).
"""

from __future__ import annotations

import os
import stat
from typing import Final

from laminae._exceptions import InvalidArgument
from laminae.archive._tarheader import printable

__all__ = [
    "OPAQUE_MARKER",
    "OPAQUE_XATTRS",
    "WHITEOUT_PREFIX",
    "hidden_name",
    "is_whiteout",
]

WHITEOUT_PREFIX: Final = b".wh."
"""The prefix of a whiteout file's name in a layer tar."""
OPAQUE_MARKER: Final = b".wh..wh..opq"
"""The name of the file that makes its directory opaque in a layer tar."""
OPAQUE_XATTRS: Final = {False: b"trusted.overlay.opaque", True: b"user.overlay.opaque"}
"""overlayfs's opaque flag, by whether it is mounted with ``userxattr``."""


def hidden_name(name: bytes) -> bytes:
    """The name whiteout ``name`` (``.wh.<name>``, not the opaque marker) hides.

    :raises InvalidArgument: a bare ``.wh.``, a ``.wh..wh.<other>``, or ``.`` or ``..``.
    """
    hidden = name[len(WHITEOUT_PREFIX) :]
    if not hidden or hidden in (b".", b"..") or hidden.startswith(WHITEOUT_PREFIX):
        raise InvalidArgument(f"invalid whiteout name '{printable(name)}'")
    return hidden


def is_whiteout(st: os.stat_result) -> bool:
    """Whether ``st`` is an overlayfs whiteout: a ``0:0`` character device."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
