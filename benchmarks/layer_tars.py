"""Deterministic layer tars for the benchmarks: many small files, a few large ones, or any
mix a caller writes through :class:`TarWriter` (files, directories, symlinks, hard links,
whiteouts and opaque directories).

The same seed gives the same bytes, so the DiffID is known before a run and every run of
every tool reads exactly the same tar. Tars are written by hand (``TarInfo.tobuf`` for the
headers, the content streamed after them) rather than through :class:`tarfile.TarFile`,
because ``addfile`` copies content in 16 KiB pieces and would make writing the 1 GiB layer
slower than applying it.

Entries carry numeric owners only (empty ``uname``/``gname``), as OCI layers usually do, so
GNU tar, which prefers names when a header has them, restores the same numeric ids laminae does.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import attrs

__all__ = [
    "MIB",
    "MTIME",
    "OTHER_UID",
    "Entry",
    "LayerTar",
    "TarWriter",
    "TreeSummary",
    "content_digest",
    "summarize_entries",
    "summarize_tree",
    "walk_tree",
    "write_large_files_tar",
    "write_small_files_tar",
]

MIB = 1 << 20
MTIME = 1_700_000_000
"""Every entry's mtime: a tree's digest then does not depend on when it was written."""
OTHER_UID = 1000
# Headers and bodies are 512-byte blocks; GNU tar and tarfile pad the archive to 20 blocks.
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


@attrs.frozen
class TreeSummary:
    """What an applied layer must hold, counted without its root directory."""

    files: int
    """Entries that are not directories: regular files, symlinks, hard links."""
    dirs: int
    file_bytes: int
    """Sum of the regular files' sizes."""
    foreign_owned: int
    """Entries owned by uid 1000 (the rest are root's), to see that owners were restored."""
    digest: str
    """Over every entry's path, type, mode bits, owner, mtime (seconds) and content (a
    symlink's content is its target), in any order: equal digests mean the same tree, down to
    the bytes."""


@attrs.frozen
class Entry:
    """One entry of a tree as the summary sees it: its identity hash and what it counts for."""

    path: str
    st_mode: int
    uid: int
    size: int
    """Content bytes of a regular file, else 0."""
    hash: int
    """sha256 over path, type and mode, owner, mtime and the content's sha256, as a number."""

    @classmethod
    def make(
        cls, path: str, st_mode: int, uid: int, gid: int, mtime: int, content: bytes, size: int
    ) -> Entry:
        """``content`` is the sha256 digest of the entry's content (a symlink's target)."""
        h = hashlib.sha256(f"{path}\0{st_mode:o}\0{uid}\0{gid}\0{mtime}\0".encode() + content)
        return cls(path, st_mode, uid, size if stat.S_ISREG(st_mode) else 0, _number(h.digest()))

    def moved(self, path: str, st_mode: int, gid: int, mtime: int, content: bytes) -> Entry:
        """The same content under another path (a hard link): the hash covers the path."""
        return Entry.make(path, st_mode, self.uid, gid, mtime, content, self.size)


def _number(digest: bytes) -> int:
    return int.from_bytes(digest, "big")


def summarize_entries(entries: Iterable[Entry]) -> TreeSummary:
    """The summary of a tree made of ``entries``, in any order."""
    files = dirs = file_bytes = foreign = total = 0
    for entry in entries:
        # A sum modulo 2**256 does not depend on the order of the entries.
        total = (total + entry.hash) % (1 << 256)
        foreign += entry.uid == OTHER_UID
        if stat.S_ISDIR(entry.st_mode):
            dirs += 1
        else:
            files += 1
            file_bytes += entry.size
    return TreeSummary(files, dirs, file_bytes, foreign, f"{total:064x}")


def content_digest(chunks: Iterable[bytes | memoryview]) -> tuple[bytes, int]:
    """sha256 digest and length of content given in chunks."""
    h = hashlib.sha256()
    size = 0
    for chunk in chunks:
        h.update(chunk)
        size += len(chunk)
    return h.digest(), size


@attrs.frozen
class LayerTar:
    """A generated, uncompressed layer tar."""

    path: Path
    diff_id: str
    size: int
    """Bytes of the tar, trailer and record padding included."""
    entries: int
    tree: TreeSummary
    """The tree the tar makes when applied to an empty directory (whiteouts aside)."""


_EMPTY = hashlib.sha256().digest()


class TarWriter:
    """Writes tar entries to ``out``, hashing every byte on the way (the DiffID) and
    summarising the tree the entries make.

    :param on_entry: called with every entry the tar adds to a tree (not for whiteouts), for a
        caller that models what several layers make together.
    """

    def __init__(self, out: BinaryIO, on_entry: Callable[[Entry], None] | None = None) -> None:
        self._out = out
        self._sha = hashlib.sha256()
        self._entries: list[Entry] = []
        self._by_path: dict[str, tuple[Entry, bytes]] = {}
        self._on_entry = on_entry
        self.size = 0
        self.entries = 0

    def _write(self, data: bytes | memoryview) -> None:
        self._out.write(data)
        self._sha.update(data)
        self.size += len(data)

    def _header(
        self, name: str, kind: bytes, mode: int, uid: int, size: int, linkname: str = ""
    ) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid = info.gid = uid
        info.uname = info.gname = ""
        info.mtime = MTIME
        info.size = size
        info.linkname = linkname
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self.entries += 1

    def _add(self, entry: Entry, content: bytes) -> None:
        self._entries.append(entry)
        self._by_path[entry.path] = (entry, content)
        if self._on_entry is not None:
            self._on_entry(entry)

    def _through(self, chunks: Iterable[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        for chunk in chunks:
            self._write(chunk)
            yield chunk

    def directory(self, name: str, *, uid: int = 0, mode: int = 0o755) -> None:
        self._header(name + "/", tarfile.DIRTYPE, mode, uid, 0)
        self._add(Entry.make(name, stat.S_IFDIR | mode, uid, uid, MTIME, _EMPTY, 0), _EMPTY)

    def file(
        self, name: str, chunks: Iterable[bytes | memoryview], size: int, *, uid: int, mode: int
    ) -> None:
        """Add a regular file whose content is ``chunks``, which must add up to ``size``."""
        self._header(name, tarfile.REGTYPE, mode, uid, size)
        content, written = content_digest(self._through(chunks))
        if written != size:
            raise ValueError(f"{name}: {written} bytes of content for a header of {size}")
        if size % _BLOCK:
            self._write(bytes(_BLOCK - size % _BLOCK))
        self._add(Entry.make(name, stat.S_IFREG | mode, uid, uid, MTIME, content, size), content)

    def symlink(self, name: str, target: str, *, uid: int = 0) -> None:
        self._header(name, tarfile.SYMTYPE, 0o777, uid, 0, linkname=target)
        content = hashlib.sha256(os.fsencode(target)).digest()
        self._add(Entry.make(name, stat.S_IFLNK | 0o777, uid, uid, MTIME, content, 0), content)

    def hardlink(self, name: str, target: str) -> None:
        """Add ``name`` as a hard link to ``target``, a regular file earlier in this tar."""
        entry, content = self._by_path[target]
        self._header(name, tarfile.LNKTYPE, entry.st_mode & 0o7777, entry.uid, 0, linkname=target)
        self._add(entry.moved(name, entry.st_mode, entry.uid, MTIME, content), content)

    def whiteout(self, name: str) -> None:
        """Delete ``name`` (and what is below it) from the layers underneath: ``.wh.NAME``."""
        parent, _, base = name.rpartition("/")
        self._header(f"{parent}/.wh.{base}" if parent else f".wh.{base}", tarfile.REGTYPE, 0, 0, 0)

    def opaque(self, directory: str) -> None:
        """Hide everything the layers underneath have in ``directory``: ``.wh..wh..opq``."""
        self._header(f"{directory}/.wh..wh..opq", tarfile.REGTYPE, 0, 0, 0)

    def finish(self) -> str:
        """Write the two zero blocks that end a tar, pad to a record; return the DiffID."""
        end = self.size + 2 * _BLOCK
        self._write(bytes(2 * _BLOCK + (-end) % _RECORD))
        return f"sha256:{self._sha.hexdigest()}"

    def layer(self, path: Path, diff_id: str) -> LayerTar:
        return LayerTar(path, diff_id, self.size, self.entries, summarize_entries(self._entries))


def _nested_dir(index: int) -> list[str]:
    """Leaf directory ``index`` as its chain of parents: ``d00/d0/d7`` for 7, 10 per level."""
    return [f"d{index // 100:02d}", f"d{index // 10 % 10}", f"d{index % 10}"]


def write_small_files_tar(
    path: Path,
    *,
    dirs: int = 1000,
    files_per_dir: int = 100,
    max_file_bytes: int = 4096,
    seed: int = 1,
) -> LayerTar:
    """Write a tar of ``dirs`` x ``files_per_dir`` files of 0 to ``max_file_bytes`` bytes.

    Leaf directories are nested three deep, ten to a level (``d00/d0/d0`` ...), so the tar
    also holds their parents. One entry in four is owned by uid 1000; one file in eight is
    executable.
    """
    rng = random.Random(seed)
    pool = rng.randbytes(MIB + max_file_bytes)
    view = memoryview(pool)
    seen: set[str] = set()
    with open(path, "wb", buffering=MIB) as out:
        tar = TarWriter(out)
        for d in range(dirs):
            parts = _nested_dir(d)
            for depth in range(1, len(parts) + 1):
                name = "/".join(parts[:depth])
                if name not in seen:
                    seen.add(name)
                    tar.directory(name, uid=OTHER_UID if rng.random() < 0.25 else 0)
            leaf = "/".join(parts)
            for f in range(files_per_dir):
                size = rng.randint(0, max_file_bytes)
                offset = rng.randrange(MIB)
                uid = OTHER_UID if rng.random() < 0.25 else 0
                mode = 0o755 if rng.random() < 0.125 else 0o644
                content = [view[offset : offset + size]]
                tar.file(f"{leaf}/f{f:03d}", content, size, uid=uid, mode=mode)
        return tar.layer(path, tar.finish())


def write_large_files_tar(
    path: Path, *, files: int = 2, file_bytes: int = 512 * MIB, seed: int = 2
) -> LayerTar:
    """Write a tar of ``files`` files of ``file_bytes`` bytes each, under ``big/``.

    Content is 1 MiB windows at pseudo-random offsets of a 64 MiB random pool: generated at
    memory speed, yet no 1 MiB piece repeats another, so gzip or zstd at their usual window
    sizes cannot squeeze it to nothing.
    """
    rng = random.Random(seed)
    pool_bytes = 64 * MIB
    pool = memoryview(rng.randbytes(pool_bytes + MIB))

    def content() -> Iterable[memoryview]:
        left = file_bytes
        while left:
            n = min(MIB, left)
            offset = rng.randrange(pool_bytes)
            yield pool[offset : offset + n]
            left -= n

    with open(path, "wb", buffering=MIB) as out:
        tar = TarWriter(out)
        tar.directory("big")
        for f in range(files):
            tar.file(f"big/blob{f}", content(), file_bytes, uid=OTHER_UID, mode=0o600)
        return tar.layer(path, tar.finish())


def summarize_tree(root: Path) -> TreeSummary:
    """Summarise what is under ``root`` (not ``root`` itself), without following symlinks,
    reading every regular file."""
    return summarize_entries(walk_tree(root))


def walk_tree(root: Path) -> Iterator[Entry]:
    """Every entry under ``root`` as :class:`Entry`, reading regular files and symlinks."""
    for top, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(top, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISREG(st.st_mode):
                content, size = content_digest(_read(path))
            elif stat.S_ISLNK(st.st_mode):
                content, size = hashlib.sha256(os.fsencode(os.readlink(path))).digest(), 0
            else:
                content, size = _EMPTY, 0
            mtime = st.st_mtime_ns // 1_000_000_000
            yield Entry.make(rel, st.st_mode, st.st_uid, st.st_gid, mtime, content, size)


def _read(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            yield chunk
