"""Layer compression: detect it, undo it and apply it as streams, and hash what passes.

Every wrapper here holds at most a chunk or two of data, so peak memory stays small whatever
the size of the layer: gzip output is bounded per call with zlib's ``max_length``, zstd's by
``zstandard``'s stream reader. A zstd frame's window may still need up to 128 MiB (zstd's
default limit, ``--long`` and ``--ultra`` levels use it).

Decompression stays in-process: no ``xz``, ``unpigz`` or ``igzip`` binary is ever run, so
nothing found inside a layer can be executed (CVE-2014-9357, GHSA-x86f-5xw2-fm2r).
"""

from __future__ import annotations

import enum
import hashlib
import io
import zlib
from typing import IO, BinaryIO, Final, Protocol, cast, final

import zstandard

from laminae._exceptions import InvalidArgument, LimitExceeded, Unsupported
from laminae.archive._limits import Limits

__all__ = [
    "Compression",
    "DigestReader",
    "DigestWriter",
    "detect_compression",
    "open_compressor",
    "open_decompressed",
    "sniff_compression",
]

_INPUT_CHUNK: Final = 1 << 18
_OUTPUT_CHUNK: Final = 1 << 20
_HEAD: Final = 512
_GZIP_MAGIC: Final = b"\x1f\x8b"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_UNSUPPORTED_MAGIC: Final = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"LZIP", "lzip"),
    (b"\x5d\x00\x00", "lzma"),
)
_ZSTD_WINDOW_MAX: Final = 1 << 27
_DEFAULT_LIMITS: Final = Limits()


class _Source(Protocol):
    """Anything with a binary ``read`` (a file, a socket's makefile, another wrapper)."""

    def read(self, size: int = ..., /) -> bytes: ...


class _Sink(Protocol):
    """Anything with a binary ``write``."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int | None: ...


class Compression(enum.Enum):
    """How a layer blob is compressed."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


def _looks_like_tar(head: bytes) -> bool:
    if len(head) < _HEAD:
        return False
    block = head[:_HEAD]
    field = block[148:156].split(b"\x00", 1)[0].strip(b" ")
    if not field.isdigit() or b"8" in field or b"9" in field:
        return False
    return int(field, 8) == sum(block) - sum(block[148:156]) + 256


def detect_compression(head: bytes) -> Compression:
    """Tell the compression of a blob from its first bytes (512 are enough).

    A head that is a valid tar header is plain whatever its first bytes spell; otherwise the
    gzip and zstd magic numbers decide, and anything else is taken to be a plain tar (the tar
    reader then says whether it is one).

    :raises Unsupported: the head is xz, bzip2, lz4, lzip or lzma (named in the message).
    """
    if _looks_like_tar(head):
        return Compression.NONE
    if head.startswith(_GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(_ZSTD_MAGIC):
        return Compression.ZSTD
    for magic, name in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            raise Unsupported(f"layer compression {name} is not supported (only gzip and zstd)")
    return Compression.NONE


class _Reader(io.BufferedIOBase, BinaryIO):
    """A read-only binary stream; subclasses implement :meth:`_read_some`."""

    def readable(self) -> bool:
        return True

    def _read_some(self, size: int) -> bytes:
        raise NotImplementedError

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self._read_some(_OUTPUT_CHUNK), b""))
        if size == 0:
            return b""
        return self._read_some(size)

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._read_some(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Writer(io.BufferedIOBase, BinaryIO):
    """A write-only binary stream; subclasses implement :meth:`write`."""

    def writable(self) -> bool:
        return True


@final
class DigestReader(_Reader):
    """Pass reads through, hashing (sha256) and counting the bytes.

    :param stream: where the bytes come from.
    :param max_bytes: more than this many bytes raise :class:`LimitExceeded`; ``None`` for no
        bound.
    :param what: what the bytes are, for the error message.
    """

    def __init__(self, stream: _Source, *, max_bytes: int | None = None, what: str = "layer"):
        super().__init__()
        self._stream = stream
        self._max = max_bytes
        self._what = what
        self._hash = hashlib.sha256()
        self.size = 0
        """Bytes read so far."""

    def _read_some(self, size: int) -> bytes:
        data = self._stream.read(size)
        if data:
            self.size += len(data)
            if self._max is not None and self.size > self._max:
                raise LimitExceeded(f"{self._what}: more than {self._max} bytes (limit max_bytes)")
            self._hash.update(data)
        return data

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the bytes read so far."""
        return f"sha256:{self._hash.hexdigest()}"


@final
class DigestWriter(_Writer):
    """Pass writes through to ``out``, hashing (sha256) and counting the bytes.

    Without ``out`` it only hashes and counts. Closing it does not close ``out``.
    """

    def __init__(self, out: _Sink | None = None) -> None:
        super().__init__()
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0
        """Bytes written so far."""

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._hash.update(data)
        written = len(data) if isinstance(data, (bytes, bytearray)) else data.nbytes
        self.size += written
        if self._out is not None:
            self._out.write(data)
        return written

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the bytes written so far."""
        return f"sha256:{self._hash.hexdigest()}"


# --- decompression --------------------------------------------------------------------------


@final
class _Prefixed(_Reader):
    """``head`` (already read to detect the format), then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: _Source) -> None:
        super().__init__()
        self._head = head
        self._stream = stream
        self.size = 0
        """Bytes passed on so far: the compressed size, for the ratio bound."""

    def _read_some(self, size: int) -> bytes:
        if self._head:
            data, self._head = self._head[:size], self._head[size:]
        else:
            data = self._stream.read(size)
        self.size += len(data)
        return data


@final
class _Bounded(_Reader):
    """Raise :class:`LimitExceeded` once more than ``max_bytes`` came out of ``stream``, or,
    past ``ratio_floor`` bytes, more than ``max_ratio`` times what went in (``compressed``)."""

    def __init__(
        self,
        stream: BinaryIO,
        max_bytes: int,
        what: str,
        *,
        compressed: _Prefixed | None = None,
        max_ratio: int = 0,
        ratio_floor: int = 0,
    ) -> None:
        super().__init__()
        self._stream = stream
        self._max = max_bytes
        self._what = what
        self._compressed = compressed
        self._max_ratio = max_ratio
        self._ratio_floor = ratio_floor
        self._size = 0

    def _read_some(self, size: int) -> bytes:
        data = self._stream.read(size)
        self._size += len(data)
        if self._size > self._max:
            raise LimitExceeded(
                f"{self._what}: more than {self._max} bytes decompressed (limit max_bytes)"
            )
        compressed = self._compressed
        if (
            compressed is not None
            and self._size > self._ratio_floor
            and self._size > self._max_ratio * compressed.size
        ):
            raise LimitExceeded(
                f"{self._what}: {self._size} bytes decompressed from {compressed.size}, more "
                f"than {self._max_ratio} times as many (limit max_compression_ratio, past "
                f"compression_ratio_floor_bytes = {self._ratio_floor}); a decompression bomb? "
                "Raise it in [storage.limits] of storage.toml or in Limits if the layer is real"
            )
        return data


@final
class _GzipReader(_Reader):
    """RFC 1952 gzip, any number of members, CRC and length checked by zlib."""

    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        self._source = source
        self._inflate = zlib.decompressobj(wbits=31)
        self._input = b""
        self._finished = False

    def _read_some(self, size: int) -> bytes:
        while not self._finished:
            if self._inflate.eof:
                rest = self._inflate.unused_data or self._source.read(_INPUT_CHUNK)
                if not rest:
                    self._finished = True
                    break
                # Another member follows (pigz and concatenated gzip files write several).
                self._inflate = zlib.decompressobj(wbits=31)
                self._input = rest
            data = self._input or self._source.read(_INPUT_CHUNK)
            if not data:
                raise InvalidArgument("gzip layer: truncated (the stream ends inside a member)")
            try:
                # max_length bounds the output of this call: a bomb inflates 1000:1.
                out = self._inflate.decompress(data, size)
            except zlib.error as exc:
                raise InvalidArgument(f"gzip layer: {exc}") from exc
            self._input = self._inflate.unconsumed_tail
            if out:
                return out
        return b""


@final
class _ZstdFrames(_Reader):
    """Pass the compressed bytes through while following zstd's frame structure.

    ``zstandard``'s stream reader returns a clean EOF when the input stops inside a frame
    (0.25); following the frame and block headers (RFC 8878 section 3.1) is how a truncated
    layer is told from a complete one.
    """

    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        self._source = source
        self._header = b""  # bytes of a frame or block header being collected
        self._need = 4  # header bytes wanted, or 0 while skipping content
        self._skip = 0  # content bytes still to pass
        self._state = "magic"
        self._checksum = False

    def _read_some(self, size: int) -> bytes:
        data = self._source.read(size)
        if not data:
            if self._state != "magic" or self._header or self._skip:
                raise InvalidArgument("zstd layer: truncated (the stream ends inside a frame)")
            return data
        self._follow(data)
        return data

    def _follow(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            take = min(self._need - len(self._header), end - pos)
            self._header += data[pos : pos + take]
            pos += take
            if len(self._header) == self._need:
                header, self._header = self._header, b""
                self._advance(header)

    def _advance(self, header: bytes) -> None:
        """A complete header was read: say what comes next (content to skip, then a header)."""
        state = self._state
        if state == "magic":
            if header == _ZSTD_MAGIC:
                self._state, self._need = "descriptor", 1
            elif header[0] & 0xF0 == 0x50 and header[1:] == b"\x2a\x4d\x18":
                self._state, self._need = "skippable", 4
            else:
                raise InvalidArgument("zstd layer: not a zstd frame")
        elif state == "skippable":
            self._skip = int.from_bytes(header, "little")
            self._state, self._need = "magic", 4
        elif state == "descriptor":
            descriptor = header[0]
            single = descriptor >> 5 & 1
            self._checksum = bool(descriptor >> 2 & 1)
            # Window descriptor, dictionary id, frame content size (RFC 8878 3.1.1.1).
            rest = (1 - single) + (0, 1, 2, 4)[descriptor & 3] + (single, 2, 4, 8)[descriptor >> 6]
            if rest:
                self._state, self._need = "frame-header", rest
            else:
                self._state, self._need = "block", 3
        elif state == "frame-header":
            self._state, self._need = "block", 3
        elif state == "block":
            value = int.from_bytes(header, "little")
            kind = value >> 1 & 3
            if kind == 3:
                raise InvalidArgument("zstd layer: reserved block type")
            self._skip = 1 if kind == 1 else value >> 3  # an RLE block stores one byte
            if not value & 1:
                self._state, self._need = "block", 3
            elif self._checksum:
                self._state, self._need = "checksum", 4
            else:
                self._state, self._need = "magic", 4
        else:  # checksum
            self._state, self._need = "magic", 4


@final
class _ZstdReader(_Reader):
    """RFC 8878 zstd, any number of frames (skippable ones too)."""

    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        decompressor = zstandard.ZstdDecompressor(max_window_size=_ZSTD_WINDOW_MAX)
        self._reader = decompressor.stream_reader(
            _ZstdFrames(source), read_size=_INPUT_CHUNK, read_across_frames=True, closefd=False
        )

    def _read_some(self, size: int) -> bytes:
        try:
            data: bytes = self._reader.read(size)
        except zstandard.ZstdError as exc:
            raise InvalidArgument(f"zstd layer: {exc}") from exc
        return data


def sniff_compression(stream: _Source) -> tuple[Compression, BinaryIO]:
    """Read the first bytes of ``stream`` to tell its compression; return it and a stream
    that gives those bytes again, then the rest."""
    return _sniff(stream)


def _sniff(stream: _Source) -> tuple[Compression, _Prefixed]:
    head = b""
    while len(head) < _HEAD:
        data = stream.read(_HEAD - len(head))
        if not data:
            break
        head += data
    return detect_compression(head), _Prefixed(head, stream)


def open_decompressed(
    stream: _Source,
    *,
    max_bytes: int,
    max_ratio: int = _DEFAULT_LIMITS.max_compression_ratio,
    ratio_floor: int = _DEFAULT_LIMITS.compression_ratio_floor_bytes,
) -> BinaryIO:
    """The plain tar inside ``stream``, whatever of gzip, zstd or nothing it is wrapped in.

    The first bytes are read to detect the format (:func:`detect_compression`) and handed on.

    :param max_bytes: more decompressed bytes than this raise :class:`LimitExceeded`.
    :param max_ratio: past ``ratio_floor`` decompressed bytes, more than this many per
        compressed byte raise :class:`LimitExceeded` (a decompression bomb); see
        :class:`~laminae.archive._limits.Limits`.
    :param ratio_floor: decompressed bytes below which any ratio passes.
    :raises Unsupported: xz, bzip2 and other formats (named).
    :raises InvalidArgument: (when reading) corrupt or truncated compressed data.
    """
    compression, source = _sniff(stream)
    inner: BinaryIO
    if compression is Compression.GZIP:
        inner = _GzipReader(source)
    elif compression is Compression.ZSTD:
        inner = _ZstdReader(source)
    else:
        # Nothing to bound the ratio of: a plain tar is as large as what it writes.
        return _Bounded(source, max_bytes, f"{compression.value} layer")
    return _Bounded(
        inner,
        max_bytes,
        f"{compression.value} layer",
        compressed=source,
        max_ratio=max_ratio,
        ratio_floor=ratio_floor,
    )


# --- compression ----------------------------------------------------------------------------


@final
class _GzipWriter(_Writer):
    def __init__(self, out: _Sink, level: int) -> None:
        super().__init__()
        self._out = out
        # wbits=31: a gzip wrapper whose header has mtime 0 and no name, so the same tar
        # always gives the same blob.
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, 31)

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        out = self._deflate.compress(data)
        if out:
            self._out.write(out)
        return len(data) if isinstance(data, (bytes, bytearray)) else data.nbytes

    def close(self) -> None:
        if not self.closed:
            self._out.write(self._deflate.flush())
        super().close()


@final
class _ZstdWriter(_Writer):
    def __init__(self, out: _Sink, level: int) -> None:
        super().__init__()
        compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
        # zstandard's stubs ask for IO[bytes]; it calls only write (and flush, where present).
        self._writer = compressor.stream_writer(cast(IO[bytes], out), closefd=False)

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._writer.write(data)
        return len(data) if isinstance(data, (bytes, bytearray)) else data.nbytes

    def close(self) -> None:
        if not self.closed:
            self._writer.close()  # type: ignore[no-untyped-call]  # ends the frame; closefd=False leaves ``out`` open
        super().close()


@final
class _PlainWriter(_Writer):
    def __init__(self, out: _Sink) -> None:
        super().__init__()
        self._out = out

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._out.write(data)
        return len(data) if isinstance(data, (bytes, bytearray)) else data.nbytes


def open_compressor(out: _Sink, compression: Compression, *, level: int | None = None) -> BinaryIO:
    """A stream that compresses what is written to it into ``out``.

    Closing it ends the gzip member or zstd frame; ``out`` stays open.

    :param level: gzip level (default 6, zlib's), or zstd level (default 3).
    """
    if compression is Compression.GZIP:
        return _GzipWriter(out, 6 if level is None else level)
    if compression is Compression.ZSTD:
        return _ZstdWriter(out, 3 if level is None else level)
    return _PlainWriter(out)
