"""Deterministic layer tars for the benchmarks: many small files, or a few large ones.

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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import attrs

__all__ = [
    "LayerTar",
    "TreeSummary",
    "summarize_tree",
    "write_large_files_tar",
    "write_small_files_tar",
]

MIB = 1 << 20
_MTIME = 1_700_000_000
_OTHER_UID = 1000
# Headers and bodies are 512-byte blocks; GNU tar and tarfile pad the archive to 20 blocks.
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


@attrs.frozen
class TreeSummary:
    """What an applied layer must hold, counted without its root directory."""

    files: int
    dirs: int
    file_bytes: int
    """Sum of the regular files' sizes."""
    foreign_owned: int
    """Entries owned by uid 1000 (the rest are root's), to see that owners were restored."""
    digest: str
    """Over every entry's path, type, mode bits, owner, mtime (seconds) and content, in any
    order: equal digests mean the same tree, down to the bytes."""


class _TreeDigest:
    """Accumulates a :class:`TreeSummary` entry by entry, in whatever order they come."""

    def __init__(self) -> None:
        self.files = self.dirs = self.file_bytes = self.foreign_owned = 0
        self._sum = 0

    def add(
        self,
        path: str,
        st_mode: int,
        uid: int,
        gid: int,
        mtime: int,
        chunks: Iterable[bytes | memoryview] = (),
    ) -> int:
        """Count one entry (``st_mode`` with its type bits); returns the content's size."""
        h = hashlib.sha256(f"{path}\0{st_mode:o}\0{uid}\0{gid}\0{mtime}\0".encode())
        size = 0
        for chunk in chunks:
            h.update(chunk)
            size += len(chunk)
        # A sum modulo 2**256 does not depend on the order of the entries.
        self._sum = (self._sum + int.from_bytes(h.digest(), "big")) % (1 << 256)
        self.foreign_owned += uid == _OTHER_UID and gid == _OTHER_UID
        if stat.S_ISDIR(st_mode):
            self.dirs += 1
        else:
            self.files += 1
            self.file_bytes += size
        return size

    def summary(self) -> TreeSummary:
        return TreeSummary(
            files=self.files,
            dirs=self.dirs,
            file_bytes=self.file_bytes,
            foreign_owned=self.foreign_owned,
            digest=f"{self._sum:064x}",
        )


@attrs.frozen
class LayerTar:
    """A generated, uncompressed layer tar."""

    path: Path
    diff_id: str
    size: int
    """Bytes of the tar, trailer and record padding included."""
    entries: int
    tree: TreeSummary


class _TarWriter:
    """Writes tar entries to ``out``, hashing every byte on the way (the DiffID) and
    summarising the tree the entries make."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._sha = hashlib.sha256()
        self.tree = _TreeDigest()
        self.size = 0
        self.entries = 0

    def _write(self, data: bytes | memoryview) -> None:
        self._out.write(data)
        self._sha.update(data)
        self.size += len(data)

    def _header(self, name: str, kind: bytes, mode: int, uid: int, size: int) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid = info.gid = uid
        info.uname = info.gname = ""
        info.mtime = _MTIME
        info.size = size
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self.entries += 1

    def _through(self, chunks: Iterable[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        for chunk in chunks:
            self._write(chunk)
            yield chunk

    def directory(self, name: str, *, uid: int = 0, mode: int = 0o755) -> None:
        self._header(name + "/", tarfile.DIRTYPE, mode, uid, 0)
        self.tree.add(name, stat.S_IFDIR | mode, uid, uid, _MTIME)

    def file(
        self, name: str, chunks: Iterable[bytes | memoryview], size: int, *, uid: int, mode: int
    ) -> None:
        """Add a regular file whose content is ``chunks``, which must add up to ``size``."""
        self._header(name, tarfile.REGTYPE, mode, uid, size)
        written = self.tree.add(name, stat.S_IFREG | mode, uid, uid, _MTIME, self._through(chunks))
        if written != size:
            raise ValueError(f"{name}: {written} bytes of content for a header of {size}")
        if size % _BLOCK:
            self._write(bytes(_BLOCK - size % _BLOCK))

    def finish(self) -> str:
        """Write the two zero blocks that end a tar, pad to a record; return the DiffID."""
        end = self.size + 2 * _BLOCK
        self._write(bytes(2 * _BLOCK + (-end) % _RECORD))
        return f"sha256:{self._sha.hexdigest()}"

    def layer(self, path: Path, diff_id: str) -> LayerTar:
        return LayerTar(path, diff_id, self.size, self.entries, self.tree.summary())


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
        tar = _TarWriter(out)
        for d in range(dirs):
            parts = _nested_dir(d)
            for depth in range(1, len(parts) + 1):
                name = "/".join(parts[:depth])
                if name not in seen:
                    seen.add(name)
                    tar.directory(name, uid=_OTHER_UID if rng.random() < 0.25 else 0)
            leaf = "/".join(parts)
            for f in range(files_per_dir):
                size = rng.randint(0, max_file_bytes)
                offset = rng.randrange(MIB)
                uid = _OTHER_UID if rng.random() < 0.25 else 0
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
        tar = _TarWriter(out)
        tar.directory("big")
        for f in range(files):
            tar.file(f"big/blob{f}", content(), file_bytes, uid=_OTHER_UID, mode=0o600)
        return tar.layer(path, tar.finish())


def summarize_tree(root: Path) -> TreeSummary:
    """Summarise what is under ``root`` (not ``root`` itself), without following symlinks,
    reading every regular file."""
    tree = _TreeDigest()
    for top, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(top, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            meta = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns // 1_000_000_000)
            tree.add(rel, *meta, _read(path) if stat.S_ISREG(st.st_mode) else ())
    return tree.summary()


def _read(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            yield chunk
