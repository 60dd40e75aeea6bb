"""The bounds that make a hostile layer tar fail instead of filling the disk or the memory.

Each bound is enforced in one place: the tar reader (:class:`~laminae.archive._tarstream.TarReader`)
checks bytes, entries, path and link lengths, extension-header and xattr sizes, each before it
allocates for what it checks; the applier checks the path depth, which only resolving a path
gives meaning to. Everything that reads a layer tar (the applier, the detached apply, the
tar-split recorder, the archive scanner) reads it through that reader.

The same object carries the store's :class:`DevicePolicy`, since it is what every apply path
(the store's, each driver's, the detached apply) is handed already.
"""

from __future__ import annotations

import enum

import attrs

from laminae._exceptions import InvalidArgument

__all__ = ["DevicePolicy", "Limits"]


class DevicePolicy(enum.Enum):
    """What the applier does with a layer's character and block devices.

    A ``0:0`` character device is no device (it is what overlayfs calls a whiteout) and is
    always made; FIFOs are not devices either.
    """

    CREATE = "create"
    """Make the node: first ``root:root`` mode ``0600``, so only root can open it, then with
    the owner and mode the tar gives it. Every mount the store makes is ``nodev``, so a node is
    opened through a layer's mount only by a caller that asked for ``dev``. Where the kernel
    refuses ``mknod`` (not root, or in a user namespace) the node is skipped and counted, as
    containers-storage and containerd do rootless."""
    SKIP = "skip"
    """Make no node, and count it in :attr:`~laminae.driverkit.ApplyResult.devices_skipped`; a
    hard link to a skipped node is skipped with it."""
    REFUSE = "refuse"
    """Fail the layer at the first device, naming the entry."""

    def skips(self, char: bool, major: int, minor: int) -> bool:
        """Whether a character (``char``) or block device ``major:minor`` is not to be made.

        :raises InvalidArgument: the policy refuses it.
        """
        if self is DevicePolicy.CREATE or (char and major == minor == 0):
            return False
        if self is DevicePolicy.REFUSE:
            kind = "character" if char else "block"
            raise InvalidArgument(
                f"a {kind} device {major}:{minor}, and the devices policy is 'refuse'"
            )
        return True


@attrs.frozen
class Limits:
    """Bounds that make a hostile layer fail instead of filling the disk or the memory.

    :param max_bytes: decompressed bytes of one layer tar; also the largest apparent size of a
        sparse file.
    :param max_entries: entries (headers) in one layer.
    :param max_path_depth: components in one path.
    :param max_path_bytes: bytes in one path or link target.
    :param max_header_bytes: bytes of one PAX or GNU long-name/long-link header, and of all
        such headers (and sparse maps) in front of one entry together, checked before the
        header is read into memory. This also bounds the total of an entry's xattrs, which
        travel in its PAX header.
    :param max_xattr_bytes: bytes of one xattr value.
    :param max_compression_ratio: decompressed bytes per compressed byte of a gzip or zstd
        layer, checked once more than ``compression_ratio_floor_bytes`` came out: what stops a
        decompression bomb long before ``max_bytes`` would.
    :param compression_ratio_floor_bytes: decompressed bytes below which any ratio passes, so
        that small, very compressible layers (a few files of zeros) always import.
    :param devices: what becomes of the tar's character and block devices: a
        :class:`DevicePolicy` or its value (``"create"``, ``"skip"``, ``"refuse"``).
    :raises ValueError: ``devices`` names no policy.
    """

    max_bytes: int = 1 << 40
    max_entries: int = 4_000_000
    max_path_depth: int = 256
    max_path_bytes: int = 4096
    max_header_bytes: int = 1 << 20
    max_xattr_bytes: int = 65536
    # Real layers compress 2:1 to 10:1 with gzip or zstd (binaries and libraries 2-4:1, text
    # and package indexes up to ~10:1); gzip's own ceiling is ~1030:1 (zeros) and zstd's is far
    # higher, which is what a bomb uses. 100:1 leaves a real layer ten times its most
    # compressible case, while a bomb past the 1 GiB floor can write at most 100 bytes per
    # byte received: a 10 MB blob stops at ~1 GiB instead of filling the disk. A 30 GiB layer
    # compressed to 3 GiB (10:1) imports.
    max_compression_ratio: int = 100
    compression_ratio_floor_bytes: int = 1 << 30
    devices: DevicePolicy = attrs.field(default=DevicePolicy.CREATE, converter=DevicePolicy)
