"""Build layer tars for tests, byte by byte where a test needs a tar no honest tool writes.

Independent of laminae's own writer on purpose: the headers here follow POSIX ustar and
pax(1) directly, so a test of the reader does not share a bug with the writer. Well-formed
tars come from :mod:`tarfile` (writing is not the risky side) or from GNU tar itself.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from typing import Final

# A VFS_CAP_REVISION_2 capability set granting cap_net_bind_service (bit 10), as setcap writes.
CAPABILITY: Final = bytes.fromhex("0100000200040000000000000000000000000000")


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, value)


def header(
    name: bytes,
    typeflag: bytes = b"0",
    *,
    size: int = 0,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_700_000_000,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    prefix: bytes = b"",
    magic: bytes = b"ustar\x0000",
    size_field: bytes | None = None,
) -> bytes:
    """One 512-byte ustar header block with a correct checksum."""
    block = b"".join(
        (
            name[:100].ljust(100, b"\x00"),
            _octal(mode, 8),
            _octal(uid, 8),
            _octal(gid, 8),
            size_field if size_field is not None else _octal(size, 12),
            _octal(mtime, 12),
            b" " * 8,
            typeflag,
            linkname[:100].ljust(100, b"\x00"),
            magic,
            bytes(64),
            _octal(devmajor, 8),
            _octal(devminor, 8),
            prefix.ljust(155, b"\x00"),
            bytes(12),
        )
    )
    assert len(block) == 512
    checksum = b"%06o\x00 " % sum(block)
    return block[:148] + checksum + block[156:]


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def member(name: bytes, data: bytes = b"", typeflag: bytes = b"0", **fields: object) -> bytes:
    """A header and its padded data."""
    return header(name, typeflag, size=len(data), **fields) + pad(data)  # type: ignore[arg-type]


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def pax(records: Iterable[tuple[bytes, bytes]], typeflag: bytes = b"x") -> bytes:
    """A PAX extended (or, with ``g``, global) header for the entry that follows."""
    data = b"".join(pax_record(k, v) for k, v in records)
    return member(b"PaxHeaders/x", data, typeflag)


def gnu_long(kind: bytes, value: bytes) -> bytes:
    """A GNU ``L`` (long name) or ``K`` (long link) header."""
    return member(b"././@LongLink", value + b"\x00", kind, magic=b"ustar  \x00")


END: Final = bytes(1024)


def tar(*members: bytes) -> bytes:
    return b"".join(members) + END


class Layer:
    """A tar built with :mod:`tarfile` from a few calls."""

    def __init__(self, format: int = tarfile.PAX_FORMAT) -> None:
        self._buffer = io.BytesIO()
        # Closed by bytes(): the builder is the context.
        self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=format)  # noqa: SIM115

    def _add(
        self,
        name: str,
        kind: bytes,
        data: bytes = b"",
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: float = 1_700_000_000,
        linkname: str = "",
        xattrs: dict[str, str] | None = None,
        pax: dict[str, str] | None = None,
        devmajor: int = 0,
        devminor: int = 0,
    ) -> Layer:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = len(data)
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.mtime = mtime
        info.linkname = linkname
        info.devmajor, info.devminor = devmajor, devminor
        headers = dict(pax or {})
        for key, value in (xattrs or {}).items():
            headers[f"SCHILY.xattr.{key}"] = value
        info.pax_headers = headers
        self._tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        return self

    def file(self, name: str, data: bytes = b"", **kw: object) -> Layer:
        return self._add(name, tarfile.REGTYPE, data, **kw)  # type: ignore[arg-type]

    def dir(self, name: str, **kw: object) -> Layer:
        kw.setdefault("mode", 0o755)
        return self._add(name, tarfile.DIRTYPE, **kw)  # type: ignore[arg-type]

    def symlink(self, name: str, target: str, **kw: object) -> Layer:
        kw.setdefault("mode", 0o777)
        return self._add(name, tarfile.SYMTYPE, linkname=target, **kw)  # type: ignore[arg-type]

    def hardlink(self, name: str, target: str, **kw: object) -> Layer:
        return self._add(name, tarfile.LNKTYPE, linkname=target, **kw)  # type: ignore[arg-type]

    def char(self, name: str, major: int, minor: int, **kw: object) -> Layer:
        kw.update(devmajor=major, devminor=minor)
        return self._add(name, tarfile.CHRTYPE, **kw)  # type: ignore[arg-type]

    def block(self, name: str, major: int, minor: int, **kw: object) -> Layer:
        kw.update(devmajor=major, devminor=minor)
        return self._add(name, tarfile.BLKTYPE, **kw)  # type: ignore[arg-type]

    def fifo(self, name: str, **kw: object) -> Layer:
        return self._add(name, tarfile.FIFOTYPE, **kw)  # type: ignore[arg-type]

    def bytes(self) -> bytes:
        self._tar.close()
        return self._buffer.getvalue()


def make_tar(
    files: dict[str, bytes], *, dirs: Iterable[str] = (), whiteouts: Iterable[str] = ()
) -> bytes:
    """A small uncompressed layer tar with fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 1_700_000_000
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        for name in whiteouts:
            head, _, tail = name.rpartition("/")
            info = tarfile.TarInfo(f"{head}/.wh.{tail}" if head else f".wh.{tail}")
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(b""))
    return buf.getvalue()
