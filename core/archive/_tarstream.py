"""A bounded, streaming tar reader for OCI layers.

Why not :mod:`tarfile`: Python 3.11's reader reads a PAX or GNU long-name header whole into
memory before anything can bound it (a header may claim gigabytes), and it has had parsing
denial-of-service bugs (REFERENCE.md section 8; DESIGN.md invariant 6.4). This reader checks
every size before it allocates for it, never holds an entry's data whole, and yields entries
lazily from any :class:`typing.BinaryIO`.

Formats read: ustar/POSIX (``prefix`` field), PAX extended headers (``x``), PAX global headers
(``g``: parsed within the bounds, then *ignored*, as Go's ``archive/tar`` and containerd do, so a
layer applies to the same tree here as there), GNU long names (``L``) and long links (``K``),
base-256 numeric fields, old GNU sparse files (``S``, with extension headers) and PAX sparse
formats 0.0, 0.1 and 1.0 (``GNU.sparse.*``; 1.0 keeps the map at the start of the data).

After the end of the archive (two zero blocks, one zero block at EOF, or EOF at a header
boundary, as Go's reader and GNU tar accept) the rest of the stream is read to EOF and dropped:
the caller hashes everything read for the DiffID.
"""

from __future__ import annotations

import base64
import enum
import urllib.parse
from collections.abc import Iterator
from typing import BinaryIO, Final, NoReturn
from zlib import adler32

import attrs

from laminae._exceptions import InvalidArgument, LimitExceeded

__all__ = [
    "BLOCK_SIZE",
    "CHUNK_SIZE",
    "EntryType",
    "HeaderDecoder",
    "Limits",
    "PendingHeaders",
    "TarEntry",
    "TarReader",
    "check_checksum",
    "cstring",
    "decode_number",
    "effective_name",
    "entry_data_size",
    "entry_type",
    "header_size",
    "pax_int",
    "ustar_name",
]

CHUNK_SIZE: Final = 1 << 20
"""Bytes asked of the stream per read, and the largest data chunk handed out."""

BLOCK_SIZE: Final = 512
"""The tar block: headers are one, data is padded to a whole number of them."""

_BLOCK: Final = BLOCK_SIZE
_ZERO_BLOCK: Final = bytes(_BLOCK)
_XATTR_NAME_MAX: Final = 255  # linux/limits.h


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
    """

    max_bytes: int = 1 << 40
    max_entries: int = 4_000_000
    max_path_depth: int = 256
    max_path_bytes: int = 4096
    max_header_bytes: int = 1 << 20
    max_xattr_bytes: int = 65536


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
_CHAR: Final = EntryType.CHAR.value
_BLOCK_DEVICE: Final = EntryType.BLOCK.value
_PAX: Final = ord("x")
_PAX_GLOBAL: Final = ord("g")
_GNU_LONGNAME: Final = ord("L")
_GNU_LONGLINK: Final = ord("K")
_GNU_SPARSE: Final = ord("S")
_META_TYPES: Final = frozenset({_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK})
_META_NAMES: Final = {
    _PAX: "PAX header",
    _PAX_GLOBAL: "PAX global header",
    _GNU_LONGNAME: "GNU long name",
    _GNU_LONGLINK: "GNU long link",
}
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
_GNU_MAGIC: Final = b"ustar "


@attrs.define(slots=True, eq=False)
class TarEntry:
    """One entry (a file, directory, link, device or FIFO) with its metadata.

    Read its data with :meth:`chunks` before asking the reader for the next entry; whatever
    is left unread is skipped.

    :param name: the path as stored (PAX ``path``, GNU long name, or ustar prefix + name).
    :param linkname: symlink target or hard-link target, as stored.
    :param type: an :class:`EntryType`, or the raw type-flag byte of an unknown type.
    :param mode: permission bits including setuid, setgid and sticky (``0o7777``).
    :param size: the file's size; for a sparse file its apparent size.
    :param mtime_ns: modification time in nanoseconds since the epoch (PAX ``mtime`` with its
        fraction when present, else the header's seconds).
    :param atime_ns: PAX ``atime`` in nanoseconds, if the archive has one.
    :param xattrs: extended attributes from ``SCHILY.xattr.*`` (and ``LIBARCHIVE.xattr.*``)
        records, raw bytes both sides.
    :param sparse: ``(offset, length)`` data segments of a sparse file, ascending; holes
        between them and up to ``size`` read as zeros. ``None`` for a plain file.
    :param index: the entry's number in the archive, from 1.
    """

    name: bytes
    linkname: bytes
    type: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int | None
    devmajor: int
    devminor: int
    xattrs: dict[bytes, bytes]
    sparse: tuple[tuple[int, int], ...] | None
    index: int
    _reader: TarReader
    _data_size: int

    def buffered(self) -> memoryview | None:
        """All of a plain file's data if the reader holds it already, else ``None``.

        The fast path for small files: no generator, no copy. On ``None`` use :meth:`chunks`.
        """
        return self._reader._buffered(self)

    def chunks(self) -> Iterator[tuple[int, memoryview | bytes]]:
        """Yield ``(offset, data)`` pieces of the file's content, at most 1 MiB each.

        ``offset`` is where ``data`` belongs in the file; for a plain file the pieces are
        contiguous, for a sparse file they skip the holes. A piece is valid until the next
        one is asked for.

        :raises InvalidArgument: the archive ends inside the data.
        """
        return self._reader._chunks(self)


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


def _text(name: bytes) -> str:
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


_NOTHING_PENDING: Final = PendingHeaders()
"""Stands for "no extension headers" (most entries), so none is allocated for them."""


class HeaderDecoder:
    """The bounded decoding of tar headers, without the stream: what :class:`TarReader` and an
    incremental framer (:mod:`laminae.archive._tarsplit`) share, so both read a header the same way.

    A subclass feeds it whole blocks and extension-header data; it checks every size against
    :class:`Limits` before the caller reads the bytes, parses PAX records into a
    :class:`PendingHeaders`, and raises the errors :class:`TarReader` documents.

    :param limits: the bounds to enforce.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._index = 0
        """Entries seen so far; an error names the current one."""

    def _fail(self, what: str, name: bytes | None) -> NoReturn:
        where = f"at entry {self._index}"
        if name:
            where += f" '{_text(name)}'"
        raise InvalidArgument(f"layer tar: {what}, {where}")

    def _limit(self, what: str, value: int, limit: int, name: bytes | None) -> NoReturn:
        where = f"at entry {self._index}"
        if name:
            where += f" '{_text(name)}'"
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
        what = _META_NAMES[typeflag]
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
        pending.meta_bytes += _BLOCK
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
            self._fail(f"invalid xattr name {_text(xname[:300])!r}", pending.name)
        if len(value) > self._limits.max_xattr_bytes:
            self._limit(
                f"the size of xattr {_text(xname)!r} (limit max_xattr_bytes)",
                len(value),
                self._limits.max_xattr_bytes,
                pending.name,
            )
        pending.xattrs[xname] = value


class TarReader(HeaderDecoder):
    """Iterate the entries of a tar stream, within :class:`Limits`.

    :param stream: the uncompressed tar; read in 1 MiB pieces, to its end.
    :param limits: the bounds to enforce.

    Iterating yields :class:`TarEntry` values; :attr:`bytes_read` counts every byte taken
    from ``stream``.

    :raises InvalidArgument: the tar is truncated or malformed ("layer tar: <what>, at entry N
        '<name>'").
    :raises LimitExceeded: a limit was broken (the message names it and its value).
    """

    def __init__(self, stream: BinaryIO, limits: Limits) -> None:
        super().__init__(limits)
        self._stream = stream
        self._max_path = limits.max_path_bytes
        self._buf = b""
        self._view = memoryview(self._buf)
        self._pos = 0
        self.bytes_read = 0
        self._current: TarEntry | None = None
        # Data (and padding) of the current entry not yet handed out.
        self._data_left = 0
        self._pad_left = 0
        self._done = False

    # --- the stream ---------------------------------------------------------------------

    def _read(self, size: int) -> bytes:
        data = self._stream.read(size)
        if data:
            self.bytes_read += len(data)
            if self.bytes_read > self._limits.max_bytes:
                raise LimitExceeded(
                    f"layer tar: more than {self._limits.max_bytes} bytes "
                    f"(limit max_bytes), at entry {self._index}"
                )
        return data

    def _fill(self, size: int) -> bool:
        """Make ``size`` bytes available at ``_pos``; ``False`` if the stream ends first."""
        available = len(self._buf) - self._pos
        if available >= size:
            return True
        pieces = [self._buf[self._pos :]]
        while available < size:
            data = self._read(max(CHUNK_SIZE, size - available))
            if not data:
                break
            pieces.append(data)
            available += len(data)
        self._buf = b"".join(pieces)
        self._view = memoryview(self._buf)
        self._pos = 0
        return available >= size

    def _take(self, size: int, what: str, name: bytes) -> bytes:
        if not self._fill(size):
            self._fail(f"truncated {what}", name)
        start = self._pos
        self._pos = start + size
        return self._buf[start : self._pos]

    def _skip(self, size: int, name: bytes) -> None:
        """Drop ``size`` bytes without holding more than a chunk of them."""
        buffered = min(size, len(self._buf) - self._pos)
        self._pos += buffered
        size -= buffered
        while size > 0:
            data = self._read(min(size, CHUNK_SIZE))
            if not data:
                self._fail("truncated entry data", name)
            size -= len(data)

    def _drain(self) -> None:
        self._pos = len(self._buf)
        while self._read(CHUNK_SIZE):
            pass

    # --- entries ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[TarEntry]:
        while True:
            entry = self.next()
            if entry is None:
                return
            yield entry

    def next(self) -> TarEntry | None:
        """The next entry, or ``None`` after the end of the archive (the stream is drained)."""
        if self._done:
            return None
        if self._current is not None:
            left = self._data_left + self._pad_left
            if left:
                self._skip(left, self._current.name)
            self._current = None
            self._data_left = self._pad_left = 0
        pending = _NOTHING_PENDING
        while True:
            start = self._pos
            if len(self._buf) - start < _BLOCK:
                if not self._fill(_BLOCK):
                    if len(self._buf) - self._pos:
                        self._fail("truncated header", pending.name)
                    self._end(pending)
                    return None
                start = self._pos
            block = self._buf[start : start + _BLOCK]
            self._pos = start + _BLOCK
            if block == _ZERO_BLOCK:
                if self._fill(_BLOCK) and self._buf[self._pos : self._pos + _BLOCK] != _ZERO_BLOCK:
                    self._index += 1
                    self._fail("a zero block in front of a header", None)
                self._end(pending)
                return None
            self._index += 1
            if self._index > self._limits.max_entries:
                self._limit(
                    "the number of entries (limit max_entries)",
                    self._index,
                    self._limits.max_entries,
                    None,
                )
            if block[156] in _META_TYPES:
                if pending is _NOTHING_PENDING:
                    pending = PendingHeaders()
                self._meta_header(block, pending)
                # An extension header describes the entry that follows, and is not one itself.
                self._index -= 1
                continue
            return self._header(block, pending)

    def _end(self, pending: PendingHeaders) -> None:
        if pending.headers:
            self._index += 1
            self._fail("extension headers without an entry at the end of the archive", None)
        self._done = True
        self._drain()

    def _meta_header(self, block: bytes, pending: PendingHeaders) -> None:
        size = self.meta_size(block, pending)
        what = _META_NAMES[block[156]]
        data = self._take(size, what, pending.name or b"")
        self._skip(-size % _BLOCK, pending.name or b"")
        self.meta_data(block[156], data, pending)

    def _header(self, block: bytes, pending: PendingHeaders) -> TarEntry:
        # The hot path of reading a layer (once per file): field lookups go through the
        # _NUMBERS cache, and entries without extension headers skip every PAX step.
        numbers = _NUMBERS
        name = ustar_name(block)
        check_checksum(block, self, pending.name or name)
        typeflag = block[156]
        size = header_size(block, self, name)
        magic = block[257:263]
        field = block[100:108]
        mode = numbers.get(field)
        if mode is None:
            mode = decode_number(field, self, "mode", name)
        field = block[108:116]
        uid = numbers.get(field)
        if uid is None:
            uid = decode_number(field, self, "uid", name)
        field = block[116:124]
        gid = numbers.get(field)
        if gid is None:
            gid = decode_number(field, self, "gid", name)
        field = block[136:148]
        mtime = numbers.get(field)
        if mtime is None:
            mtime = decode_number(field, self, "mtime", name)
        linkname = cstring(block[157:257]) if block[157] else b""
        devmajor = devminor = 0
        if typeflag in (_CHAR, _BLOCK_DEVICE):
            devmajor = decode_number(block[329:337], self, "devmajor", name)
            devminor = decode_number(block[337:345], self, "devminor", name)
        mtime_ns = mtime * 1_000_000_000
        atime_ns: int | None = None
        sparse: list[tuple[int, int]] | None = None
        realsize = size
        if typeflag == _GNU_SPARSE:
            if magic != _GNU_MAGIC:
                self._fail("a GNU sparse header without the GNU magic", name)
            if pending is _NOTHING_PENDING:
                pending = PendingHeaders()
            sparse, realsize = self._old_gnu_sparse(block, name, pending)
        pax = pending.pax
        if pending is not _NOTHING_PENDING:
            name = effective_name(name, pending)
            if pending.linkname is not None:
                linkname = pending.linkname
            if pax:
                if b"linkpath" in pax:
                    linkname = pax[b"linkpath"]
                if b"size" in pax:
                    size = realsize = pax_int(pax[b"size"], self, "size", name)
                if b"uid" in pax:
                    uid = pax_int(pax[b"uid"], self, "uid", name)
                if b"gid" in pax:
                    gid = pax_int(pax[b"gid"], self, "gid", name)
                if b"mtime" in pax:
                    mtime_ns = _pax_time(pax[b"mtime"], self, "mtime", name)
                if b"atime" in pax:
                    atime_ns = _pax_time(pax[b"atime"], self, "atime", name)
                if b"SCHILY.devmajor" in pax:
                    devmajor = pax_int(pax[b"SCHILY.devmajor"], self, "devmajor", name)
                if b"SCHILY.devminor" in pax:
                    devminor = pax_int(pax[b"SCHILY.devminor"], self, "devminor", name)
        typeflag = entry_type(typeflag, name)
        data_size = entry_data_size(typeflag, size)
        self._current = entry = TarEntry(
            name,
            linkname,
            typeflag,
            mode & 0o7777,
            uid,
            gid,
            realsize,
            mtime_ns,
            atime_ns,
            devmajor,
            devminor,
            pending.xattrs if pending.xattrs else {},
            None,
            self._index,
            self,
            data_size,
        )
        self._data_left = data_size
        self._pad_left = -data_size % _BLOCK
        if pax and typeflag == _REGULAR:
            sparse = self._pax_sparse(entry, pax, pending, sparse)
        if sparse is not None:
            entry.sparse = _check_sparse(sparse, entry, self)
        if len(entry.name) > self._max_path or len(linkname) > self._max_path:
            self._long_path(entry)
        if uid < 0 or gid < 0:
            self._fail("negative uid or gid", entry.name)
        return entry

    def _long_path(self, entry: TarEntry) -> NoReturn:
        limit = self._limits.max_path_bytes
        if len(entry.name) > limit:
            self._limit(
                "the path length (limit max_path_bytes)", len(entry.name), limit, entry.name[:200]
            )
        self._limit(
            "the link target length (limit max_path_bytes)",
            len(entry.linkname),
            limit,
            entry.name,
        )

    # --- sparse files -------------------------------------------------------------------

    def _old_gnu_sparse(
        self, block: bytes, name: bytes, pending: PendingHeaders
    ) -> tuple[list[tuple[int, int]], int]:
        realsize = decode_number(block[483:495], self, "sparse real size", name)
        segments: list[tuple[int, int]] = []
        _sparse_entries(block[386:482], 4, segments, self, name)
        extended = block[482]
        while extended:
            self.sparse_block(pending, name)
            ext = self._take(_BLOCK, "sparse header", name)
            _sparse_entries(ext[:504], 21, segments, self, name)
            extended = ext[504]
        return segments, realsize

    def _pax_sparse(
        self,
        entry: TarEntry,
        pax: dict[bytes, bytes],
        pending: PendingHeaders,
        sparse: list[tuple[int, int]] | None,
    ) -> list[tuple[int, int]] | None:
        major = pax.get(b"GNU.sparse.major")
        minor = pax.get(b"GNU.sparse.minor")
        has_map = b"GNU.sparse.map" in pax or pending.sparse_pairs
        if major is None and not has_map:
            return sparse
        name = entry.name
        if b"GNU.sparse.name" in pax:
            entry.name = name = pax[b"GNU.sparse.name"]
        for key in (b"GNU.sparse.realsize", b"GNU.sparse.size"):
            if key in pax:
                entry.size = pax_int(pax[key], self, key.decode(), name)
                break
        else:
            self._fail("a PAX sparse file without GNU.sparse.realsize or .size", name)
        if major is not None:
            if (major, minor) == (b"1", b"0"):
                return self._sparse_map_in_data(entry)
            if major != b"0":
                self._fail(f"unknown GNU sparse format {_text(major)}.{_text(minor or b'')}", name)
        numbers: list[int]
        if b"GNU.sparse.map" in pax:  # format 0.1
            raw = pax[b"GNU.sparse.map"]
            numbers = [pax_int(n, self, "GNU.sparse.map", name) for n in raw.split(b",")]
        else:  # format 0.0
            numbers = pending.sparse_pairs
        if len(numbers) % 2:
            self._fail("a sparse map with an odd number of values", name)
        if b"GNU.sparse.numblocks" in pax:
            blocks = pax_int(pax[b"GNU.sparse.numblocks"], self, "GNU.sparse.numblocks", name)
            if blocks * 2 != len(numbers):
                self._fail("GNU.sparse.numblocks does not match the sparse map", name)
        return list(zip(numbers[::2], numbers[1::2], strict=True))

    def _sparse_map_in_data(self, entry: TarEntry) -> list[tuple[int, int]]:
        """Format 1.0: decimal lines at the start of the data, padded to a block."""
        name = entry.name
        limit = self._limits.max_header_bytes
        consumed = 0
        lines: list[int] = []
        count = -1
        text = b""
        while count < 0 or len(lines) < 2 * count:
            newline = text.find(b"\n")
            if newline < 0:
                if consumed + _BLOCK > limit:
                    self._limit(
                        "the size of the sparse map (limit max_header_bytes)",
                        consumed + _BLOCK,
                        limit,
                        name,
                    )
                if consumed + _BLOCK > self._data_left:
                    self._fail("truncated sparse map", name)
                text += self._take(_BLOCK, "sparse map", name)
                consumed += _BLOCK
                continue
            value = pax_int(text[:newline], self, "sparse map", name)
            text = text[newline + 1 :]
            if count < 0:
                count = value
            else:
                lines.append(value)
        self._data_left -= consumed
        return list(zip(lines[::2], lines[1::2], strict=True))

    # --- data ---------------------------------------------------------------------------

    def _chunks(self, entry: TarEntry) -> Iterator[tuple[int, memoryview | bytes]]:
        if entry is not self._current:
            raise RuntimeError("tar entry data read after the next entry was asked for")
        segments = entry.sparse if entry.sparse is not None else ((0, self._data_left),)
        for offset, length in segments:
            done = 0
            while done < length:
                piece = self._piece(length - done, entry.name)
                yield offset + done, piece
                done += len(piece)
        if self._data_left:
            self._fail("sparse map does not cover the data", entry.name)
        self._skip(self._pad_left, entry.name)
        self._pad_left = 0

    def _buffered(self, entry: TarEntry) -> memoryview | None:
        if entry is not self._current:
            raise RuntimeError("tar entry data read after the next entry was asked for")
        size = self._data_left
        start = self._pos
        end = start + size
        if entry.sparse is not None or end + self._pad_left > len(self._buf):
            return None
        self._pos = end + self._pad_left
        self._data_left = self._pad_left = 0
        return self._view[start:end]

    def _piece(self, want: int, name: bytes) -> memoryview | bytes:
        """Up to ``want`` bytes of data: from the buffer if any, else straight from the stream."""
        want = min(want, self._data_left, CHUNK_SIZE)
        if want <= 0:
            self._fail("sparse map goes past the data", name)
        buffered = len(self._buf) - self._pos
        if buffered:
            take = min(want, buffered)
            start = self._pos
            self._pos = start + take
            self._data_left -= take
            return self._view[start : start + take]
        data = self._read(want)
        if not data:
            self._fail("truncated entry data", name)
        self._data_left -= len(data)
        return data


def check_checksum(block: bytes, reader: HeaderDecoder, name: bytes) -> None:
    field = block[148:156]
    stored = _NUMBERS.get(field)
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


# Parsed numeric fields by their raw bytes: modes, owners, times and checksums repeat across a
# layer's headers, and a dict lookup is several times cheaper than parsing octal text again.
_NUMBERS: Final[dict[bytes, int]] = {}
_NUMBERS_MAX: Final = 1 << 14


def header_size(block: bytes, reader: HeaderDecoder, name: bytes) -> int:
    """The ``size`` field of a header block (no PAX ``size`` applied); never negative."""
    field = block[124:136]
    size = _NUMBERS.get(field)
    if size is None:
        size = decode_number(field, reader, "size", name)
    if size < 0:
        reader._fail("negative size", name)
    return size


def decode_number(field: bytes, reader: HeaderDecoder, what: str, name: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit is set."""
    value = _parse_number(field, reader, what, name)
    if len(_NUMBERS) < _NUMBERS_MAX:
        _NUMBERS[field] = value
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
    if not value.isdigit() or len(value) > 30:
        reader._fail(f"malformed PAX {what} {_text(value[:40])!r}", name)
    return int(value)


def _pax_time(value: bytes, reader: HeaderDecoder, what: str, name: bytes | None) -> int:
    """A PAX time ("1700000000.123456789", maybe negative) in nanoseconds."""
    negative = value.startswith(b"-")
    whole, dot, fraction = value[negative:].partition(b".")
    if (
        not whole.isdigit()
        or len(whole) > 20
        or (dot and not fraction.isdigit())
        or len(fraction) > 100
    ):
        reader._fail(f"malformed PAX {what} {_text(value[:40])!r}", name)
    ns = int(whole) * 1_000_000_000 + int((fraction[:9] or b"0").ljust(9, b"0"))
    return -ns if negative else ns


def _sparse_entries(
    raw: bytes, count: int, out: list[tuple[int, int]], reader: HeaderDecoder, name: bytes
) -> None:
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


def _check_sparse(
    segments: list[tuple[int, int]], entry: TarEntry, reader: TarReader
) -> tuple[tuple[int, int], ...]:
    """Segments ascend, do not overlap, stay inside the file and add up to the stored data."""
    name = entry.name
    if entry.size > reader._limits.max_bytes:
        reader._limit(
            "the apparent size of a sparse file (limit max_bytes)",
            entry.size,
            reader._limits.max_bytes,
            name,
        )
    end = 0
    total = 0
    for offset, length in segments:
        if offset < end or length < 0 or offset + length > entry.size:
            reader._fail("invalid sparse map", name)
        end = offset + length
        total += length
    if total != reader._data_left:
        reader._fail("sparse map does not match the stored data size", name)
    return tuple(segments)
