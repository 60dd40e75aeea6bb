"""Layer compression: detection, streaming gzip and zstd both ways, digests, bombs."""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import tarfile
import zlib

import pytest
import zstandard
from tarbuild import Layer

from laminae._exceptions import InvalidArgument, LimitExceeded, Unsupported
from laminae.archive._compression import (
    Compression,
    DigestReader,
    DigestWriter,
    detect_compression,
    open_compressor,
    open_decompressed,
)

PAYLOAD = os.urandom(1 << 20) + bytes(3 << 20) + b"tail"


def compress(data: bytes, compression: Compression, **kwargs: int) -> bytes:
    out = io.BytesIO()
    writer = open_compressor(out, compression, **kwargs)
    for start in range(0, len(data), 100_000):
        writer.write(data[start : start + 100_000])
    writer.close()
    assert not out.closed
    return out.getvalue()


def read_all(stream: io.BufferedIOBase | object, size: int = 1 << 20) -> bytes:
    pieces = []
    while piece := stream.read(size):  # type: ignore[attr-defined]
        assert len(piece) <= size
        pieces.append(piece)
    return b"".join(pieces)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (gzip.compress(b"x"), Compression.GZIP),
        (zstandard.ZstdCompressor().compress(b"x"), Compression.ZSTD),
        (Layer().file("f", b"x").bytes(), Compression.NONE),
        # A plain tar whose first name spells a compression magic is still plain.
        (Layer().file("BZh91AY&SY").bytes(), Compression.NONE),
        (Layer().file("\x1f\x8bname").bytes(), Compression.NONE),
        (b"", Compression.NONE),
    ],
    ids=["gzip", "zstd", "tar", "tar-named-like-bzip2", "tar-named-like-gzip", "empty"],
)
def test_detect(head: bytes, expected: Compression) -> None:
    assert detect_compression(head[:512]) is expected


@pytest.mark.parametrize(
    ("blob", "name"),
    [
        (lzma.compress(b"layer"), "xz"),
        (b"BZh91AY&SY" + bytes(100), "bzip2"),
        (b"\x04\x22\x4d\x18" + bytes(20), "lz4"),
    ],
)
def test_unsupported_compression_is_named(blob: bytes, name: str) -> None:
    with pytest.raises(Unsupported, match=f"layer compression {name} is not supported"):
        open_decompressed(io.BytesIO(blob), max_bytes=1 << 20)


@pytest.mark.parametrize("compression", list(Compression), ids=lambda c: c.value)
def test_round_trip(compression: Compression) -> None:
    blob = compress(PAYLOAD, compression)
    if compression is not Compression.NONE:
        assert len(blob) < len(PAYLOAD) // 2
    assert read_all(open_decompressed(io.BytesIO(blob), max_bytes=len(PAYLOAD))) == PAYLOAD


def test_gzip_is_readable_by_gzip_and_deterministic() -> None:
    blob = compress(PAYLOAD, Compression.GZIP, level=1)
    assert gzip.decompress(blob) == PAYLOAD
    assert compress(PAYLOAD, Compression.GZIP, level=1) == blob
    assert blob[4:8] == bytes(4)  # no mtime in the gzip header
    assert len(compress(PAYLOAD, Compression.GZIP, level=9)) <= len(blob)


def test_zstd_is_readable_by_zstandard() -> None:
    blob = compress(PAYLOAD, Compression.ZSTD)
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob))
    assert read_all(reader) == PAYLOAD


def test_gzip_multi_member() -> None:
    blob = gzip.compress(b"first ") + gzip.compress(b"") + gzip.compress(b"second")
    assert read_all(open_decompressed(io.BytesIO(blob), max_bytes=100)) == b"first second"


def test_zstd_multi_frame_and_skippable_frame() -> None:
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    skippable = b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"skip!"
    blob = compressor.compress(b"one ") + skippable + compressor.compress(b"two")
    assert read_all(open_decompressed(io.BytesIO(blob), max_bytes=100)) == b"one two"


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD], ids=["gzip", "zstd"])
@pytest.mark.parametrize("cut", [1, 7, 1000])
def test_truncated_stream_is_refused(compression: Compression, cut: int) -> None:
    blob = compress(PAYLOAD, compression)[:-cut]
    with pytest.raises(InvalidArgument, match="truncated"):
        read_all(open_decompressed(io.BytesIO(blob), max_bytes=1 << 30))


def test_corrupt_gzip_is_refused() -> None:
    blob = bytearray(compress(PAYLOAD, Compression.GZIP))
    blob[-6] ^= 0xFF  # the CRC
    with pytest.raises(InvalidArgument, match="gzip layer"):
        read_all(open_decompressed(io.BytesIO(bytes(blob)), max_bytes=1 << 30))


def test_gzip_trailing_garbage_is_refused() -> None:
    blob = gzip.compress(b"data") + b"garbage"
    with pytest.raises(InvalidArgument, match="gzip layer"):
        read_all(open_decompressed(io.BytesIO(blob), max_bytes=100))


def test_corrupt_zstd_is_refused() -> None:
    blob = bytearray(compress(PAYLOAD, Compression.ZSTD))
    blob[len(blob) // 2 : len(blob) // 2 + 64] = bytes(64)
    with pytest.raises(InvalidArgument, match="zstd layer"):
        read_all(open_decompressed(io.BytesIO(bytes(blob)), max_bytes=1 << 30))


def _gzip_bomb(size: int) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join(deflate.compress(zeros) for _ in range(size >> 20)) + deflate.flush()


def _zstd_bomb(size: int) -> bytes:
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=19).stream_writer(out, closefd=False) as writer:
        zeros = bytes(1 << 20)
        for _ in range(size >> 20):
            writer.write(zeros)
    return out.getvalue()


@pytest.mark.parametrize("make", [_gzip_bomb, _zstd_bomb], ids=["gzip", "zstd"])
def test_decompression_bomb_hits_the_byte_limit_in_small_steps(make: object) -> None:
    blob = make(1 << 30)  # type: ignore[operator]
    assert len(blob) < 2 << 20
    stream = open_decompressed(io.BytesIO(blob), max_bytes=64 << 20)
    largest = 0
    with pytest.raises(LimitExceeded, match="max_bytes"):
        while piece := stream.read(1 << 20):
            largest = max(largest, len(piece))
    assert largest <= 1 << 20  # one read never inflates more than was asked for


def test_plain_stream_limit() -> None:
    data = Layer().file("f", bytes(10_000)).bytes()
    with pytest.raises(LimitExceeded):
        read_all(open_decompressed(io.BytesIO(data), max_bytes=5000))


def test_digest_reader_hashes_and_counts() -> None:
    reader = DigestReader(io.BytesIO(PAYLOAD))
    assert read_all(reader, 333_333) == PAYLOAD
    assert reader.size == len(PAYLOAD)
    assert reader.digest == "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()
    buffer = bytearray(10)
    again = DigestReader(io.BytesIO(b"abc"))
    assert again.readinto(buffer) == 3 and bytes(buffer[:3]) == b"abc"
    assert again.digest == "sha256:" + hashlib.sha256(b"abc").hexdigest()


def test_digest_reader_limit() -> None:
    reader = DigestReader(io.BytesIO(bytes(100)), max_bytes=99, what="layer blob")
    with pytest.raises(LimitExceeded, match="layer blob: more than 99 bytes"):
        read_all(reader)


def test_digest_writer_and_compressor_chain() -> None:
    """The store's diff path: plain digest over the tar, compressed digest over the blob."""
    out = io.BytesIO()
    written = DigestWriter(out)
    compressor = open_compressor(written, Compression.GZIP)
    plain = DigestWriter(compressor)
    plain.write(PAYLOAD[:1000])
    plain.write(memoryview(PAYLOAD)[1000:])
    compressor.close()
    assert plain.digest == "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()
    assert plain.size == len(PAYLOAD)
    assert written.digest == "sha256:" + hashlib.sha256(out.getvalue()).hexdigest()
    assert written.size == len(out.getvalue())
    assert gzip.decompress(out.getvalue()) == PAYLOAD


def test_layer_through_every_wrapper_gives_the_diffid() -> None:
    """The store's import path: DigestReader(open_decompressed(DigestReader(blob)))."""
    layer = Layer().file("a", os.urandom(5000)).dir("d").bytes()
    blob = compress(layer, Compression.ZSTD)
    compressed = DigestReader(io.BytesIO(blob))
    plain = DigestReader(open_decompressed(compressed, max_bytes=1 << 20))
    with tarfile.open(fileobj=plain, mode="r|") as archive:
        assert [m.name for m in archive] == ["a", "d"]
    read_all(plain)
    assert plain.digest == "sha256:" + hashlib.sha256(layer).hexdigest()
    assert compressed.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
