"""Write OCI layer tars from a list of changes.

:func:`write_changes_tar` reads each changed path of a layer's tree (through a
:class:`~laminae.archive._tree.Tree`, so a symlink in the tree is never followed) and writes a
PAX tar: what a diff, a commit and an export without a tar-split record produce.

The writer is hand-written rather than built on :mod:`tarfile`: ``tarfile`` cannot write a PAX
keyword that is not UTF-8 (a non-UTF-8 xattr name), formats times and header names its own way,
and a few dozen lines give byte-exact, deterministic output.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, Final

from laminae._exceptions import InvalidArgument
from laminae.archive._changes import Change, ChangeKind
from laminae.archive._tarheader import printable
from laminae.archive._tarstream import CHUNK_SIZE
from laminae.archive._tree import O_LIST_DIR, O_READ_FILE, Tree, clean_name
from laminae.archive._whiteouts import WHITEOUT_PREFIX
from laminae.kernel._xattrs import read_xattrs

__all__ = ["write_changes_tar"]

_NAME_MAX: Final = 100
_PREFIX_MAX: Final = 155
_OCTAL8_MAX: Final = 0o7777777
_OCTAL12_MAX: Final = 0o77777777777
_TYPE_FLAGS: Final = {
    stat.S_IFREG: b"0",
    stat.S_IFLNK: b"2",
    stat.S_IFCHR: b"3",
    stat.S_IFBLK: b"4",
    stat.S_IFDIR: b"5",
    stat.S_IFIFO: b"6",
}
_PAX_NAME: Final = b"././@PaxHeader"


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, value)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length += 1
    return b"%d" % length + body


def _pax_time(ns: int) -> bytes:
    sign = b"-" if ns < 0 else b""
    seconds, fraction = divmod(abs(ns), 1_000_000_000)
    if not fraction:
        return sign + b"%d" % seconds
    return sign + (b"%d.%09d" % (seconds, fraction)).rstrip(b"0")


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """``(prefix, name)`` fitting ustar's fields, or ``None``."""
    if len(name) <= _NAME_MAX:
        return b"", name
    # The split is at a slash; the name part may keep a directory's trailing one.
    cut = name.rfind(b"/", 0, len(name) - 1)
    while cut > 0:
        if cut <= _PREFIX_MAX and len(name) - cut - 1 <= _NAME_MAX:
            return name[:cut], name[cut + 1 :]
        cut = name.rfind(b"/", 0, cut)
    return None


def _block(
    name: bytes,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    prefix: bytes = b"",
) -> bytes:
    header = b"".join(
        (
            name.ljust(100, b"\x00"),
            _octal(mode, 8),
            _octal(uid, 8),
            _octal(gid, 8),
            _octal(size, 12),
            _octal(mtime, 12),
            b" " * 8,
            typeflag,
            linkname.ljust(100, b"\x00"),
            b"ustar\x0000",
            bytes(64),  # uname, gname: left empty, image-spec says to ignore them
            _octal(devmajor, 8),
            _octal(devminor, 8),
            prefix.ljust(155, b"\x00"),
            bytes(12),
        )
    )
    checksum = b"%06o\x00 " % sum(header)
    return header[:148] + checksum + header[156:]


class _TarWriter:
    """PAX headers and data blocks, written straight to ``out``."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def entry(
        self,
        name: bytes,
        typeflag: bytes,
        st: os.stat_result | None,
        *,
        size: int = 0,
        linkname: bytes = b"",
        xattrs: dict[bytes, bytes] | None = None,
    ) -> None:
        if st is None:
            mode = uid = gid = mtime_ns = devmajor = devminor = 0
        else:
            mode = stat.S_IMODE(st.st_mode)
            uid, gid, mtime_ns = st.st_uid, st.st_gid, st.st_mtime_ns
            devmajor = devminor = 0
            if typeflag in (b"3", b"4"):
                devmajor, devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        records: list[tuple[bytes, bytes]] = []
        split = _split_ustar(name) if name.isascii() else None
        if split is None:
            records.append((b"path", name))
            split = b"", name[:_NAME_MAX]
        if len(linkname) > _NAME_MAX or not linkname.isascii():
            records.append((b"linkpath", linkname))
            linkname = linkname[:_NAME_MAX]
        if size > _OCTAL12_MAX:
            records.append((b"size", b"%d" % size))
        if uid > _OCTAL8_MAX:
            records.append((b"uid", b"%d" % uid))
        if gid > _OCTAL8_MAX:
            records.append((b"gid", b"%d" % gid))
        seconds = mtime_ns // 1_000_000_000
        if mtime_ns % 1_000_000_000 or not 0 <= seconds <= _OCTAL12_MAX:
            records.append((b"mtime", _pax_time(mtime_ns)))
        if xattrs:
            for key in sorted(xattrs):
                records.append((b"SCHILY.xattr." + key, xattrs[key]))
        if records:
            if not all(_is_utf8(k) and _is_utf8(v) for k, v in records):
                records.insert(0, (b"hdrcharset", b"BINARY"))
            data = b"".join(_pax_record(k, v) for k, v in records)
            self._out.write(_block(_PAX_NAME, b"x", 0o644, 0, 0, len(data), 0))
            self._out.write(data)
            self._pad(len(data))
        self._out.write(
            _block(
                split[1],
                typeflag,
                mode,
                min(uid, _OCTAL8_MAX),
                min(gid, _OCTAL8_MAX),
                min(size, _OCTAL12_MAX),
                min(max(seconds, 0), _OCTAL12_MAX),
                linkname,
                devmajor,
                devminor,
                split[0],
            )
        )

    def _pad(self, size: int) -> None:
        if size % 512:
            self._out.write(bytes(512 - size % 512))

    def data(self, fd: int, size: int, path: bytes) -> None:
        left = size
        while left > 0:
            piece = os.read(fd, min(left, CHUNK_SIZE))
            if not piece:
                raise InvalidArgument(
                    f"layer diff entry '{printable(path)}': the file shrank while it was read"
                )
            self._out.write(piece)
            left -= len(piece)
        self._pad(size)

    def close(self) -> None:
        self._out.write(bytes(1024))


class _Differ(Tree):
    """Reads the layer's tree for :func:`write_changes_tar`."""

    def __init__(self, root: Path, out: BinaryIO) -> None:
        super().__init__(root)
        self._tar = _TarWriter(out)
        self._dirs: set[bytes] = set()
        self._links: dict[tuple[int, int], bytes] = {}

    def change(self, change: Change) -> None:
        path = os.fsencode(change.path).strip(b"/")
        if not path or clean_name(path) != path:
            raise InvalidArgument(f"change path {change.path!r} is not a clean absolute path")
        parent_path, _, name = path.rpartition(b"/")
        if parent_path and parent_path not in self._dirs:
            self._parents(parent_path)
        if change.kind is ChangeKind.DELETED:
            whiteout = (parent_path + b"/" if parent_path else b"") + WHITEOUT_PREFIX + name
            self._tar.entry(whiteout, b"0", None)
            return
        parent = self.lookup(parent_path)
        if parent is None:
            raise InvalidArgument(f"layer diff entry '{change.path}': its parent is missing")
        self._write(parent[0], name, path)

    def finish(self) -> None:
        """Write the end-of-archive blocks."""
        self._tar.close()

    def _parents(self, parent_path: bytes) -> None:
        """Write the directories above a change that are not written yet (includeParents)."""
        parts = parent_path.split(b"/")
        for depth in range(1, len(parts) + 1):
            path = b"/".join(parts[:depth])
            if path in self._dirs:
                continue
            above, _, name = path.rpartition(b"/")
            parent = self.lookup(above)
            if parent is None:
                raise InvalidArgument(
                    f"layer diff: parent directory '{printable(path)}' is missing"
                )
            self._write(parent[0], name, path)

    def _write(self, dir_fd: int, name: bytes, path: bytes) -> None:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        kind = stat.S_IFMT(st.st_mode)
        typeflag = _TYPE_FLAGS.get(kind)
        if typeflag is None:
            return  # a socket: tar has no type for it
        if kind == stat.S_IFDIR:
            self._dirs.add(path)
            fd = os.open(name, O_LIST_DIR, dir_fd=dir_fd)
            try:
                xattrs = _diff_xattrs(fd)
            finally:
                os.close(fd)
            self._tar.entry(path + b"/", typeflag, st, xattrs=xattrs)
            return
        if st.st_nlink > 1:
            inode = (st.st_dev, st.st_ino)
            first = self._links.get(inode)
            if first is not None:
                self._tar.entry(path, b"1", st, linkname=first)
                return
            self._links[inode] = path
        if kind == stat.S_IFREG:
            fd = os.open(name, O_READ_FILE, dir_fd=dir_fd)
            try:
                self._tar.entry(path, typeflag, st, size=st.st_size, xattrs=_diff_xattrs(fd))
                self._tar.data(fd, st.st_size, path)
            finally:
                os.close(fd)
            return
        # Symlinks and devices cannot be opened safely: read them through the parent's fd.
        xattrs = _diff_xattrs(f"/proc/self/fd/{dir_fd}/{os.fsdecode(name)}")
        linkname = os.readlink(name, dir_fd=dir_fd) if kind == stat.S_IFLNK else b""
        self._tar.entry(path, typeflag, st, linkname=linkname, xattrs=xattrs)


def _diff_xattrs(target: str | int) -> dict[bytes, bytes]:
    xattrs = read_xattrs(target)
    if xattrs:
        for name in [n for n in xattrs if n.startswith(b"trusted.overlay.")]:
            del xattrs[name]
    return xattrs


def write_changes_tar(root: Path, changes: Iterable[Change], out: BinaryIO) -> None:
    """Write the OCI layer tar for ``changes``, reading content from ``root``.

    PAX format, entries in the order of ``changes``, each preceded by the directories above it
    that were not written yet (so their permissions travel with the layer). A deleted path
    becomes an empty ``.wh.<name>`` file with time 0; added and modified paths carry mode
    (setuid, setgid and sticky included), uid/gid (no user or group names), the modification
    time in nanoseconds (a PAX ``mtime`` record when it has a fraction) and every xattr as
    ``SCHILY.xattr.*`` (``hdrcharset=BINARY`` when a name or value is not UTF-8), except
    overlayfs's own ``trusted.overlay.*``. The first name of a multiply-linked inode is written
    as a file, later ones as hard links to it; sockets are skipped. The same tree and changes
    give the same bytes.

    :raises InvalidArgument: a change path is not clean, or a file shrank while being read.
    :raises OSError: a changed path cannot be read (translated by the caller).
    """
    differ = _Differ(root, out)
    try:
        for change in changes:
            try:
                differ.change(change)
            finally:
                differ.release()
        differ.finish()
    finally:
        differ.close()
