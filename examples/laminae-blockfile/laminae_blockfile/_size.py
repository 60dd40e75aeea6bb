"""Parsing the ``size`` option: ``"512M"``, ``"2G"``, ``"1GiB"``, ``"1073741824"``."""

from __future__ import annotations

import re
from fractions import Fraction

import laminae

__all__ = ["MIN_SIZE", "format_size", "parse_size"]

MIN_SIZE = 16 * 1024**2
"""Below 16 MiB mke2fs switches to its "floppy" profile (1 KiB blocks, few inodes), and a
layer that small holds hardly an image's base; refusing it early names the option."""

# The units of containers-storage's ``units.RAMInBytes``: binary multiples, an optional
# "i" and "B", any case, so a value copied from a storage.conf means the same here.
_SIZE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?) ?(?P<unit>[kmgtp]?)i?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}


def parse_size(text: str, *, option: str = "size") -> int:
    """Return the byte count ``text`` names, rounded down to a whole 4 KiB block.

    :param text: a number of bytes, optionally with a unit ``K``, ``M``, ``G``, ``T`` or
        ``P`` (powers of 1024), optionally followed by ``i`` and ``B``.
    :param option: the option's name, for the error message.
    :raises laminae.InvalidArgument: ``text`` is not a size, or is below :data:`MIN_SIZE`.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise laminae.InvalidArgument(
            f"blockfile option {option}={text!r}: not a size (examples: 512M, 2G, 1073741824)"
        )
    size = int(Fraction(match["number"]) * _UNITS[match["unit"].lower()])
    size -= size % 4096
    if size < MIN_SIZE:
        raise laminae.InvalidArgument(
            f"blockfile option {option}={text!r}: {size} bytes is below the minimum "
            f"of {format_size(MIN_SIZE)}"
        )
    return size


def format_size(size: int) -> str:
    """The shortest exact spelling of ``size`` that :func:`parse_size` reads back."""
    for unit in ("P", "T", "G", "M", "K"):
        multiple = _UNITS[unit.lower()]
        if size % multiple == 0:
            return f"{size // multiple}{unit}"
    return str(size)
