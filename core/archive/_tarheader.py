"""Tar headers: the block format, numeric fields, and extension headers within bounds.

What :class:`~laminae.archive._tarstream.TarReader` needs to turn header blocks into entries,
without the stream: the ustar/GNU header fields (octal and base-256 numbers, the checksum, the
``prefix``), the type flags (:class:`EntryType`), and the extension headers in front of an entry
(PAX ``x`` records, PAX global ``g`` records, GNU long names ``L`` and long links ``K``, old-GNU
sparse extension blocks), whose sizes :class:`HeaderDecoder` checks against
:class:`~laminae.archive._limits.Limits` before a byte of them is read.
"""

from __future__ import annotations

import base64
import enum
import urllib.parse
from typing import Final, NoReturn
from zlib import adler32

import attrs

from laminae._exceptions import InvalidArgument, LimitExceeded
from laminae.archive._limits import Limits

__all__ = [
    "BLOCK_SIZE",
    "EXTENSION_HEADERS",
    "FIELD_VALUES",
    "EntryType",
    "HeaderDecoder",
    "PendingHeaders",
    "check_checksum",
    "cstring",
    "decode_number",
    "effective_name",
    "entry_data_size",
    "entry_type",
    "header_size",
    "pax_int",
    "pax_time",
    "printable",
    "sparse_entries",
    "ustar_name",
]

BLOCK_SIZE: Final = 512
"""The tar block: headers are one, data is padded to a whole number of them."""

_XATTR_NAME_MAX: Final = 255  # linux/limits.h


class EntryType(enum.IntEnum):
    """The kind of a tar entry, by its type flag.

    The old ``\\0`` flag and ``7`` (contiguous file) read as :attr:`REGULAR`, and an old-GNU
    sparse file (``S``) is a regular file with a sparse map. Flags not listed here are passed
    through as their byte value, for the caller to refuse.
    """

    REGULAR = ord("0")
    HARDLINK = ord("1")
    SYMLINK = ord("2")
    CHAR = ord("3")
    BLOCK = ord("4")
    DIRECTORY = ord("5")
    FIFO = ord("6")


_REGULAR: Final = EntryType.REGULAR.value
_DIRECTORY: Final = EntryType.DIRECTORY.value
_PAX: Final = ord("x")
_PAX_GLOBAL: Final = ord("g")
_GNU_LONGNAME: Final = ord("L")
_GNU_LONGLINK: Final = ord("K")
_GNU_SPARSE: Final = ord("S")

EXTENSION_HEADERS: Final = {
    _PAX: "PAX header",
    _PAX_GLOBAL: "PAX global header",
    _GNU_LONGNAME: "GNU long name",
    _GNU_LONGLINK: "GNU long link",
}
"""The type flags of extension headers (headers about the entry that follows, or about all
that follow for ``g``), and how an error message names each."""

# Types whose size field says nothing about data in the archive (Go's isHeaderOnlyType).
_HEADER_ONLY: Final = frozenset(
    {
        EntryType.HARDLINK,
        EntryType.SYMLINK,
        EntryType.CHAR,
        EntryType.BLOCK,
        EntryType.DIRECTORY,
        EntryType.FIFO,
    }
)
_REGULAR_ALIASES: Final = frozenset({0, ord("0"), ord("7"), _GNU_SPARSE})
_POSIX_MAGIC: Final = b"ustar\x00"


def ustar_name(block: bytes) -> bytes:
    """The name a header block holds: its ``name`` field, after ustar's ``prefix`` if any."""
    end = block.find(0, 0, 100)
    name = block[:100] if end < 0 else block[:end]
    if block[345] and block[257:263] == _POSIX_MAGIC:
        name = cstring(block[345:500]) + b"/" + name
    return name


def effective_name(name: bytes, pending: PendingHeaders) -> bytes:
    """An entry's path: PAX ``path``, else a GNU long name, else ``name`` (:func:`ustar_name`)."""
    path = pending.pax.get(b"path")
    if path is not None:
        return path
    return name if pending.name is None else pending.name


def entry_type(typeflag: int, name: bytes) -> int:
    """The :class:`EntryType` a header's type flag means for the entry at ``name``.

    ``\\0``, ``7`` and old-GNU sparse ``S`` read as :attr:`EntryType.REGULAR`; pre-POSIX tars
    mark a directory with a trailing slash on an ``\\0`` entry. Other flags pass through.
    """
    if typeflag in _REGULAR_ALIASES:
        return _DIRECTORY if typeflag == 0 and name.endswith(b"/") else _REGULAR
    return typeflag


def entry_data_size(kind: int, size: int) -> int:
    """Bytes of data that follow the header of an entry of type ``kind`` and size ``size``.

    Links, devices, FIFOs and directories have none whatever their size field says (Go's
    ``isHeaderOnlyType``).
    """
    return 0 if kind in _HEADER_ONLY else size


def printable(name: bytes) -> str:
    """A path for an error message: printable whatever its bytes."""
    return name.decode("utf-8", "backslashreplace")


def cstring(field: bytes) -> bytes:
    """A NUL-terminated header field without its NUL and what follows."""
    end = field.find(0)
    return field if end < 0 else field[:end]


@attrs.define(slots=True)
class PendingHeaders:
    """What the extension headers in front of an entry said about it."""

    name: bytes | None = None
    linkname: bytes | None = None
    pax: dict[bytes, bytes] = attrs.Factory(dict)
    xattrs: dict[bytes, bytes] = attrs.Factory(dict)
    sparse_pairs: list[int] = attrs.Factory(list)
    meta_bytes: int = 0
    headers: int = 0
    """Extension headers seen that describe the next entry (global headers do not)."""


class HeaderDecoder:
    """The bounded decoding of tar headers, without the stream; the base of
    :class:`~laminae.archive._tarstream.TarReader`.

    A subclass feeds it whole blocks and extension-header data; it checks every size against
    :class:`~laminae.archive._limits.Limits` before the caller reads the bytes, parses PAX
    records into a :class:`PendingHeaders`, and raises the errors the reader documents ("layer
    tar: <what>, at entry N '<name>'", and :class:`~laminae.LimitExceeded` naming the limit).

    :param limits: the bounds to enforce.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._index = 0
        """Entries seen so far; an error names the current one."""

    def _fail(self, what: str, name: bytes | None) -> NoReturn:
        where = f"at entry {self._index}"
        if name:
            where += f" '{printable(name)}'"
        raise InvalidArgument(f"layer tar: {what}, {where}")

    def _limit(self, what: str, value: int, limit: int, name: bytes | None) -> NoReturn:
        where = f"at entry {self._index}"
        if name:
            where += f" '{printable(name)}'"
        raise LimitExceeded(f"layer tar: {what} is {value}, above the limit of {limit}, {where}")

    def meta_size(self, block: bytes, pending: PendingHeaders) -> int:
        """Check an extension header block (``x``, ``g``, ``L``, ``K``) and its data's size.

        The size is checked against ``max_header_bytes`` (alone, and with the extension headers
        in front of the same entry) before a byte of the data is read: it is the attacker's
        number.

        :returns: the size of the data that follows the block (padded to a block in the tar).
        """
        name = pending.name or cstring(block[0:100])
        check_checksum(block, self, name)
        size = decode_number(block[124:136], self, "size", name)
        if size < 0:
            self._fail("negative size", name)
        typeflag = block[156]
        what = EXTENSION_HEADERS[typeflag]
        limit = self._limits.max_header_bytes
        if size > limit:
            self._limit(f"the size of a {what} (limit max_header_bytes)", size, limit, pending.name)
        pending.meta_bytes += size
        if pending.meta_bytes > limit:
            self._limit(
                "the size of the extension headers of one entry (limit max_header_bytes)",
                pending.meta_bytes,
                limit,
                pending.name,
            )
        return size

    def meta_data(self, typeflag: int, data: bytes, pending: PendingHeaders) -> None:
        """Take in the data of an extension header whose block :meth:`meta_size` checked."""
        if typeflag != _PAX_GLOBAL:
            pending.headers += 1
        if typeflag == _GNU_LONGNAME:
            pending.name = cstring(data)
        elif typeflag == _GNU_LONGLINK:
            pending.linkname = cstring(data)
        elif typeflag == _PAX:
            self._parse_pax(data, pending)
        else:
            # Global records are parsed (so a malformed one fails) and then ignored, as Go's
            # archive/tar and containerd ignore them.
            self._parse_pax(data, PendingHeaders())

    def sparse_block(self, pending: PendingHeaders, name: bytes) -> None:
        """Count one old-GNU sparse extension block against ``max_header_bytes``."""
        pending.meta_bytes += BLOCK_SIZE
        if pending.meta_bytes > self._limits.max_header_bytes:
            self._limit(
                "the size of the sparse map (limit max_header_bytes)",
                pending.meta_bytes,
                self._limits.max_header_bytes,
                name,
            )

    def _parse_pax(self, data: bytes, pending: PendingHeaders) -> None:
        pos = 0
        end = len(data)
        name = pending.name
        while pos < end:
            space = data.find(b" ", pos, min(end, pos + 20))
            if space < 0:
                self._fail("malformed PAX record (no length)", name)
            digits = data[pos:space]
            if not digits.isdigit():
                self._fail("malformed PAX record length", name)
            length = int(digits)
            if length <= space - pos + 1 or pos + length > end:
                self._fail("malformed PAX record length", name)
            if data[pos + length - 1] != 0x0A:
                self._fail("PAX record without its newline", name)
            record = data[space + 1 : pos + length - 1]
            pos += length
            key, eq, value = record.partition(b"=")
            if not eq or not key:
                self._fail("malformed PAX record (no keyword)", name)
            self._pax_record(key, value, pending)

    def _pax_record(self, key: bytes, value: bytes, pending: PendingHeaders) -> None:
        name = pending.name
        if key.startswith(b"SCHILY.xattr."):
            self._xattr(key[13:], value, pending)
        elif key.startswith(b"LIBARCHIVE.xattr."):
            # libarchive's form: URL-encoded name, base64 value.
            xname = urllib.parse.unquote_to_bytes(key[17:])
            try:
                xvalue = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
            except ValueError:
                self._fail("malformed LIBARCHIVE.xattr value", name)
            if xname not in pending.xattrs:
                self._xattr(xname, xvalue, pending)
        elif key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            # Sparse format 0.0 repeats these two keywords; their order is the map.
            expected = b"GNU.sparse.offset" if len(pending.sparse_pairs) % 2 == 0 else None
            if (key == b"GNU.sparse.offset") != (expected is not None):
                self._fail("GNU.sparse.offset and GNU.sparse.numbytes out of order", name)
            pending.sparse_pairs.append(pax_int(value, self, key.decode(), name))
        elif not value:
            # An empty value deletes the keyword: the header's field applies again.
            pending.pax.pop(key, None)
            if key == b"path":
                pending.name = None
        else:
            pending.pax[key] = value
            if key == b"path":
                pending.name = value

    def _xattr(self, xname: bytes, value: bytes, pending: PendingHeaders) -> None:
        if not xname or len(xname) > _XATTR_NAME_MAX or 0 in xname:
            self._fail(f"invalid xattr name {printable(xname[:300])!r}", pending.name)
        if len(value) > self._limits.max_xattr_bytes:
            self._limit(
                f"the size of xattr {printable(xname)!r} (limit max_xattr_bytes)",
                len(value),
                self._limits.max_xattr_bytes,
                pending.name,
            )
        pending.xattrs[xname] = value


def check_checksum(block: bytes, reader: HeaderDecoder, name: bytes) -> None:
    """Refuse a header block whose checksum field does not match its bytes."""
    field = block[148:156]
    stored = FIELD_VALUES.get(field)
    if stored is None:
        try:
            stored = decode_number(field, reader, "checksum", name)
        except InvalidArgument:
            reader._fail("not a tar header (malformed checksum field)", None)
    # The checksum field counts as eight spaces (0x20 * 8 = 256). The byte sum comes from
    # Adler-32's first half, which is 1 + sum mod 65521: exact for 256 bytes (at most 65280),
    # and C speed where sum() over 512 ints is the slowest step of reading a header.
    unsigned = (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2
    unsigned += 256 - sum(field)
    if stored == unsigned:
        return
    # Some old tars summed signed chars (POSIX allows readers to accept both).
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
    if stored != signed:
        reader._fail("header checksum mismatch", name)


FIELD_VALUES: Final[dict[bytes, int]] = {}
"""Parsed numeric fields by their raw bytes (filled by :func:`decode_number`): modes, owners,
times and checksums repeat across a layer's headers, and a dict lookup is several times cheaper
than parsing octal text again."""
_FIELD_VALUES_MAX: Final = 1 << 14


def header_size(block: bytes, reader: HeaderDecoder, name: bytes) -> int:
    """The ``size`` field of a header block (no PAX ``size`` applied); never negative."""
    field = block[124:136]
    size = FIELD_VALUES.get(field)
    if size is None:
        size = decode_number(field, reader, "size", name)
    if size < 0:
        reader._fail("negative size", name)
    return size


def decode_number(field: bytes, reader: HeaderDecoder, what: str, name: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit is set."""
    value = _parse_number(field, reader, what, name)
    if len(FIELD_VALUES) < _FIELD_VALUES_MAX:
        FIELD_VALUES[field] = value
    return value


def _parse_number(field: bytes, reader: HeaderDecoder, what: str, name: bytes) -> int:
    first = field[0]
    if first & 0x80:
        if first == 0xFF:
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes([first & 0x7F]) + field[1:], "big")
    text = cstring(field).strip(b" ")
    if not text:
        return 0
    if not text.isdigit():
        reader._fail(f"malformed {what} field", name)
    try:
        return int(text, 8)
    except ValueError:
        reader._fail(f"malformed {what} field", name)


def pax_int(value: bytes, reader: HeaderDecoder, what: str, name: bytes | None) -> int:
    """A PAX decimal number, at most 30 digits."""
    if not value.isdigit() or len(value) > 30:
        reader._fail(f"malformed PAX {what} {printable(value[:40])!r}", name)
    return int(value)


def pax_time(value: bytes, reader: HeaderDecoder, what: str, name: bytes | None) -> int:
    """A PAX time ("1700000000.123456789", maybe negative) in nanoseconds."""
    negative = value.startswith(b"-")
    whole, dot, fraction = value[negative:].partition(b".")
    if (
        not whole.isdigit()
        or len(whole) > 20
        or (dot and not fraction.isdigit())
        or len(fraction) > 100
    ):
        reader._fail(f"malformed PAX {what} {printable(value[:40])!r}", name)
    ns = int(whole) * 1_000_000_000 + int((fraction[:9] or b"0").ljust(9, b"0"))
    return -ns if negative else ns


def sparse_entries(
    raw: bytes, count: int, out: list[tuple[int, int]], reader: HeaderDecoder, name: bytes
) -> None:
    """Append the ``(offset, length)`` pairs of an old-GNU sparse map (``count`` slots of 24
    bytes, the first empty one ends it) to ``out``."""
    for i in range(count):
        field = raw[i * 24 : i * 24 + 24]
        if field[0] == 0:
            return
        out.append(
            (
                decode_number(field[:12], reader, "sparse offset", name),
                decode_number(field[12:], reader, "sparse length", name),
            )
        )
