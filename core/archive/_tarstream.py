"""A bounded, streaming tar reader for OCI layers.

Why not :mod:`tarfile`: Python 3.11's reader reads a PAX or GNU long-name header whole into
memory before anything can bound it (a header may claim gigabytes), and it has had parsing
denial-of-service bugs (docs/architecture.md, "Security of extraction" and invariant 4). This
reader checks every size before it allocates for it, never holds an entry's data whole, and
yields entries lazily from any :class:`typing.BinaryIO`.

Formats read: ustar/POSIX (``prefix`` field), PAX extended headers (``x``), PAX global headers
(``g``: parsed within the bounds, then *ignored*, as Go's ``archive/tar`` and containerd do, so a
layer applies to the same tree here as there), GNU long names (``L``) and long links (``K``),
base-256 numeric fields, old GNU sparse files (``S``, with extension headers) and PAX sparse
formats 0.0, 0.1 and 1.0 (``GNU.sparse.*``; 1.0 keeps the map at the start of the data).

After the end of the archive (two zero blocks, one zero block at EOF, or EOF at a header
boundary, as Go's reader and GNU tar accept) the rest of the stream is read to EOF and dropped:
the caller hashes everything read for the DiffID.

This is the one tar framer of laminae: every limit on a layer tar's structure is enforced here
(:mod:`laminae.archive._limits`). A caller that needs to know where each entry lies in the
stream, as the tar-split recorder does, asks :attr:`TarReader.offset` between entries rather
than framing the bytes again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, Final, NoReturn

import attrs

from laminae._exceptions import LimitExceeded
from laminae.archive._limits import Limits
from laminae.archive._tarheader import (
    BLOCK_SIZE,
    EXTENSION_HEADERS,
    FIELD_VALUES,
    EntryType,
    HeaderDecoder,
    PendingHeaders,
    check_checksum,
    cstring,
    decode_number,
    effective_name,
    entry_data_size,
    entry_type,
    header_size,
    pax_int,
    pax_time,
    printable,
    sparse_entries,
    ustar_name,
)

__all__ = ["CHUNK_SIZE", "TarEntry", "TarReader"]

CHUNK_SIZE: Final = 1 << 20
"""Bytes asked of the stream per read, and the largest data chunk handed out."""

_BLOCK: Final = BLOCK_SIZE
_ZERO_BLOCK: Final = bytes(_BLOCK)
_REGULAR: Final = EntryType.REGULAR.value
_CHAR: Final = EntryType.CHAR.value
_BLOCK_DEVICE: Final = EntryType.BLOCK.value
_GNU_SPARSE: Final = ord("S")
_GNU_MAGIC: Final = b"ustar "
_META_TYPES: Final = frozenset(EXTENSION_HEADERS)
_NOTHING_PENDING: Final = PendingHeaders()
"""Stands for "no extension headers" (most entries), so none is allocated for them."""


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


class TarReader(HeaderDecoder):
    """Iterate the entries of a tar stream, within :class:`~laminae.archive._limits.Limits`.

    :param stream: the uncompressed tar; read in 1 MiB pieces, to its end.
    :param limits: the bounds to enforce.
    :param drain: read what follows the end of the archive to EOF (and drop it) as soon as the
        end is found. Without it, :meth:`next` returns ``None`` at the end and the caller reads
        the rest a piece at a time with :meth:`read_trailer`, still within ``max_bytes``.

    Iterating yields :class:`TarEntry` values; :attr:`bytes_read` counts every byte taken
    from ``stream``, :attr:`offset` the bytes consumed (framed) so far.

    :raises InvalidArgument: the tar is truncated or malformed ("layer tar: <what>, at entry N
        '<name>'").
    :raises LimitExceeded: a limit was broken (the message names it and its value).
    """

    def __init__(self, stream: BinaryIO, limits: Limits, *, drain: bool = True) -> None:
        super().__init__(limits)
        self._stream = stream
        self._drains = drain
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

    @property
    def offset(self) -> int:
        """Where the reader is in the stream: the bytes it has framed, not those it holds.

        Right after :meth:`next` returns an entry, this is where the entry's data begins;
        once its data has been read (:meth:`TarEntry.chunks` to the end, or
        :meth:`TarEntry.buffered`), where the next entry's first header block (an extension
        header's, if it has any) begins. Bytes read ahead into the buffer do not count.
        """
        return self.bytes_read - len(self._buf) + self._pos

    def read_trailer(self) -> int:
        """Read the next piece of what follows the end of the archive, and drop it.

        For a reader made with ``drain=False``, once :meth:`next` has returned ``None``.

        :returns: the bytes read (at most 1 MiB), 0 at EOF.
        :raises LimitExceeded: the stream is longer than ``max_bytes``.
        """
        if not self._done:
            raise RuntimeError("tar trailer read before the end of the archive")
        self._pos = len(self._buf)
        return len(self._read(CHUNK_SIZE))

    # --- entries ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[TarEntry]:
        while True:
            entry = self.next()
            if entry is None:
                return
            yield entry

    def next(self) -> TarEntry | None:
        """The next entry, or ``None`` after the end of the archive (the stream is drained,
        unless the reader was made with ``drain=False``)."""
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
        if self._drains:
            while self.read_trailer():
                pass

    def _meta_header(self, block: bytes, pending: PendingHeaders) -> None:
        size = self.meta_size(block, pending)
        what = EXTENSION_HEADERS[block[156]]
        data = self._take(size, what, pending.name or b"")
        self._skip(-size % _BLOCK, pending.name or b"")
        self.meta_data(block[156], data, pending)

    def _header(self, block: bytes, pending: PendingHeaders) -> TarEntry:
        # The hot path of reading a layer (once per file): field lookups go through the
        # FIELD_VALUES cache, and entries without extension headers skip every PAX step.
        numbers = FIELD_VALUES
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
                    mtime_ns = pax_time(pax[b"mtime"], self, "mtime", name)
                if b"atime" in pax:
                    atime_ns = pax_time(pax[b"atime"], self, "atime", name)
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
            entry.sparse = self._check_sparse(sparse, entry)
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
        sparse_entries(block[386:482], 4, segments, self, name)
        extended = block[482]
        while extended:
            self.sparse_block(pending, name)
            ext = self._take(_BLOCK, "sparse header", name)
            sparse_entries(ext[:504], 21, segments, self, name)
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
                self._fail(
                    f"unknown GNU sparse format {printable(major)}.{printable(minor or b'')}", name
                )
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

    def _check_sparse(
        self, segments: list[tuple[int, int]], entry: TarEntry
    ) -> tuple[tuple[int, int], ...]:
        """Segments ascend, do not overlap, stay inside the file and add up to the stored data."""
        name = entry.name
        if entry.size > self._limits.max_bytes:
            self._limit(
                "the apparent size of a sparse file (limit max_bytes)",
                entry.size,
                self._limits.max_bytes,
                name,
            )
        end = 0
        total = 0
        for offset, length in segments:
            if offset < end or length < 0 or offset + length > entry.size:
                self._fail("invalid sparse map", name)
            end = offset + length
            total += length
        if total != self._data_left:
            self._fail("sparse map does not match the stored data size", name)
        return tuple(segments)

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
