"""Tar archives of images: read in place, and written beside their target then renamed.

Archives (oci-archive, docker-archive) are never extracted. :class:`ArchiveMembers` scans the tar's
headers once, with the bounded :class:`~laminae.archive._tarstream.TarReader`, into a map of member
name to the offset and size of its data in the file, and hands out readers over ``os.pread`` windows
of one file descriptor: no shared file position, so many blobs are read at once from threads, and
nothing is copied before it is read. :class:`ArchiveWriter` streams a tar to ``FILE.tmp-XXXX`` next
to its target and renames it over the target on commit, so a reader never sees half an archive."""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import stat
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Final, cast, final

import attrs

from laminae._exceptions import (
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    map_os_errors,
)
from laminae.archive._limits import Limits
from laminae.archive._tarheader import EntryType
from laminae.archive._tarstream import CHUNK_SIZE, TarReader
from laminae.images._image import MAX_MANIFEST_BYTES

__all__ = ["MAX_DOCUMENT_BYTES", "ArchiveMembers", "ArchiveWriter", "fsync_directory"]

MAX_DOCUMENT_BYTES: Final = MAX_MANIFEST_BYTES
"""The largest JSON document (index.json, a manifest, manifest.json) read into memory."""

_BLOCK: Final = 512
_ZEROS: Final = bytes(CHUNK_SIZE)
_MAX_LINK_HOPS: Final = 40  # as the kernel's MAXSYMLINKS


# --- reading a tar in place ---------------------------------------------------------------


@final
class _Window(io.BufferedIOBase, BinaryIO):
    """A read-only stream over ``size`` bytes at ``offset`` of ``fd``, by ``os.pread``.

    It keeps its own position, so any number of windows over one descriptor can be read at
    once from different threads. Closing it leaves ``fd`` open.
    """

    def __init__(self, fd: int, offset: int, size: int, what: str) -> None:
        super().__init__()
        self._fd = fd
        self._offset = offset
        self._size = size
        self._pos = 0
        self._what = what

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read of a closed archive member")
        left = max(self._size - self._pos, 0)
        want = left if size is None or size < 0 else min(size, left)
        if want == 0:
            return b""
        pieces = []
        while want:
            with map_os_errors(f"read {self._what}"):
                data = os.pread(self._fd, min(want, CHUNK_SIZE), self._offset + self._pos)
            if not data:
                # The scan saw the member whole: the file shrank since.
                raise InvalidArgument(f"{self._what}: the archive ends inside this member")
            pieces.append(data)
            self._pos += len(data)
            want -= len(data)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@final
class _ScanFeed:
    """The archive as the tar reader sees it during the scan: headers only.

    Headers are handed out a block at a time, so when the reader returns an entry it holds no
    bytes beyond the header and :attr:`position` is where the entry's data starts. The data of
    a member the scan has recorded is then *elided*: handed out as zeros without being read
    (the reader only skips it), so a scan reads the headers of a many-gigabyte archive and
    nothing else.
    """

    def __init__(self, fd: int, size: int, what: str) -> None:
        self._fd = fd
        self._size = size
        self._what = what
        self._elide = 0
        self.position = 0

    def elide(self, count: int) -> None:
        """Hand out the next ``count`` bytes (a member's data and padding) as zeros."""
        self._elide = count

    def read(self, size: int = -1) -> bytes:
        end = self._size - self.position
        if self._elide:
            count = min(size, self._elide, end, len(_ZEROS))
            self._elide -= count
            self.position += count
            return _ZEROS if count == len(_ZEROS) else _ZEROS[:count]
        count = min(size, _BLOCK, end)
        if count <= 0:
            return b""
        with map_os_errors(f"read {self._what}"):
            data = os.pread(self._fd, count, self.position)
        self.position += len(data)
        return data


def _member_name(raw: bytes) -> str | None:
    """A member's name as looked up: no "./" or "/" in front; ``None`` if it climbs out."""
    name = posixpath.normpath(raw.decode("utf-8", "surrogateescape")).lstrip("/")
    if name in ("", ".", "..") or name.startswith("../"):
        return None
    return name


_KINDS: Final[dict[int, str]] = {
    EntryType.DIRECTORY: "a directory",
    EntryType.FIFO: "a FIFO",
    EntryType.CHAR: "a character device",
    EntryType.BLOCK: "a block device",
    EntryType.REGULAR: "a sparse file",  # a plain one is a member; a sparse one is not read
}


def _entry_kind(entry_type: int) -> str:
    return _KINDS.get(entry_type) or f"an entry of tar type {chr(entry_type)!r}"


@attrs.frozen
class _Member:
    offset: int
    size: int


@attrs.frozen
class _Link:
    kind: str  # "a symbolic link", "a hard link"
    target: str | None  # the member it names; None if it climbs out of the archive


@final
class ArchiveMembers:
    """The regular files of a tar archive, read in place (the file is never extracted).

    Symbolic and hard links between members are followed (``docker save`` links a layer it
    writes twice); a later member of the same name replaces an earlier one, as extraction
    would. Nothing outside the archive is ever read: a link that leaves it, or ends at a
    member that is no regular file (a FIFO, a device, a directory), is refused naming the
    member.

    :param path: the archive, a regular file.
    :param what: how messages name the archive (``oci-archive:/x.tar``).
    :raises NotFound: ``path`` does not exist.
    :raises InvalidArgument: not a regular file, not a tar, or a truncated or malformed one.
    :raises LimitExceeded: the tar breaks the reader's bounds (entries, header sizes).
    """

    def __init__(self, path: Path, *, what: str) -> None:
        self.path = path
        self._what = what
        with map_os_errors(f"{what}: open {path}"):
            # O_NONBLOCK: a FIFO given as the archive is refused below instead of waiting
            # for a writer; an archive is read in place, by pread, so it is a regular file.
            self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            with map_os_errors(f"{what}: stat {path}"):
                st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(
                    f"{what}: {path} is not a regular file; an archive is read in place"
                )
            self._members, self._links, self._others = self._scan(st.st_size)
        except BaseException:
            os.close(self._fd)
            raise

    def _scan(self, size: int) -> tuple[dict[str, _Member], dict[str, _Link], dict[str, str]]:
        feed = _ScanFeed(self._fd, size, self._what)
        reader = TarReader(cast(BinaryIO, feed), Limits(max_bytes=max(size, 1)))
        members: dict[str, _Member] = {}
        links: dict[str, _Link] = {}
        others: dict[str, str] = {}  # what the entries that are neither are, by name
        try:
            for entry in reader:
                name = _member_name(entry.name)
                if name is None:
                    continue
                members.pop(name, None)
                links.pop(name, None)
                others.pop(name, None)
                if entry.type == EntryType.REGULAR and entry.sparse is None:
                    members[name] = _Member(feed.position, entry.size)
                    feed.elide(entry.size + -entry.size % _BLOCK)
                elif entry.type in (EntryType.SYMLINK, EntryType.HARDLINK):
                    target = entry.linkname.decode("utf-8", "surrogateescape")
                    if entry.type == EntryType.SYMLINK and not target.startswith("/"):
                        target = posixpath.join(posixpath.dirname(name), target)
                    resolved = _member_name(target.encode("utf-8", "surrogateescape"))
                    symbolic = entry.type == EntryType.SYMLINK
                    links[name] = _Link("a symbolic link" if symbolic else "a hard link", resolved)
                else:
                    others[name] = _entry_kind(entry.type)
        except InvalidArgument as exc:
            raise type(exc)(f"{self._what}: {exc}") from exc
        return members, links, others

    def where(self, name: str) -> str:
        """How a message names member ``name``."""
        return f"{self.path}:{name}"

    def names(self) -> list[str]:
        """The regular files and links in the archive, sorted."""
        return sorted({*self._members, *self._links})

    def find(self, name: str, *, label: str | None = None) -> tuple[int, int] | None:
        """``(offset, size)`` of member ``name``'s data in the file, links followed; ``None``
        if the archive has no member ``name`` at all.

        :param label: how messages name the member (``blob sha256:...``).
        :raises InvalidArgument: ``name`` is no regular file, or a link that leaves the
            archive, loops, or ends at no regular file.
        """
        label = label or f"member {name!r}"
        where = f"({self.where(name)})"
        current = name
        for _ in range(_MAX_LINK_HOPS):
            member = self._members.get(current)
            if member is not None:
                return member.offset, member.size
            link = self._links.get(current)
            if link is None:
                break
            if link.target is None:
                raise InvalidArgument(
                    f"{self._what}: {label} is {link.kind} out of the archive {where}"
                )
            current = link.target
        else:
            raise InvalidArgument(f"{self._what}: {label} is a link in a loop {where}")
        kind = self._others.get(current)
        if current == name:
            if kind is None:
                return None
            raise InvalidArgument(f"{self._what}: {label} is {kind}, not a regular file {where}")
        ends = f"{kind}, not a regular file" if kind else "which the archive does not hold"
        raise InvalidArgument(f"{self._what}: {label} is a link to {current!r}, {ends} {where}")

    def size(self, name: str, *, label: str | None = None) -> int:
        """The size of member ``name``.

        :raises NotFound: the archive has no such member.
        :raises InvalidArgument: as for :meth:`find`.
        """
        return self._member(name, label)[1]

    def _member(self, name: str, label: str | None) -> tuple[int, int]:
        found = self.find(name, label=label)
        if found is None:
            raise NotFound(f"{self._what}: the archive has no member {name!r} ({self.path})")
        return found

    def open(self, name: str, *, label: str | None = None) -> BinaryIO:
        """A stream of member ``name``'s bytes.

        :raises NotFound: no such member.
        :raises InvalidArgument: as for :meth:`find`.
        """
        offset, size = self._member(name, label)
        return _Window(self._fd, offset, size, self.where(name))

    def read(
        self, name: str, *, limit: int = MAX_DOCUMENT_BYTES, label: str | None = None
    ) -> bytes:
        """Member ``name`` whole; for small documents only.

        :raises NotFound: no such member.
        :raises InvalidArgument: as for :meth:`find`.
        :raises LimitExceeded: it is larger than ``limit``.
        """
        size = self.size(name, label=label)
        if size > limit:
            raise LimitExceeded(
                f"{self._what}: {label or f'member {name!r}'} is {size} bytes, above the "
                f"limit of {limit} for a document ({self.where(name)})"
            )
        with self.open(name, label=label) as stream:
            return stream.read()

    def close(self) -> None:
        """Close the archive (streams handed out stop working)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- writing a tar ------------------------------------------------------------------------


@final
class ArchiveWriter:
    """A tar archive written to ``FILE.tmp-XXXX`` beside ``path``, renamed over it on commit.

    Members are written in the order they are added, with owner 0, mode 0644 (0755 for
    directories) and mtime 0, so the same content gives the same archive. Safe to call from
    several threads (one member is written at a time).

    :param path: the archive to write; an existing file is replaced at :meth:`commit`.
    :param what: how messages name the archive.
    :raises NotFound: the directory ``path`` goes in does not exist.
    :raises InvalidArgument: ``path`` is a directory.
    """

    def __init__(self, path: Path, *, what: str) -> None:
        self.path = path
        self._what = what
        if path.is_dir():
            raise InvalidArgument(f"{what}: {path} is a directory, not an archive file")
        with map_os_errors(f"{what}: create a temporary file beside {path}"):
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp-")
        self._temp = Path(temp)
        self._file = os.fdopen(fd, "wb")
        # Closed by commit() or abort(): the writer is the context.
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT
        )
        self._lock = threading.Lock()
        self._names: set[str] = set()
        self._done = False

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def _info(self, name: str, kind: bytes, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = size
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        info.mtime = 0
        return info

    def _add(self, info: tarfile.TarInfo, data: BinaryIO | None) -> None:
        with self._lock:
            if self._done:
                raise FailedPrecondition(f"{self._what}: the archive is already closed")
            if info.name in self._names:
                return
            with map_os_errors(f"{self._what}: write {info.name}"):
                self._tar.addfile(info, data)
            self._names.add(info.name)

    def add_directory(self, name: str) -> None:
        """A directory member ``name/`` (once; adding it again does nothing)."""
        self._add(self._info(name, tarfile.DIRTYPE, 0), None)

    def add_file(self, name: str, source: Path) -> None:
        """Member ``name`` with the bytes of file ``source``, streamed (once per name)."""
        if name in self._names:
            return
        with map_os_errors(f"{self._what}: read {source}"), source.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            self._add(self._info(name, tarfile.REGTYPE, size), stream)

    def add_bytes(self, name: str, data: bytes) -> None:
        """Member ``name`` holding ``data`` (a small document)."""
        self._add(self._info(name, tarfile.REGTYPE, len(data)), io.BytesIO(data))

    def commit(self) -> None:
        """End the archive, make it durable, and rename it over :attr:`path`."""
        with self._lock:
            if self._done:
                raise FailedPrecondition(f"{self._what}: the archive is already closed")
            self._done = True
            try:
                with map_os_errors(f"{self._what}: write {self.path}"):
                    self._tar.close()
                    self._file.flush()
                    os.fsync(self._file.fileno())
                    self._file.close()
                    os.rename(self._temp, self.path)
            except BaseException:
                self._file.close()
                with contextlib.suppress(FileNotFoundError):
                    self._temp.unlink()
                raise
            with map_os_errors(f"{self._what}: sync {self.path.parent}"):
                fsync_directory(self.path.parent)

    def abort(self) -> None:
        """Drop the temporary file (nothing if committed)."""
        with self._lock:
            if self._done:
                return
            self._done = True
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                self._temp.unlink()


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
