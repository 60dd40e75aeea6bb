"""OCI layer tars: read them safely, apply them onto a directory, write them from changes.

(Being written; the signatures below are the contract the rest of the core codes against.)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import attrs

from ._changes import Change

__all__ = ["ApplyResult", "Limits", "WhiteoutMode", "apply_tar", "write_changes_tar"]


@attrs.frozen
class Limits:
    """Bounds that make a hostile layer fail instead of filling the disk or the memory.

    :param max_bytes: decompressed bytes of one layer tar.
    :param max_entries: entries (headers) in one layer.
    :param max_path_depth: components in one path.
    :param max_path_bytes: bytes in one path or link target.
    :param max_header_bytes: bytes of one PAX or GNU long-name/long-link header, checked
        before the header is read into memory.
    :param max_xattr_bytes: bytes of one xattr value.
    """

    max_bytes: int = 1 << 40
    max_entries: int = 4_000_000
    max_path_depth: int = 256
    max_path_bytes: int = 4096
    max_header_bytes: int = 1 << 20
    max_xattr_bytes: int = 65536


class WhiteoutMode(enum.Enum):
    """What a whiteout entry becomes when a tar is applied."""

    DELETE = "delete"
    """Delete the path from the target (the target already holds the parent's content)."""
    OVERLAY = "overlay"
    """Write overlayfs whiteouts: a 0/0 char device, and ``trusted.overlay.opaque=y``."""


@attrs.frozen
class ApplyResult:
    """What applying one tar did."""

    size: int
    """Bytes of the uncompressed tar that were read, trailer included."""
    entries: int
    """Headers applied (whiteouts included)."""


def apply_tar(
    root: Path,
    tar: BinaryIO,
    *,
    limits: Limits = Limits(),
    whiteouts: WhiteoutMode = WhiteoutMode.DELETE,
) -> ApplyResult:
    """Apply an uncompressed OCI layer tar onto ``root``; reads ``tar`` to its end."""
    raise NotImplementedError


def write_changes_tar(root: Path, changes: Iterable[Change], out: BinaryIO) -> None:
    """Write the OCI layer tar for ``changes``, reading content from ``root``."""
    raise NotImplementedError
