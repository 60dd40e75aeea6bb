"""The files of an OCI layout directory, reached only inside it.

A layout's names are fixed (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``), but the
directory is someone else's: a blob there may be a symbolic link to any file the importing
process can read, a FIFO that blocks a reader forever, or a device. :class:`LayoutDirectory`
holds the layout open by a descriptor and walks each name one component at a time with
``O_NOFOLLOW`` (what ``openat2`` does with ``RESOLVE_NO_SYMLINKS``, by hand, so on any
kernel): no symbolic link is followed, out of the layout or inside it. A file is looked at with
``lstat`` before it is opened (a device is never opened), opened ``O_NONBLOCK`` (a FIFO swapped
in meanwhile cannot block) and kept only if ``fstat`` says it is a regular file. A refusal
names the file and what it is, never what a link points at.

Writing goes the same way: directories are made with ``mkdirat``, and a file is written under a
temporary name created ``O_CREAT|O_EXCL|O_NOFOLLOW`` beside its final name, then renamed over
it, so a symbolic link planted at ``index.json`` or at a blob's name is replaced, never written
through.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Final, final

from laminae._exceptions import (
    InvalidArgument,
    LaminaeError,
    LimitExceeded,
    NotFound,
    map_os_errors,
)

__all__ = ["LayoutDirectory"]

_O_DIRECTORY: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_READ: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_O_NEW: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS: Final = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISREG, "a regular file"),
)


def _kind(mode: int) -> str:
    """What a file of ``mode`` is, for a message."""
    return next((name for test, name in _KINDS if test(mode)), "a file of unknown type")


@final
class LayoutDirectory:
    """A layout directory, held open; its files are read and written without leaving it.

    Names are relative, ``/``-separated and free of ``..`` (they come from
    :func:`~laminae.images._layout.blob_name` or are fixed). Safe to use from several threads.

    :param path: the directory (a symbolic link in ``path`` itself is the caller's choice and
        is followed; nothing below it is).
    :param what: how messages name the layout (``oci:/srv/layout:v1``).
    :raises NotFound: ``path`` is missing or no directory.
    """

    def __init__(self, path: Path, *, what: str) -> None:
        self.path = path
        self._what = what
        with map_os_errors(f"{what}: open {path}"):
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError) as exc:
                raise NotFound(f"{what}: no layout directory {path}") from exc

    def __enter__(self) -> LayoutDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def where(self, name: str) -> str:
        """The path of ``name``, for messages."""
        return str(self.path / name) if name else str(self.path)

    def _refuse(self, name: str, label: str | None, problem: str) -> InvalidArgument:
        return InvalidArgument(f"{self._what}: {label or name} {problem} ({self.where(name)})")

    def _missing(self, name: str, label: str | None) -> NotFound:
        return NotFound(f"{self._what}: {label or name} is missing ({self.where(name)})")

    @contextlib.contextmanager
    def _directory(
        self, directory: str, name: str, label: str | None, made: list[str] | None = None
    ) -> Iterator[int]:
        """``directory`` (``""`` for the layout itself) open, on the way to ``name``.

        :param made: create missing directories, appending the names of those made here.
        """
        fd = self._fd
        opened = []
        try:
            parts = directory.split("/") if directory else []
            with map_os_errors(f"{self._what}: open {self.where(directory)}"):
                for depth, part in enumerate(parts):
                    prefix = "/".join(parts[: depth + 1])
                    fd = self._open_directory(fd, part, prefix, name, label, made)
                    opened.append(fd)
            yield fd
        finally:
            for fd in opened:
                os.close(fd)

    def _open_directory(
        self,
        parent: int,
        part: str,
        prefix: str,
        name: str,
        label: str | None,
        made: list[str] | None,
    ) -> int:
        """Directory ``part`` of ``parent`` (``prefix`` in the layout), never through a link."""
        for _ in range(2):
            try:
                return os.open(part, _O_DIRECTORY, dir_fd=parent)
            except FileNotFoundError:
                if made is None:
                    raise self._missing(name, label) from None
                with contextlib.suppress(FileExistsError):  # another writer made it first
                    os.mkdir(part, 0o755, dir_fd=parent)
                    made.append(prefix)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                mode = os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode
                raise self._refuse(
                    name,
                    label,
                    f"is not inside the layout: {prefix} is {_kind(mode)}, not a directory",
                ) from exc
        raise self._missing(name, label)  # made, and removed by another writer at once

    @contextlib.contextmanager
    def _parent(
        self, name: str, label: str | None, made: list[str] | None = None
    ) -> Iterator[tuple[int, str]]:
        """The directory holding ``name``, open, and the last component of ``name``."""
        directory, _, leaf = name.rpartition("/")
        with self._directory(directory, name, label, made) as fd:
            yield fd, leaf

    def lstat(self, name: str, *, label: str | None = None) -> os.stat_result | None:
        """``name``'s own status (a link's, not its target's); ``None`` if it is missing.

        :raises InvalidArgument: a directory on the way is a symbolic link or no directory.
        """
        try:
            with (
                self._parent(name, label) as (parent, leaf),
                map_os_errors(f"{self._what}: stat {self.where(name)}"),
            ):
                return os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        except NotFound:
            return None

    def open(self, name: str, *, label: str | None = None) -> BinaryIO:
        """``name`` for reading, if it is a regular file.

        :param label: how messages name the file (``blob sha256:...``); ``name`` if ``None``.
        :raises NotFound: ``name`` is missing.
        :raises InvalidArgument: it is a symbolic link, a FIFO, a device, a directory..., or a
            directory on the way is not a directory.
        """
        with self._parent(name, label) as (parent, leaf):
            try:
                mode = os.stat(leaf, dir_fd=parent, follow_symlinks=False).st_mode
                if not stat.S_ISREG(mode):
                    raise self._refuse(name, label, f"is {_kind(mode)}, not a regular file")
                fd = os.open(leaf, _O_READ, dir_fd=parent)
            except FileNotFoundError:
                raise self._missing(name, label) from None
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    with map_os_errors(f"{self._what}: open {self.where(name)}"):
                        raise
                # Replaced by a symbolic link since the stat above.
                raise self._refuse(name, label, "is a symbolic link, not a regular file") from exc
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced since the stat; O_NONBLOCK kept a FIFO harmless
            os.close(fd)
            raise self._refuse(name, label, f"is {_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")

    def read(self, name: str, *, limit: int, label: str | None = None) -> bytes:
        """``name`` whole, if it is a regular file of at most ``limit`` bytes.

        :raises NotFound: ``name`` is missing.
        :raises InvalidArgument: as for :meth:`open`.
        :raises LimitExceeded: it is larger than ``limit``.
        """
        with self.open(name, label=label) as stream:
            size = os.fstat(stream.fileno()).st_size
            data = b""
            if size <= limit:
                with map_os_errors(f"{self._what}: read {self.where(name)}"):
                    data = stream.read(limit + 1)
        if size > limit or len(data) > limit:
            raise LimitExceeded(
                f"{self._what}: {label or name} is {max(size, len(data))} bytes, above the "
                f"limit of {limit} for a document ({self.where(name)})"
            )
        return data

    def make_directories(self, name: str) -> list[str]:
        """Create directory ``name`` and the ones on the way; the names of those made here.

        :raises InvalidArgument: one on the way is a symbolic link or no directory.
        """
        made: list[str] = []
        with self._directory(name, name, None, made):
            pass
        return made

    def write(self, name: str, write: Callable[[BinaryIO], object]) -> None:
        """Write ``name`` whole with ``write(file)``: a synced temporary file, renamed over it.

        The directory ``name`` goes in must exist (:meth:`make_directories`).
        """
        with self._parent(name, None) as (parent, leaf):
            temp = f".{leaf[:16]}.tmp-{secrets.token_hex(8)}"
            with map_os_errors(f"{self._what}: write {self.where(name)}"):
                fd = os.open(temp, _O_NEW, 0o644, dir_fd=parent)
                try:
                    with os.fdopen(fd, "wb") as out:
                        write(out)
                        out.flush()
                        os.fsync(out.fileno())
                    # rename(2) replaces a link at ``leaf`` itself; it never follows one.
                    os.rename(temp, leaf, src_dir_fd=parent, dst_dir_fd=parent)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temp, dir_fd=parent)
                    raise

    def remove(self, name: str) -> None:
        """Remove file ``name``, or directory ``name`` if it is empty; quietly, if at all."""
        with contextlib.suppress(OSError, LaminaeError), self._parent(name, None) as (fd, leaf):
            if stat.S_ISDIR(os.stat(leaf, dir_fd=fd, follow_symlinks=False).st_mode):
                os.rmdir(leaf, dir_fd=fd)
            else:
                os.unlink(leaf, dir_fd=fd)

    def sync(self, name: str = "") -> None:
        """Make the entries of directory ``name`` (the layout itself by default) durable."""
        with (
            self._directory(name, name, None) as fd,
            map_os_errors(f"{self._what}: sync {self.where(name)}"),
        ):
            os.fsync(fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the layout directory's ``flock``, exclusively (no lock file: the layout gains
        nothing). Each :class:`LayoutDirectory` has its own open file, so two of them in one
        process exclude each other as two processes do."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the directory (streams handed out stay open)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
