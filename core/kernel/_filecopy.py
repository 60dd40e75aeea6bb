"""Copying file data the cheapest way the filesystems allow, holes kept.

Per file, in the order Moby's graphdriver copy uses: ``ioctl(FICLONE)`` (a reflink: the copy
shares the source's extents, on btrfs and XFS with ``reflink=1``), then ``copy_file_range``
(in the kernel, may share extents on NFS or XFS), then ``pread``/``pwrite``. Without a
reflink, only the data segments that ``SEEK_DATA``/``SEEK_HOLE`` find are copied, so a sparse
file (a filesystem image, say) stays sparse instead of filling its holes with zeros.

A filesystem without a ``SEEK_DATA`` of its own (NFSv3, a FUSE server without ``lseek``,
9p) gets the kernel's generic one, which calls the whole file data. Where such a map covers
the whole file but the file has fewer blocks than its size, the holes can only be told by
their zeros: the copy then reads everything and skips the blocks that are all zeros, as
``cp --sparse=auto`` does.

A refusal that means "this filesystem cannot" (``EXDEV``, ``EOPNOTSUPP``, ``EINVAL``) turns that
way off for the rest of a :class:`DataCopier`'s life, so a copy of 100,000 files onto ext4
pays for the failed ``FICLONE`` once, not once per file.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from typing import Final, final

from laminae.kernel._syscalls import MACHINE

__all__ = ["DataCopier", "ficlone"]

# _IOW(0x94, 9, int). powerpc, mips and sparc encode _IOW differently (0x80049409); they have
# no syscall numbers in _syscalls either, so one table entry per machine keeps both together.
_FICLONE: Final[dict[str, int]] = {"x86_64": 0x40049409, "aarch64": 0x40049409}

# "This filesystem (pair) cannot": stop trying the fast path. ENOTTY/ENOSYS come from kernels
# or filesystems without the call at all.
_CANNOT: Final = frozenset(
    {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
)
_CHUNK: Final = 1 << 20
# The unit a copy that cannot see holes leaves one in: the page and block size of every
# filesystem laminae meets (btrfs and XFS may use larger blocks; a smaller hole only costs
# one partial block of zeros there).
_ZERO_BLOCK: Final = 4096


def ficlone(src_fd: int, dst_fd: int) -> None:
    """Make ``dst_fd`` share ``src_fd``'s extents (a reflink): ``ioctl(FICLONE)``.

    :raises OSError: ``EOPNOTSUPP`` (ext4, tmpfs), ``EXDEV`` (different filesystems),
        ``EINVAL`` (unaligned or unsupported), ``ENOSYS`` on an unknown machine.
    """
    request = _FICLONE.get(MACHINE)
    if request is None:
        raise OSError(errno.ENOSYS, f"laminae has no FICLONE number for machine {MACHINE!r}")
    fcntl.ioctl(dst_fd, request, src_fd)


@final
class DataCopier:
    """Copies the data of one file into another: a reflink where it can, else holes kept.

    One copier remembers which ways the filesystems refused; use one for a whole tree.

    :param reflink: try ``FICLONE`` first (off: always a real copy, sharing no extents).
    """

    __slots__ = ("range_copy", "reflink")

    def __init__(self, *, reflink: bool = True) -> None:
        self.reflink = reflink
        self.range_copy = True

    def copy(
        self, src_fd: int, dst_fd: int, size: int | None = None, *, allocated: int | None = None
    ) -> None:
        """Make ``dst_fd``, an empty regular file open for writing, a copy of ``src_fd``.

        Data goes to the same offsets it has in the source; holes stay holes, and the file
        ends at ``size`` even where the source ends in a hole. ``src_fd``'s file offset is
        moved (``SEEK_DATA``); ``dst_fd``'s is not used.

        :param size: the source's size as the caller found it (``fstat`` when ``None``).
        :param allocated: the bytes the source takes on disk (``st_blocks * 512``) as the
            caller found it; ``fstat`` when ``None`` and it is needed (a source whose
            filesystem maps it all as data).
        :raises OSError: the first failure that is not "this filesystem cannot".
        """
        if size is None:
            st = os.fstat(src_fd)
            size, allocated = st.st_size, st.st_blocks * 512
        if size == 0:
            return
        if self.reflink:
            try:
                ficlone(src_fd, dst_fd)
                return
            except OSError as exc:
                if exc.errno not in _CANNOT:
                    raise
                self.reflink = False
        copied_to = 0
        for start, end in _data_segments(src_fd, size):
            if start == 0 and end == size:
                if allocated is None:
                    allocated = os.fstat(src_fd).st_blocks * 512
                if allocated + _ZERO_BLOCK <= size:
                    # All data by the map, yet not all allocated: the map cannot see holes.
                    _copy_skipping_zeros(src_fd, dst_fd, size)
                    return
            self._copy_range(src_fd, dst_fd, start, end)
            copied_to = end
        if copied_to < size:
            # A hole at the end has no data segment to give the copy its size.
            os.ftruncate(dst_fd, size)

    def _copy_range(self, src_fd: int, dst_fd: int, start: int, end: int) -> None:
        offset = start
        if self.range_copy:
            try:
                while offset < end:
                    copied = os.copy_file_range(src_fd, dst_fd, end - offset, offset, offset)
                    if copied == 0:  # the source shrank under us
                        return
                    offset += copied
                return
            except OSError as exc:
                if exc.errno not in _CANNOT:
                    raise
                self.range_copy = False
        # Carry on from where copy_file_range stopped, if it copied anything.
        while offset < end:
            chunk = os.pread(src_fd, min(_CHUNK, end - offset), offset)
            if not chunk:  # the source shrank under us
                return
            _write_all(dst_fd, memoryview(chunk), offset)
            offset += len(chunk)


def _copy_skipping_zeros(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy the first ``size`` bytes of ``src_fd``, leaving a hole for each block of zeros."""
    offset = 0
    while offset < size:
        chunk = os.pread(src_fd, min(_CHUNK, size - offset), offset)
        if not chunk:  # the source shrank under us
            break
        view = memoryview(chunk)
        for start, end in _nonzero_runs(chunk):
            _write_all(dst_fd, view[start:end], offset + start)
        offset += len(chunk)
    # Trailing zeros were skipped: the copy still ends where the source does.
    os.ftruncate(dst_fd, size)


def _nonzero_runs(chunk: bytes) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each run of :data:`_ZERO_BLOCK` blocks of ``chunk`` that are not
    all zeros."""
    if chunk.count(0) == len(chunk):
        return
    run = None
    for block in range(0, len(chunk), _ZERO_BLOCK):
        length = min(_ZERO_BLOCK, len(chunk) - block)
        zero = chunk.count(0, block, block + length) == length
        if zero and run is not None:
            yield run, block
            run = None
        elif not zero and run is None:
            run = block
    if run is not None:
        yield run, len(chunk)


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        offset += written
        view = view[written:]


def _data_segments(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each run of data in the first ``size`` bytes of ``fd``."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from offset to the end
                return
            if exc.errno not in _CANNOT:
                raise
            # A filesystem that refuses SEEK_DATA: everything left counts as data.
            yield offset, size
            return
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end
