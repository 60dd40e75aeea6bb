"""Sizes as people write them: ``"64G"``, ``"512M"``, ``4096``.

One parser for every size laminae reads: ``storage.toml`` limits, the ``size`` option of the
btrfs driver, a third-party driver's options. A value copied from one place means the same
bytes in every other.
"""

from __future__ import annotations

import re
from typing import Final

from laminae._exceptions import InvalidArgument

__all__ = ["parse_size"]

_SIZE: Final = re.compile(r"\s*(\d+)\s*(?:([kmgtp])(?:i?b)?|b)?\s*", re.IGNORECASE)
_UNITS: Final = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(value: str | int) -> int:
    """Turn ``"64G"`` (or ``64``) into a positive number of bytes.

    Units are binary, as in containers-storage's sizes: ``K``, ``M``, ``G``, ``T``, ``P``, each
    optionally followed by ``B`` or ``iB``, in any case (``64G`` = ``64GiB`` = ``64gb`` =
    64 x 2**30); a bare ``B`` means bytes. Only whole numbers: ``"1.5G"`` is refused rather
    than rounded, so that no two readers can disagree on what it means.

    :raises InvalidArgument: not a whole positive number with an optional unit.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f'expected a size such as 4096 or "64G", got {value!r}')
    if isinstance(value, int):
        number = value
    else:
        match = _SIZE.fullmatch(value)
        if match is None:
            raise InvalidArgument(f'expected a size such as 4096 or "64G", got {value!r}')
        unit = match.group(2)
        number = int(match.group(1)) * (_UNITS[unit.lower()] if unit else 1)
    if number <= 0:
        raise InvalidArgument(f"expected a positive size, got {value!r}")
    return number
