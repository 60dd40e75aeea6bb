"""The size of a layer's image: ``"512M"``, ``"2G"``, ``"1GiB"``, ``"1073741824"``.

The text is read by :func:`laminae.driverkit.parse_size`, so a size means the same bytes here
as in ``storage.toml`` and to every other driver; this module adds what an ext4 image needs.
"""

from __future__ import annotations

from laminae.driverkit import InvalidArgument, parse_size

__all__ = ["MIN_SIZE", "format_size", "layer_size"]

MIN_SIZE = 16 * 1024**2
"""Below 16 MiB mke2fs switches to its "floppy" profile (1 KiB blocks, few inodes), and a
layer that small holds hardly an image's base; refusing it early names the option."""

_BLOCK = 4096
_UNITS = {"P": 1024**5, "T": 1024**4, "G": 1024**3, "M": 1024**2, "K": 1024}


def layer_size(text: str, *, option: str = "size") -> int:
    """The bytes of image ``text`` asks for, rounded down to a whole 4 KiB block.

    :param text: a size as :func:`laminae.driverkit.parse_size` reads it: a whole number of
        bytes, optionally with a binary unit ``K``, ``M``, ``G``, ``T`` or ``P``.
    :param option: the option's name, for the error message.
    :raises laminae.driverkit.InvalidArgument: ``text`` is not a size, or is below
        :data:`MIN_SIZE`.
    """
    try:
        size = parse_size(text)
    except InvalidArgument as exc:
        raise InvalidArgument(f"blockfile option {option}={text!r}: {exc}") from exc
    size -= size % _BLOCK
    if size < MIN_SIZE:
        raise InvalidArgument(
            f"blockfile option {option}={text!r}: {size} bytes is below the minimum "
            f"of {format_size(MIN_SIZE)}"
        )
    return size


def format_size(size: int) -> str:
    """The shortest exact spelling of ``size`` that :func:`layer_size` reads back."""
    for unit, multiple in _UNITS.items():
        if size % multiple == 0:
            return f"{size // multiple}{unit}"
    return str(size)
