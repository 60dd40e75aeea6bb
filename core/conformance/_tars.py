"""Layer tars built entry by entry, as an image builder would write them.

:class:`LayerTar` writes POSIX (PAX) tars with the stdlib :mod:`tarfile` header code, and
writes the PAX extended headers itself, so that a test can say exactly what a layer holds:
names that are not UTF-8, ``SCHILY.xattr.*`` records with binary values and binary names
(which :class:`tarfile.TarFile` cannot write), nanosecond mtimes, whiteouts, opaque
markers, and raw bytes for hostile input. Nothing here reads a tar: the suite reads results
back from real mounts.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator, Mapping
from typing import Final

__all__ = [
    "BLOCK",
    "DEFAULT_MTIME",
    "UNOWNED_MAJOR",
    "UNREGISTRABLE_MAJOR",
    "LayerTar",
    "file_header",
    "host_majors",
    "pax_header",
    "pax_record",
]

BLOCK: Final = 512
DEFAULT_MTIME: Final = 1_700_000_000
"""Every entry's mtime unless given: fixed, so that the same builder gives the same bytes."""

UNOWNED_MAJOR: Final = 240
"""The major number of the suite's device nodes, character and block.

No host driver may own the numbers of a device node in test data: a driver that copies a
layer by reading its files (``shutil.copytree``) opens every node it meets, and ``tty0``
(4, 0) blocks that read for ever, ``sda`` (8, 0) hands it a disk. A node nobody owns fails
to open at once (``ENXIO``). 240 is in the range Linux keeps for local and experimental use
(``Documentation/admin-guide/devices.txt``: 240-254, character and block), so no driver is
assigned it; drivers that ask for a major at run time are handed one counting down from
254, character and block alike, so 240 is the last of that range a host would give out
(hosts commonly use a handful: 245-254 character and 253-254 block here).
:meth:`LayerTar.chardev` and :meth:`LayerTar.blockdev` refuse a major that
``/proc/devices`` lists, so a host where it is taken fails loudly rather than make the node.
"""

UNREGISTRABLE_MAJOR: Final = 4095
"""The major of the one node whose numbers need more than the old 8-bit fields (with minor
65536): 4095 is the largest a Linux ``dev_t`` holds (12 bits), and no driver can own it,
since the kernel refuses to register any major from 512 up (``CHRDEV_MAJOR_MAX``,
``BLKDEV_MAJOR_MAX``)."""

WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"

_USTAR_NAME: Final = 100
_USTAR_ID_MAX: Final = 0o7777777


def host_majors() -> dict[str, dict[int, str]]:
    """The majors this host's drivers own, as ``/proc/devices`` lists them:
    ``{"char": {1: "mem", ...}, "block": {7: "loop", ...}}``."""
    owned: dict[str, dict[int, str]] = {"char": {}, "block": {}}
    section: dict[int, str] | None = None
    with open("/proc/devices") as devices:
        for line in devices:
            if line.startswith("Character devices:"):
                section = owned["char"]
            elif line.startswith("Block devices:"):
                section = owned["block"]
            elif section is not None and line.strip():
                number, _, name = line.strip().partition(" ")
                section[int(number)] = name.strip()
    return owned


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else os.fsencode(value)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def pax_record(key: bytes, value: bytes) -> bytes:
    """One PAX record, ``"<length> <key>=<value>\\n"``, the length counting itself."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _ustar(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def pax_header(records: bytes, *, declared_size: int | None = None) -> bytes:
    """The header block of a PAX extended header holding ``records``, then the records.

    :param declared_size: the size written in the header, if it should lie (a header-size
        bomb declares gigabytes and delivers a little).
    """
    info = tarfile.TarInfo("PaxHeaders/entry")
    info.type = tarfile.XHDTYPE
    info.size = len(records) if declared_size is None else declared_size
    info.mtime = DEFAULT_MTIME
    return _ustar(info) + records + _padding(len(records))


def _placeholder(name: bytes) -> str:
    # The real name travels in the PAX "path" record; the ustar field keeps a short ASCII
    # stand-in, as GNU tar and Go's archive/tar do.
    return name[-_USTAR_NAME + 1 :].decode("ascii", "replace").replace("\ufffd", "_")


def _entry_header(
    name: bytes,
    type: bytes,
    *,
    size: int = 0,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime_ns: int | None = None,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    xattrs: Mapping[str | bytes, bytes] | None = None,
    pax: Mapping[bytes, bytes] | None = None,
) -> bytes:
    records: list[tuple[bytes, bytes]] = []
    if len(name) >= _USTAR_NAME or not name.isascii():
        records.append((b"path", name))
        ustar_name = _placeholder(name)
    else:
        ustar_name = name.decode("ascii")
    if len(linkname) >= _USTAR_NAME or not linkname.isascii():
        records.append((b"linkpath", linkname))
        ustar_link = _placeholder(linkname)
    else:
        ustar_link = linkname.decode("ascii")
    if mtime_ns is None:
        mtime_ns = DEFAULT_MTIME * 1_000_000_000
    seconds, nanos = divmod(mtime_ns, 1_000_000_000)
    if nanos:
        records.append((b"mtime", f"{seconds}.{nanos:09d}".encode()))
    for field, number in (("uid", uid), ("gid", gid)):
        if number > _USTAR_ID_MAX:
            records.append((field.encode(), str(number).encode()))
    for key, value in (xattrs or {}).items():
        records.append((b"SCHILY.xattr." + _bytes(key), value))
    records.extend((pax or {}).items())

    out = b""
    if records:
        binary = False
        for key, value in records:
            try:
                key.decode("utf-8")
                value.decode("utf-8")
            except UnicodeDecodeError:
                binary = True
        if binary:
            # POSIX: values that are not UTF-8 are announced, so readers keep the bytes.
            records.insert(0, (b"hdrcharset", b"BINARY"))
        out = pax_header(b"".join(pax_record(k, v) for k, v in records))

    info = tarfile.TarInfo(ustar_name)
    info.type = type
    info.size = size
    info.mode = mode
    info.uid = min(uid, _USTAR_ID_MAX)
    info.gid = min(gid, _USTAR_ID_MAX)
    info.mtime = seconds
    info.linkname = ustar_link
    info.devmajor = devmajor
    info.devminor = devminor
    info.uname = ""
    info.gname = ""
    return out + _ustar(info)


def file_header(path: str | bytes, size: int, *, mode: int = 0o644) -> bytes:
    """The header of a regular file of ``size`` bytes; the caller streams the content and
    the padding (``-size % 512`` zero bytes) itself."""
    return _entry_header(_bytes(path), tarfile.REGTYPE, size=size, mode=mode)


class LayerTar:
    """An uncompressed OCI layer tar, built in memory one entry at a time.

    Paths are relative to the layer's root (``"etc/passwd"``), ``str`` or ``bytes``; a
    ``str`` that is not UTF-8 carries its bytes with ``surrogateescape``. Every method
    returns the builder, so a layer reads as one expression::

        data = LayerTar().dir("etc").file("etc/hostname", b"box\\n").whiteout("tmp").build()
    """

    __slots__ = ("_chunks",)

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def _add(self, header: bytes, data: bytes = b"") -> LayerTar:
        self._chunks.append(header + data + _padding(len(data)))
        return self

    def file(
        self,
        path: str | bytes,
        data: bytes = b"",
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime_ns: int | None = None,
        xattrs: Mapping[str | bytes, bytes] | None = None,
        pax: Mapping[bytes, bytes] | None = None,
    ) -> LayerTar:
        """A regular file holding ``data``; ``mode`` may carry setuid, setgid and sticky."""
        header = _entry_header(
            _bytes(path),
            tarfile.REGTYPE,
            size=len(data),
            mode=mode,
            uid=uid,
            gid=gid,
            mtime_ns=mtime_ns,
            xattrs=xattrs,
            pax=pax,
        )
        return self._add(header, data)

    def dir(
        self,
        path: str | bytes,
        *,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime_ns: int | None = None,
        xattrs: Mapping[str | bytes, bytes] | None = None,
    ) -> LayerTar:
        """A directory."""
        name = _bytes(path).rstrip(b"/") + b"/"
        header = _entry_header(
            name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns, xattrs=xattrs
        )
        return self._add(header)

    def symlink(
        self,
        path: str | bytes,
        target: str | bytes,
        *,
        uid: int = 0,
        gid: int = 0,
        mtime_ns: int | None = None,
    ) -> LayerTar:
        """A symbolic link to ``target``, stored as given (absolute, relative, dangling)."""
        header = _entry_header(
            _bytes(path),
            tarfile.SYMTYPE,
            mode=0o777,
            uid=uid,
            gid=gid,
            mtime_ns=mtime_ns,
            linkname=_bytes(target),
        )
        return self._add(header)

    def hardlink(self, path: str | bytes, target: str | bytes) -> LayerTar:
        """A hard link to ``target``, a path relative to the layer's root."""
        header = _entry_header(_bytes(path), tarfile.LNKTYPE, linkname=_bytes(target))
        return self._add(header)

    def chardev(
        self,
        path: str | bytes,
        major: int,
        minor: int,
        *,
        mode: int = 0o666,
        uid: int = 0,
        gid: int = 0,
    ) -> LayerTar:
        """A character device node; ``major`` must be one no driver of this host owns
        (:data:`UNOWNED_MAJOR`).

        :raises ValueError: ``/proc/devices`` lists ``major``.
        """
        return self._device(path, tarfile.CHRTYPE, major, minor, mode, uid, gid)

    def blockdev(
        self,
        path: str | bytes,
        major: int,
        minor: int,
        *,
        mode: int = 0o660,
        uid: int = 0,
        gid: int = 0,
    ) -> LayerTar:
        """A block device node; ``major`` must be one no driver of this host owns
        (:data:`UNOWNED_MAJOR`).

        :raises ValueError: ``/proc/devices`` lists ``major``.
        """
        return self._device(path, tarfile.BLKTYPE, major, minor, mode, uid, gid)

    def _device(
        self, path: str | bytes, kind: bytes, major: int, minor: int, mode: int, uid: int, gid: int
    ) -> LayerTar:
        which = "char" if kind == tarfile.CHRTYPE else "block"
        owner = host_majors()[which].get(major)
        if owner is not None:
            raise ValueError(
                f"{which} device major {major} belongs to this host's {owner!r} driver: "
                "a device node in test data must use a number no driver owns, or a driver "
                "that reads it reaches real hardware (laminae.conformance._tars.UNOWNED_MAJOR)"
            )
        header = _entry_header(
            _bytes(path), kind, mode=mode, uid=uid, gid=gid, devmajor=major, devminor=minor
        )
        return self._add(header)

    def fifo(self, path: str | bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0) -> LayerTar:
        """A named pipe."""
        header = _entry_header(_bytes(path), tarfile.FIFOTYPE, mode=mode, uid=uid, gid=gid)
        return self._add(header)

    def whiteout(self, path: str | bytes) -> LayerTar:
        """Delete ``path`` of the parent layers: an empty file ``<dir>/.wh.<name>``."""
        head, _, name = _bytes(path).rpartition(b"/")
        marker = (head + b"/" if head else b"") + WHITEOUT_PREFIX.encode() + name
        return self.file(marker)

    def opaque(self, path: str | bytes) -> LayerTar:
        """Hide every child that the parent layers have in directory ``path``."""
        return self.file(_bytes(path).rstrip(b"/") + b"/" + OPAQUE_MARKER.encode())

    def raw(self, data: bytes) -> LayerTar:
        """Bytes as they are, for hand-made headers and garbage."""
        self._chunks.append(data)
        return self

    def build(self, *, end: bool = True) -> bytes:
        """The tar's bytes, with the two zero blocks that end it unless ``end`` is false."""
        return b"".join(self._chunks) + (b"\0" * 2 * BLOCK if end else b"")

    def stream(self) -> io.BytesIO:
        """The tar as a readable stream, as :meth:`laminae.Store.apply_layer` takes it."""
        return io.BytesIO(self.build())


def zeros(size: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """``size`` zero bytes in chunks, for streamed file content."""
    block = b"\0" * chunk
    while size > 0:
        piece = min(size, chunk)
        yield block if piece == chunk else block[:piece]
        size -= piece
