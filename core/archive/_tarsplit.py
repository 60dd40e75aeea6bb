"""Tar-split: rebuild the exact bytes of an applied layer tar from the layer's files.

A layer's DiffID is the sha256 of its uncompressed tar, and the tar is gone once applied: the
same files written out again by :func:`~laminae.archive._write.write_changes_tar` give another
tar (other header fields, order, padding, PAX records), so another DiffID. Like containers'
``tar-split`` (what Moby and containers/storage keep for the same reason), this module records
everything in the tar that is *not* the content of a regular file, byte for byte, and each
regular file's content as a reference ``(path, size)``, while the tar streams past. Replaying
the record against the layer's tree gives the very same bytes.

* :class:`TarSplitRecorder` is a read-through stream (wrap the tar handed to
  :func:`~laminae.archive._apply.apply_tar`). It frames the tar with the one tar reader,
  :class:`~laminae.archive._tarstream.TarReader`, a step ahead of its consumer: the reader
  enforces every limit, and says where each entry's headers end and its data begins
  (:attr:`~laminae.archive._tarstream.TarReader.offset`); the recorder keeps the bytes the
  reader took from the stream and records them, verbatim or as a reference.
* :func:`replay_tar` writes the tar back.

**What is a reference.** An entry's payload is recorded as a reference only when the entry is
a plain regular file (type ``0``, ``\\0`` or ``7``; not a sparse file, old-GNU ``S`` or PAX
``GNU.sparse.*`` with a map), with a size above zero, and a name that cleans (as the applier
cleans it: no leading ``/`` or ``./``, ``..`` collapsed) to a path whose last component does
not start with ``.wh.``. Every other byte (headers, extension headers, padding, the data of
other entries, the end blocks and whatever follows them) is stored verbatim.

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

import collections
import errno
import io
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Final, cast, final

import zstandard

from laminae._exceptions import CorruptLayer, InvalidArgument
from laminae.archive._limits import Limits
from laminae.archive._tarheader import EntryType, printable
from laminae.archive._tarstream import CHUNK_SIZE, TarEntry, TarReader
from laminae.archive._tree import O_READ_FILE, Tree, clean_name
from laminae.archive._whiteouts import WHITEOUT_PREFIX

__all__ = ["TarSplitRecorder", "replay_tar"]

MAGIC: Final = b"LTSPLIT"
VERSION: Final = 1
_HEAD: Final = MAGIC + bytes([VERSION])

_OP_END: Final = 0x00
_OP_DATA: Final = 0x01
_OP_FILE: Final = 0x02
_OP_STALE: Final = 0x03

_REGULAR: Final = EntryType.REGULAR.value
_DIRECTORY: Final = EntryType.DIRECTORY.value

_RUN_MAX: Final = CHUNK_SIZE
"""Largest DATA operation written, and so the most a replay holds of one."""
_OPS_FLUSH: Final = 1 << 18
"""Framed operations are handed to zstd in pieces of about this size (one call, not one per
entry)."""
_PATH_MAX: Final = 1 << 16
"""Largest path a replay accepts from a record (the tar's own bound is Limits.max_path_bytes)."""
_ZSTD_LEVEL: Final = 3
_ZSTD_WINDOW_MAX: Final = 1 << 27
_EVERYTHING: Final = 1 << 62
"""An offset past the end of any tar (``max_bytes`` is far below it)."""


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
    """Writes the record format to ``out`` (see the module doc), as it is told in tar order."""

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
class _Tap:
    """The tar as the recorder's reader reads it: each read goes through ``take``, which
    keeps the bytes for the consumer and the record."""

    def __init__(self, take: Callable[[int], bytes]) -> None:
        self.read = take


@final
class TarSplitRecorder(io.BufferedIOBase, BinaryIO):
    """Pass a tar through unchanged while recording its tar-split to ``out``.

    Hand it to the consumer in place of the tar (``apply_tar(root, TarSplitRecorder(tar, out,
    limits))``); when the consumer is done, call :meth:`finish`. The tar is read, a little
    ahead of the consumer, by a :class:`~laminae.archive._tarstream.TarReader` within
    ``limits``: a tar the reader refuses fails here with the reader's error, whatever the
    consumer does with it. Memory stays bounded by about what the reader holds (a chunk of
    the stream and one entry's extension headers).

    :param stream: the uncompressed tar.
    :param out: where the record goes (left open).
    :param limits: the bounds of the tar, as the consumer applies them.
    :raises InvalidArgument: from a read or :meth:`finish`, a malformed or truncated tar.
    :raises LimitExceeded: a limit was broken.
    """

    def __init__(self, stream: BinaryIO, out: BinaryIO, limits: Limits) -> None:
        super().__init__()
        self._stream = stream
        self._record = _RecordWriter(out)
        self._reader = TarReader(cast(BinaryIO, _Tap(self._take)), limits, drain=False)
        self._chunks: Iterator[tuple[int, memoryview | bytes]] | None = None
        self._ended = False
        """Whether the reader found the end of the archive (what follows is verbatim)."""
        self._ready: collections.deque[bytes] = collections.deque()
        """Bytes the reader took from the stream, not yet handed to the consumer."""
        self._ready_size = 0
        self._unrecorded: collections.deque[memoryview] = collections.deque()
        """Bytes the reader took from the stream, not yet recorded; they start at
        :attr:`_recorded`."""
        self._recorded = 0
        self._payload_end = 0
        """The end of the last referenced payload: bytes before it are not recorded."""
        self._passed = 0
        # Hashes of referenced paths and of the directories above them, to see a later entry
        # replace one (a hash collision only costs a false "stale", never wrong bytes).
        self._refs: set[int] = set()
        self._ref_dirs: set[int] = set()
        self._last_dir = b""

    @property
    def exact(self) -> bool:
        """``False`` once the tar replaced a file it had referenced: replay would fail."""
        return self._record.stale_path is None

    @property
    def bytes_read(self) -> int:
        """Bytes of the tar passed through so far."""
        return self._passed

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        want = _EVERYTHING if size is None or size < 0 else size
        while self._ready_size < want and self._step():
            pass
        ready = self._ready
        pieces = []
        taken = 0
        while ready and taken < want:
            piece = ready.popleft()
            if taken + len(piece) > want:
                ready.appendleft(piece[want - taken :])
                piece = piece[: want - taken]
            pieces.append(piece)
            taken += len(piece)
        self._ready_size -= taken
        self._passed += taken
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

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
        self._record.close()

    # --- the reader's side ----------------------------------------------------------------

    def _step(self) -> bool:
        """Let the reader take the next piece of the tar: an entry's headers, a chunk of its
        data, or a piece of what follows the end; ``False`` at the end of the stream."""
        reader = self._reader
        if self._chunks is not None:
            if next(self._chunks, None) is None:
                self._chunks = None
        elif not self._ended:
            entry = reader.next()
            if entry is None:
                self._ended = True
            else:
                self._entry(entry, reader.offset)
                if entry.buffered() is None:
                    self._chunks = entry.chunks()
        elif not reader.read_trailer():
            return False
        self._record_until(_EVERYTHING if self._ended else reader.offset)
        return True

    def _take(self, size: int) -> bytes:
        """What the reader asks of the stream (the reader's ``stream.read``)."""
        data = self._stream.read(size)
        if data:
            self._ready.append(data)
            self._ready_size += len(data)
            self._unrecorded.append(memoryview(data))
        return data

    def _entry(self, entry: TarEntry, data_offset: int) -> None:
        """An entry's headers are read and its data begins at ``data_offset``: record the
        headers, and a reference if the data is a file's content."""
        self._record_until(data_offset)
        name = entry.name
        # GNU tar's "./" in front of every name sends clean_name down its slow path; without
        # it the result is the same.
        path = clean_name(name[2:] if name[:2] == b"./" else name)
        size = entry.size
        reference = (
            entry.type == _REGULAR
            and entry.sparse is None
            and size > 0
            and path != b""
            and 0 not in path
            and not path.rpartition(b"/")[2].startswith(WHITEOUT_PREFIX)
        )
        if path and (self._refs or reference):
            self._track(path, entry.type, reference)
        if reference:
            self._record.reference(path, size)
            self._payload_end = data_offset + size

    def _record_until(self, offset: int) -> None:
        """Record the bytes taken from the stream before ``offset``: verbatim, but for a
        referenced payload, which :meth:`_entry` recorded as a reference."""
        unrecorded = self._unrecorded
        while unrecorded and self._recorded < offset:
            piece = unrecorded[0]
            size = min(len(piece), offset - self._recorded)
            payload = self._payload_end - self._recorded
            if payload > 0:
                size = min(size, payload)
            else:
                self._record.verbatim(piece[:size])
            self._recorded += size
            if size == len(piece):
                unrecorded.popleft()
            else:
                unrecorded[0] = piece[size:]

    def _track(self, path: bytes, kind: int, reference: bool) -> None:
        """Note a referenced path; report an entry that replaces one."""
        key = hash(path)
        if key in self._refs:
            self._refs.discard(key)
            self._record.stale(path)
        elif kind != _DIRECTORY and key in self._ref_dirs:
            # The applier replaces a directory (and all it holds) by a non-directory.
            self._record.stale(path)
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

    :param record: a record from :class:`TarSplitRecorder`.
    :param root: the tree the tar was applied onto (for overlay, the layer's upper dir).
    :param out: where the tar goes.
    :raises CorruptLayer: a referenced file is missing, is not a regular file or does not
        have the recorded size (the message names its path), the record is malformed, or it
        is marked stale.
    """
    reader = _RecordReader(record)
    tree = Tree(root)
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
                    f"tar-split record: '{printable(path)}' was replaced later in the same tar, "
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


def _copy_file(tree: Tree, path: bytes, size: int, out: BinaryIO, buffer: memoryview) -> None:
    """Copy the content of regular file ``path`` (``size`` bytes) inside ``tree`` to ``out``."""
    clean = clean_name(path)
    if not clean or 0 in clean:
        raise CorruptLayer(f"tar-split record: invalid path '{printable(path)}'")
    where = f"layer file '{printable(clean)}'"
    parent, _, name = clean.rpartition(b"/")
    try:
        found = tree.lookup(parent)
        if found is None:
            raise CorruptLayer(f"{where} is missing (tar-split replay)")
        fd = os.open(name, O_READ_FILE, dir_fd=found[0])
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
