"""Tar-split: rebuild the exact bytes of an applied layer tar from the layer's files.

A layer's DiffID is the sha256 of its uncompressed tar, and the tar is gone once applied: the
same files written out again by :func:`~laminae.archive._apply.write_changes_tar` give another tar
(other header fields, order, padding, PAX records), so another DiffID. Like containers'
``tar-split`` (what Moby and containers/storage keep for the same reason), this module records
everything in the tar that is *not* the content of a regular file, byte for byte, and each
regular file's content as a reference ``(path, size)``, while the tar streams past. Replaying
the record against the layer's tree gives the very same bytes.

* :class:`TarFramer` is the incremental parser: fed the tar in chunks of any size, it knows at
  every byte whether it is in a header, a file's payload, an entry's other data, padding, or
  after the end of the archive. It decodes headers with :mod:`laminae.archive._tarstream`'s own
  decoders (:class:`~laminae.archive._tarstream.HeaderDecoder`), so it frames a tar exactly as
  :class:`~laminae.archive._tarstream.TarReader` reads it, within the same :class:`Limits`.
* :class:`TarSplitRecorder` is a read-through stream (wrap the tar handed to
  :func:`~laminae.archive._apply.apply_tar`); :class:`TarSplitWriter` a write-through one, for a tar
  laminae writes itself.
* :func:`replay_tar` writes the tar back.

**What is a reference.** An entry's payload is recorded as a reference only when the entry is
a plain regular file (type ``0``, ``\\0`` or ``7``; not an old-GNU ``S`` sparse file and
without ``GNU.sparse.*`` PAX records), with a size above zero, and a name that cleans (as the
applier cleans it: no leading ``/`` or ``./``, ``..`` collapsed) to a path whose last component
does not start with ``.wh.``. Every other byte (headers, extension headers, padding, the data
of other entries, the end blocks and whatever follows them) is stored verbatim.

**A replaced file.** When a later entry of the same tar replaces a referenced path (the same
path again, or a non-directory where a referenced file's ancestor directory was), the file on
disk no longer holds the earlier content. The record then carries a *stale* mark, and
:func:`replay_tar` raises :class:`CorruptLayer` rather than write wrong bytes;
:attr:`TarSplitRecorder.exact` tells it at once. A replacement through a symlinked parent
(``a -> b``, then ``a/f`` and ``b/f``) is not seen: a caller verifies the rebuilt tar's digest
against the DiffID, as it must anyway for a tree someone could have touched.

**Record format** (version 1)::

    record   = magic version zstd-frame
    magic    = "LTSPLIT"                      7 bytes
    version  = %x01                           1 byte
    zstd-frame: the zstd compression of a sequence of operations, the last one END:
      DATA  = %x01 varint(n) n*byte           n verbatim tar bytes
      FILE  = %x02 varint(n) n*byte varint(s) the next s tar bytes are the content of the
                                              regular file at that (clean) path, s > 0
      STALE = %x03 varint(n) n*byte           a path a FILE referred to was replaced later in
                                              the tar: the record cannot rebuild it
      END   = %x00 varint(total)              the tar had ``total`` bytes; nothing follows

``varint`` is unsigned LEB128 (7 bits a byte, least significant first, high bit = more).
DATA runs are at most 1 MiB, so a reader needs no more memory than that.
"""

from __future__ import annotations

import enum
import errno
import io
import os
import stat
from pathlib import Path
from typing import BinaryIO, Final, Protocol, final

import zstandard

from laminae._exceptions import CorruptLayer, InvalidArgument
from laminae.archive._apply import _O_READ_FILE, _clean, _text, _Tree
from laminae.archive._tarstream import (
    BLOCK_SIZE,
    CHUNK_SIZE,
    EntryType,
    HeaderDecoder,
    Limits,
    PendingHeaders,
    check_checksum,
    effective_name,
    entry_data_size,
    entry_type,
    header_size,
    pax_int,
    ustar_name,
)

__all__ = [
    "FrameSink",
    "Region",
    "TarFramer",
    "TarSplitRecorder",
    "TarSplitWriter",
    "replay_tar",
]

MAGIC: Final = b"LTSPLIT"
VERSION: Final = 1
_HEAD: Final = MAGIC + bytes([VERSION])

_OP_END: Final = 0x00
_OP_DATA: Final = 0x01
_OP_FILE: Final = 0x02
_OP_STALE: Final = 0x03

_ZERO_BLOCK: Final = bytes(BLOCK_SIZE)
_META_TYPES: Final = frozenset(b"xgLK")
_PAX: Final = ord("x")
_PAX_GLOBAL: Final = ord("g")
_GNU_SPARSE: Final = ord("S")
_GNU_MAGIC: Final = b"ustar "
_PLAIN_FILE_FLAGS: Final = frozenset({0, ord("0"), ord("7")})
_REGULAR: Final = EntryType.REGULAR.value
_DIRECTORY: Final = EntryType.DIRECTORY.value
_WHITEOUT: Final = b".wh."
_SPARSE_KEY: Final = b"GNU.sparse."

_RUN_MAX: Final = CHUNK_SIZE
"""Largest DATA operation written, and so the most a replay holds of one."""
_OPS_FLUSH: Final = 1 << 18
"""Framed operations are handed to zstd in pieces of about this size (one call, not one per
entry)."""
_PATH_MAX: Final = 1 << 16
"""Largest path a replay accepts from a record (the tar's own bound is Limits.max_path_bytes)."""
_ZSTD_LEVEL: Final = 3
_ZSTD_WINDOW_MAX: Final = 1 << 27


class Region(enum.Enum):
    """What a byte of a tar is, to the framer."""

    HEADER = "header"
    """A header block, an extension header (PAX, GNU long name/link) with its data and
    padding, or an old-GNU sparse extension block."""
    PAYLOAD = "payload"
    """The content of a regular file that the record refers to by path."""
    DATA = "data"
    """Any other entry's data (a sparse file, a whiteout's, an unknown type's): verbatim."""
    PADDING = "padding"
    """Zeros after an entry's data, up to the next block."""
    END = "end"
    """The end-of-archive zero blocks and anything after them."""


class FrameSink(Protocol):
    """Where :class:`TarFramer` sends what it found, in tar order."""

    def verbatim(self, data: memoryview) -> None:
        """Bytes that are not referenced payload (valid only during the call)."""

    def reference(self, path: bytes, size: int) -> None:
        """The next ``size`` bytes are the content of the regular file at clean ``path``."""

    def payload(self, data: memoryview) -> None:
        """Bytes of the payload announced by :meth:`reference` (valid only during the call)."""

    def stale(self, path: bytes) -> None:
        """A path referenced earlier (or a directory above one) was replaced by an entry."""


# Framer states: a unit of _need bytes is being collected (a header block, an extension
# header's data, a sparse extension block), or _left bytes are being passed over.
_S_HEADER: Final = 0
_S_META: Final = 1
_S_SPARSE: Final = 2
_S_SKIP: Final = 3
_S_PAYLOAD: Final = 4
_S_END: Final = 5

_NO_HEADERS: Final = PendingHeaders()
"""Stands for "no extension headers in front of this entry" (most entries)."""


@final
class TarFramer(HeaderDecoder):
    """Frame a tar fed in chunks of any size; tell a :class:`FrameSink` what each byte is.

    :param sink: receives verbatim runs, references and payload, in order.
    :param limits: the same bounds :class:`~laminae.archive._tarstream.TarReader` enforces: header
        sizes are checked before a byte of the header is kept, so memory stays bounded by
        ``max_header_bytes`` whatever the tar says.
    :raises InvalidArgument: from :meth:`feed` or :meth:`finish`, a malformed or truncated tar
        (the same message ``TarReader`` gives).
    :raises LimitExceeded: a limit was broken.
    """

    def __init__(self, sink: FrameSink, limits: Limits) -> None:
        super().__init__(limits)
        self._sink = sink
        self._state = _S_HEADER
        self._need = BLOCK_SIZE
        self._part = bytearray()
        self._left = 0
        self._region = Region.HEADER
        self._then_pad = 0
        self._pad_region = Region.PADDING
        self._pending = _NO_HEADERS
        self._meta_type = 0
        self._meta_pad = 0
        self._sparse_name = b""
        self._sparse_size = 0
        self._announce: tuple[bytes, int] | None = None
        self.bytes_fed = 0
        """Bytes fed so far."""
        # Hashes of referenced paths and of the directories above them, to see a later entry
        # replace one (a hash collision only costs a false "stale", never wrong bytes).
        self._refs: set[int] = set()
        self._ref_dirs: set[int] = set()
        self._last_dir = b""

    @property
    def region(self) -> Region:
        """The region of the next byte to be fed, as far as is known before seeing it.

        A block is :attr:`Region.HEADER` until it is complete; the end blocks turn to
        :attr:`Region.END` once the first of them is complete.
        """
        state = self._state
        if state == _S_SKIP:
            return self._region
        if state == _S_PAYLOAD:
            return Region.PAYLOAD
        if state == _S_END:
            return Region.END
        return Region.HEADER

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Frame the next ``len(data)`` bytes of the tar; payload bytes are never copied."""
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        end = len(view)
        if not end:
            return
        self.bytes_fed += end
        if self.bytes_fed > self._limits.max_bytes:
            self._limit(
                "the number of bytes (limit max_bytes)",
                self.bytes_fed,
                self._limits.max_bytes,
                None,
            )
        sink = self._sink
        pos = 0
        mark = 0  # start of the verbatim run not yet sent
        while pos < end:
            state = self._state
            if state == _S_SKIP:
                take = min(self._left, end - pos)
                pos += take
                self._left -= take
                if not self._left:
                    self._after_skip()
            elif state == _S_PAYLOAD:
                if self._announce is not None:
                    if mark < pos:
                        sink.verbatim(view[mark:pos])
                    sink.reference(*self._announce)
                    self._announce = None
                take = min(self._left, end - pos)
                sink.payload(view[pos : pos + take])
                pos += take
                mark = pos
                self._left -= take
                if not self._left:
                    self._after_skip()
            elif state == _S_END:
                pos = end
            else:
                need = self._need
                part = self._part
                if not part and end - pos >= need:
                    unit = view[pos : pos + need].tobytes()
                    pos += need
                else:
                    take = min(need - len(part), end - pos)
                    part += view[pos : pos + take]
                    pos += take
                    if len(part) < need:
                        break
                    unit = bytes(part)
                    part.clear()
                if state == _S_HEADER:
                    self._header(unit)
                    if self._state == _S_META:
                        # Most extension headers are wholly in the chunk: take data and padding
                        # now rather than through two more turns of this loop.
                        need = self._need
                        if end - pos >= need + self._meta_pad:
                            self._meta_data(view[pos : pos + need].tobytes())
                            pos += need + self._meta_pad
                            self._need = BLOCK_SIZE
                            self._state = _S_HEADER
                elif state == _S_META:
                    self._meta(unit)
                else:
                    self._sparse_block(unit)
        if mark < end:
            sink.verbatim(view[mark:end])

    def finish(self) -> None:
        """Say the tar ended; raise if it ended where ``TarReader`` would refuse it.

        :raises InvalidArgument: the tar ends inside a header or an entry's data, or with
            extension headers that describe no entry.
        """
        state = self._state
        if state == _S_END:
            return
        if state == _S_HEADER and not self._part:
            if self._pending.headers:
                self._index += 1
                self._fail("extension headers without an entry at the end of the archive", None)
            return
        name = self._pending.name
        if state in (_S_HEADER, _S_SPARSE):
            self._fail("truncated header", name)
        if state == _S_META:
            self._fail("truncated extension header", name)
        self._fail("truncated entry data", name)

    # --- units --------------------------------------------------------------------------

    def _skip(self, region: Region, count: int, pad: int) -> None:
        """Pass over ``count`` bytes of ``region``, then ``pad`` bytes of its padding."""
        self._then_pad = pad
        self._pad_region = Region.HEADER if region is Region.HEADER else Region.PADDING
        if count:
            self._state = _S_SKIP
            self._region = region
            self._left = count
        else:
            self._after_skip()

    def _after_skip(self) -> None:
        pad = self._then_pad
        if pad:
            self._then_pad = 0
            self._state = _S_SKIP
            self._region = self._pad_region
            self._left = pad
            return
        self._state = _S_HEADER
        self._need = BLOCK_SIZE

    def _header(self, block: bytes) -> None:
        if block == _ZERO_BLOCK:
            if self._pending.headers:
                self._index += 1
                self._fail("extension headers without an entry at the end of the archive", None)
            self._state = _S_END
            return
        self._index += 1
        if self._index > self._limits.max_entries:
            self._limit(
                "the number of entries (limit max_entries)",
                self._index,
                self._limits.max_entries,
                None,
            )
        typeflag = block[156]
        pending = self._pending
        if typeflag in _META_TYPES:
            if pending is _NO_HEADERS:
                self._pending = pending = PendingHeaders()
            size = self.meta_size(block, pending)
            # An extension header describes the entry that follows, and is not one itself.
            self._index -= 1
            if size:
                self._state = _S_META
                self._need = size
                self._meta_type = typeflag
                self._meta_pad = -size % BLOCK_SIZE
            else:
                self.meta_data(typeflag, b"", pending)
            return
        name = ustar_name(block)
        check_checksum(block, self, pending.name or name)
        size = header_size(block, self, name)
        sparse = typeflag == _GNU_SPARSE
        if sparse:
            if block[257:263] != _GNU_MAGIC:
                self._fail("a GNU sparse header without the GNU magic", name)
            if pending is _NO_HEADERS:
                self._pending = pending = PendingHeaders()
        if pending is not _NO_HEADERS:
            name = effective_name(name, pending)
            pax = pending.pax
            if b"size" in pax:
                size = pax_int(pax[b"size"], self, "size", name)
            sparse = sparse or bool(pending.sparse_pairs) or any(map(_is_sparse_key, pax))
        if len(name) > self._limits.max_path_bytes:
            self._limit(
                "the path length (limit max_path_bytes)",
                len(name),
                self._limits.max_path_bytes,
                name[:200],
            )
        kind = entry_type(typeflag, name)
        data = entry_data_size(kind, size)
        if typeflag == _GNU_SPARSE and block[482]:
            # The sparse map goes on in extension blocks before the data.
            self._state = _S_SPARSE
            self._need = BLOCK_SIZE
            self._sparse_name = name
            self._sparse_size = data
            return
        self._entry(name, kind, data, plain=typeflag in _PLAIN_FILE_FLAGS and not sparse)

    def _meta(self, data: bytes) -> None:
        self._meta_data(data)
        self._skip(Region.HEADER, 0, self._meta_pad)

    def _meta_data(self, data: bytes) -> None:
        typeflag = self._meta_type
        if typeflag == _PAX_GLOBAL:
            pass  # readers ignore global records; the one these bytes go to checks them
        elif typeflag == _PAX and not _frames(data):
            # Most PAX headers carry only times and xattrs (GNU tar writes one per file), and
            # parsing them again would double the cost of framing: the reader these bytes go
            # to parses and checks them. The size was bounded before the data was kept.
            self._pending.headers += 1
        else:
            self.meta_data(typeflag, data, self._pending)

    def _sparse_block(self, block: bytes) -> None:
        self.sparse_block(self._pending, self._sparse_name)
        if block[504]:
            return  # another extension block follows
        self._entry(self._sparse_name, _REGULAR, self._sparse_size, plain=False)

    def _entry(self, name: bytes, kind: int, data: int, *, plain: bool) -> None:
        """An entry's headers are complete: decide what its ``data`` bytes are."""
        self._pending = _NO_HEADERS
        # GNU tar's "./" in front of every name sends _clean down its slow path; without it
        # the result is the same.
        path = _clean(name[2:] if name[:2] == b"./" else name)
        reference = (
            plain
            and data > 0
            and path != b""
            and 0 not in path
            and not path.rpartition(b"/")[2].startswith(_WHITEOUT)
        )
        if path and (self._refs or reference):
            self._track(path, kind, reference)
        pad = -data % BLOCK_SIZE
        if reference:
            self._announce = (path, data)
            self._state = _S_PAYLOAD
            self._left = data
            self._then_pad = pad
            self._pad_region = Region.PADDING
            self._region = Region.PAYLOAD
        else:
            self._skip(Region.DATA, data, pad)

    def _track(self, path: bytes, kind: int, reference: bool) -> None:
        """Note a referenced path; report an entry that replaces one."""
        key = hash(path)
        if key in self._refs:
            self._refs.discard(key)
            self._sink.stale(path)
        elif kind != _DIRECTORY and key in self._ref_dirs:
            # The applier replaces a directory (and all it holds) by a non-directory.
            self._sink.stale(path)
        if not reference:
            return
        self._refs.add(key)
        parent = path.rpartition(b"/")[0]
        if parent == self._last_dir:
            return
        self._last_dir = parent
        dirs = self._ref_dirs
        while parent:
            key = hash(parent)
            if key in dirs:
                break  # and so are the directories above it
            dirs.add(key)
            parent = parent.rpartition(b"/")[0]


def _frames(pax: bytes) -> bool:
    """Whether PAX data may hold a keyword that changes the framing: path, size, sparse maps.

    Substrings, so a false "yes" (``linkpath``, an xattr named ``path``) only costs a parse.
    """
    return b"path=" in pax or b"size=" in pax or _SPARSE_KEY in pax


def _is_sparse_key(key: bytes) -> bool:
    return key.startswith(_SPARSE_KEY)


# --- the record -----------------------------------------------------------------------------

_SMALL: Final = [bytes((i,)) for i in range(0x80)]


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@final
class _RecordWriter:
    """A :class:`FrameSink` that writes the record format to ``out`` (see the module doc)."""

    def __init__(self, out: BinaryIO) -> None:
        out.write(_HEAD)
        compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
        self._zstd = compressor.stream_writer(out, closefd=False, write_return_read=True)
        self._run = bytearray()
        """Verbatim bytes not yet framed as a DATA operation."""
        self._ops = bytearray()
        """Framed operations not yet handed to zstd."""
        self.total = 0
        self.stale_path: bytes | None = None
        """The first path reported stale, if any."""
        self._closed = False

    def verbatim(self, data: memoryview) -> None:
        size = len(data)
        self.total += size
        run = self._run
        if len(run) + size < _RUN_MAX:
            run += data
            return
        # Top the run up to a whole DATA operation, then frame whole ones straight from
        # ``data`` (a large unreferenced payload is not copied into the run).
        pos = _RUN_MAX - len(run)
        run += data[:pos]
        self._end_run()
        while size - pos >= _RUN_MAX:
            self._ops += b"\x01" + _varint(_RUN_MAX)
            self._flush()
            self._zstd.write(data[pos : pos + _RUN_MAX])
            pos += _RUN_MAX
        run += data[pos:]

    def reference(self, path: bytes, size: int) -> None:
        self.total += size
        self._end_run()
        ops = self._ops
        ops += b"\x02" + _varint(len(path))
        ops += path
        ops += _varint(size)
        if len(ops) >= _OPS_FLUSH:
            self._flush()

    def payload(self, data: memoryview) -> None:
        pass

    def stale(self, path: bytes) -> None:
        if self.stale_path is None:
            self.stale_path = path
        self._end_run()
        self._ops += b"\x03" + _varint(len(path)) + path

    def close(self) -> None:
        """Write END and finish the zstd frame; ``out`` stays open."""
        if self._closed:
            return
        self._closed = True
        self._end_run()
        self._ops += b"\x00" + _varint(self.total)
        self._flush()
        # zstandard's stubs leave close() unannotated; with closefd=False it ends the frame
        # and leaves ``out`` open.
        self._zstd.close()  # type: ignore[no-untyped-call]

    def _end_run(self) -> None:
        run = self._run
        if run:
            ops = self._ops
            ops += b"\x01" + _varint(len(run))
            ops += run
            run.clear()
            if len(ops) >= _OPS_FLUSH:
                self._flush()

    def _flush(self) -> None:
        if self._ops:
            self._zstd.write(self._ops)
            self._ops.clear()


@final
class TarSplitRecorder(io.BufferedIOBase, BinaryIO):
    """Pass a tar through unchanged while recording its tar-split to ``out``.

    Hand it to the consumer in place of the tar (``apply_tar(root, TarSplitRecorder(tar, out,
    limits))``); when the consumer is done, call :meth:`finish`. Bytes go through as the
    consumer asks for them: no copy of the payload, one framing step per read.

    :param stream: the uncompressed tar.
    :param out: where the record goes (left open).
    :param limits: the bounds of the tar, as the consumer applies them.
    :raises InvalidArgument: from a read or :meth:`finish`, a malformed tar.
    :raises LimitExceeded: a limit was broken.
    """

    def __init__(self, stream: BinaryIO, out: BinaryIO, limits: Limits) -> None:
        super().__init__()
        self._stream = stream
        self._record = _RecordWriter(out)
        self._framer = TarFramer(self._record, limits)

    @property
    def exact(self) -> bool:
        """``False`` once the tar replaced a file it had referenced: replay would fail."""
        return self._record.stale_path is None

    @property
    def bytes_read(self) -> int:
        """Bytes of the tar passed through so far."""
        return self._framer.bytes_fed

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self._stream.read(-1 if size is None else size)
        if data:
            self._framer.feed(data)
        return data

    def read1(self, size: int = -1) -> bytes:
        return self.read(size if size >= 0 else CHUNK_SIZE)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def finish(self) -> None:
        """Read what the consumer left of the tar (to EOF), check it ended well, and finish
        the record.

        :raises InvalidArgument: the tar was truncated.
        """
        while self.read(CHUNK_SIZE):
            pass
        self._framer.finish()
        self._record.close()


@final
class TarSplitWriter(io.BufferedIOBase, BinaryIO):
    """Pass a tar being written through to ``sink`` while recording its tar-split to ``out``.

    :param sink: where the tar goes (left open).
    :param out: where the record goes (left open).
    :param limits: bounds for the framer; the tar is laminae's own, the defaults fit.
    """

    def __init__(self, sink: BinaryIO, out: BinaryIO, limits: Limits | None = None) -> None:
        super().__init__()
        self._sink = sink
        self._record = _RecordWriter(out)
        self._framer = TarFramer(self._record, limits or Limits())

    @property
    def exact(self) -> bool:
        """``False`` once the tar replaced a file it had referenced: replay would fail."""
        return self._record.stale_path is None

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._sink.write(data)
        self._framer.feed(data)
        return len(data) if not isinstance(data, memoryview) else data.nbytes

    def flush(self) -> None:
        self._sink.flush()

    def finish(self) -> None:
        """Check the tar ended well and finish the record.

        :raises InvalidArgument: the tar written is truncated.
        """
        self._framer.finish()
        self._record.close()


# --- replay ---------------------------------------------------------------------------------


@final
class _RecordReader:
    """Operations out of a record, a bounded buffer at a time."""

    def __init__(self, record: BinaryIO) -> None:
        head = record.read(len(_HEAD))
        if head[: len(MAGIC)] != MAGIC:
            raise CorruptLayer("tar-split record: not a record (bad magic)")
        if head[len(MAGIC) :] != bytes([VERSION]):
            raise CorruptLayer(f"tar-split record: unknown version {head[len(MAGIC) :]!r}")
        decompressor = zstandard.ZstdDecompressor(max_window_size=_ZSTD_WINDOW_MAX)
        self._zstd = decompressor.stream_reader(record, closefd=False)
        self._buf = b""
        self._pos = 0

    def _fill(self, size: int) -> None:
        if len(self._buf) - self._pos >= size:
            return
        pieces = [self._buf[self._pos :]]
        have = len(pieces[0])
        while have < size:
            try:
                data = self._zstd.read(max(CHUNK_SIZE, size - have))
            except zstandard.ZstdError as exc:
                raise CorruptLayer(f"tar-split record: {exc}") from exc
            if not data:
                raise CorruptLayer("tar-split record: truncated")
            pieces.append(data)
            have += len(data)
        self._buf = b"".join(pieces)
        self._pos = 0

    def byte(self) -> int:
        self._fill(1)
        value = self._buf[self._pos]
        self._pos += 1
        return value

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise CorruptLayer("tar-split record: malformed number")

    def take(self, size: int) -> bytes:
        self._fill(size)
        start = self._pos
        self._pos = start + size
        return self._buf[start : self._pos]

    def at_end(self) -> bool:
        if self._pos < len(self._buf):
            return False
        try:
            return not self._zstd.read(1)
        except zstandard.ZstdError as exc:
            raise CorruptLayer(f"tar-split record: {exc}") from exc


def replay_tar(record: BinaryIO, root: Path, out: BinaryIO) -> None:
    """Write the tar a record was made from, reading file contents from the tree at ``root``.

    Paths are resolved inside ``root`` as the applier resolves them (``openat2`` with
    ``RESOLVE_IN_ROOT``, or the same walk by hand), so a record cannot make this read a file
    outside ``root``; the last component is opened ``O_NOFOLLOW``. Contents are copied in
    pieces of at most 1 MiB. The output should be checked against the DiffID by the caller.

    :param record: a record from :class:`TarSplitRecorder` or :class:`TarSplitWriter`.
    :param root: the tree the tar was applied onto (for overlay, the layer's upper dir).
    :param out: where the tar goes.
    :raises CorruptLayer: a referenced file is missing, is not a regular file or does not
        have the recorded size (the message names its path), the record is malformed, or it
        is marked stale.
    """
    reader = _RecordReader(record)
    tree = _Tree(root)
    buffer = memoryview(bytearray(CHUNK_SIZE))
    total = 0
    try:
        while True:
            op = reader.byte()
            if op == _OP_DATA:
                size = reader.varint()
                if size > _RUN_MAX:
                    raise CorruptLayer(f"tar-split record: a data run of {size} bytes")
                out.write(reader.take(size))
                total += size
            elif op == _OP_FILE:
                path = reader.take(_path_size(reader))
                size = reader.varint()
                _copy_file(tree, path, size, out, buffer)
                total += size
            elif op == _OP_STALE:
                path = reader.take(_path_size(reader))
                raise CorruptLayer(
                    f"tar-split record: '{_text(path)}' was replaced later in the same tar, "
                    "so the tar cannot be rebuilt from the files"
                )
            elif op == _OP_END:
                expected = reader.varint()
                if expected != total:
                    raise CorruptLayer(
                        f"tar-split record: says {expected} tar bytes, its operations {total}"
                    )
                if not reader.at_end():
                    raise CorruptLayer("tar-split record: data after its end")
                return
            else:
                raise CorruptLayer(f"tar-split record: unknown operation {op}")
    finally:
        tree.close()


def _path_size(reader: _RecordReader) -> int:
    size = reader.varint()
    if size > _PATH_MAX:
        raise CorruptLayer(f"tar-split record: a path of {size} bytes")
    return size


def _copy_file(tree: _Tree, path: bytes, size: int, out: BinaryIO, buffer: memoryview) -> None:
    """Copy the content of regular file ``path`` (``size`` bytes) inside ``tree`` to ``out``."""
    clean = _clean(path)
    if not clean or 0 in clean:
        raise CorruptLayer(f"tar-split record: invalid path '{_text(path)}'")
    where = f"layer file '{_text(clean)}'"
    parent, _, name = clean.rpartition(b"/")
    try:
        found = tree.lookup(parent)
        if found is None:
            raise CorruptLayer(f"{where} is missing (tar-split replay)")
        fd = os.open(name, _O_READ_FILE, dir_fd=found[0])
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise CorruptLayer(f"{where} is missing (tar-split replay)") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptLayer(f"{where} is a symbolic link, not the file recorded") from exc
        raise
    except InvalidArgument as exc:
        raise CorruptLayer(f"{where} cannot be resolved: {exc}") from exc
    finally:
        tree.release()
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptLayer(f"{where} is not a regular file (tar-split replay)")
        if st.st_size != size:
            raise CorruptLayer(
                f"{where} has {st.st_size} bytes, the layer tar had {size} (tar-split replay)"
            )
        left = size
        while left:
            count = os.readv(fd, [buffer[: min(left, len(buffer))]])
            if not count:
                raise CorruptLayer(f"{where} shrank while being read (tar-split replay)")
            out.write(buffer[:count])
            left -= count
    finally:
        os.close(fd)
