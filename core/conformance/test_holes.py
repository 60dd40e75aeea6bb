"""Sparse files: holes survive apply, create-from-parent, commit, copy-up and diff.

A layer copy that reads a sparse file and writes it back fills every hole with zeros: a
filesystem image of 4 KiB of data and 64 MiB apparent size takes 64 MiB in each child layer.
Nothing else in the suite notices, since the bytes read back are the same. So these tests
write files with holes through a real mount of an active layer (or apply a tar with GNU sparse
entries), and read, through real mounts, the two properties a dense copy loses:

- the **hole map**: the data segments ``SEEK_DATA``/``SEEK_HOLE`` report, which must equal
  what the layer first held (observed there, so a filesystem's block size does not matter);
- the **allocated bytes** (``st_blocks * 512``), which must stay well under the apparent size.

A test is skipped only where the filesystem a layer is mounted from cannot hold a hole at all
(the skip names it); every filesystem a built-in driver uses (ext4, XFS, btrfs, tmpfs) can.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path

import pytest

import laminae
from laminae.conformance._layers import apply, mounted
from laminae.conformance._tars import LayerTar, _entry_header
from laminae.driverkit import mountinfo

BLOCK = 4096
MIB = 1 << 20
HOLE = 64 << 20
"""Where the data after the hole starts: the apparent size a dense copy would allocate."""

DATA = bytes(range(256)) * (BLOCK // 256)
"""One block of data, not zeros: a copy that drops zero blocks must not drop it."""

SegmentMap = tuple[tuple[int, int], ...]

# The files an active layer gets, each a different shape of hole, and the map each should
# have where blocks are 4 KiB (the map is taken as observed in the active layer).
SHAPES: Mapping[str, SegmentMap] = {
    "holes/middle": ((0, BLOCK), (HOLE, HOLE + BLOCK)),
    "holes/tail": ((0, BLOCK),),
    "holes/lead": ((HOLE, HOLE + BLOCK),),
    "holes/nothing-but-hole": (),
}


def hole_map(path: Path) -> SegmentMap:
    """The ``(start, end)`` of each run of data in ``path``, as ``SEEK_DATA``/``SEEK_HOLE``
    report them."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        segments = []
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole to the end
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            segments.append((start, end))
            offset = end
        return tuple(segments)
    finally:
        os.close(fd)


def allocated(path: Path) -> int:
    """Bytes the filesystem allocated for ``path``."""
    return os.lstat(path).st_blocks * 512


def fs_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on, as mountinfo names it."""
    resolved = os.path.realpath(path)
    best = ("", "unknown")
    for entry in mountinfo():
        point = entry.mount_point
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        # Later lines are mounted over earlier ones at the same point.
        if inside and len(point) >= len(best[0]):
            best = (point, entry.fs_type)
    return best[1]


def write_shapes(root: Path) -> None:
    """Write every file of :data:`SHAPES` below ``root``: data blocks, seeks and truncates."""
    (root / "holes").mkdir()
    with open(root / "holes/middle", "wb") as file:
        file.write(DATA)
        file.seek(HOLE)
        file.write(DATA)
    with open(root / "holes/tail", "wb") as file:
        file.write(DATA)
        file.truncate(HOLE)  # extended: the hole is at the end, with no data after it
    with open(root / "holes/lead", "wb") as file:
        file.seek(HOLE)
        file.write(DATA)
    with open(root / "holes/nothing-but-hole", "wb") as file:
        file.truncate(HOLE)


def observe(root: Path, paths: list[str]) -> dict[str, SegmentMap]:
    """The hole map of each of ``paths`` below ``root``; skip if the filesystem keeps none."""
    maps = {path: hole_map(root / path) for path in paths}
    if all(allocated(root / path) >= os.stat(root / path).st_size // 2 for path in maps):
        pytest.skip(
            f"the filesystem a layer is mounted from ({fs_type(root)}, at {root}) cannot hold "
            "holes: every file written with one is fully allocated"
        )
    return maps


def coarse(segments: SegmentMap, size: int, granularity: int) -> SegmentMap:
    """``segments`` rounded out to multiples of ``granularity`` (ends capped at ``size``),
    with the runs that then touch merged."""
    merged: list[tuple[int, int]] = []
    for start, end in segments:
        start = start - start % granularity
        end = min(end + -end % granularity, size)
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return tuple(merged)


def assert_holes_kept(
    root: Path, expected: Mapping[str, SegmentMap], step: str, *, granularity: int = 1
) -> None:
    """Fail, naming the path, the property, expected and actual, and the step, unless every
    file below ``root`` has its expected hole map, few allocated bytes and its data.

    :param granularity: compare hole maps rounded out to this many bytes.
    """
    problems = []
    for path, segments in expected.items():
        full = root / path
        size = os.stat(full).st_size
        # Room for a filesystem's metadata blocks and preallocation; a dense copy needs all.
        limit = max(size // 8, 1 << 20)
        used = allocated(full)
        if used > limit:
            problems.append(
                f"/{path}: allocated bytes expected at most {limit} (holes unallocated), "
                f"got {used} of {size} apparent: the holes were filled"
            )
        got = hole_map(full)
        if coarse(got, size, granularity) != coarse(segments, size, granularity):
            within = f" (in units of {granularity} bytes)" if granularity > 1 else ""
            problems.append(f"/{path}: hole map{within} expected data at {segments}, got {got}")
        with open(full, "rb") as file:
            for start, end in segments:
                file.seek(start)
                if file.read(end - start) != DATA * ((end - start) // BLOCK):
                    problems.append(f"/{path}: data at {start}..{end} changed")
    assert not problems, f"after {step}:\n  " + "\n  ".join(problems)


def sparse_tar(tar: type[LayerTar], path: str, segments: SegmentMap, size: int, fmt: str) -> bytes:
    """A layer tar holding ``path`` as a GNU sparse file in PAX format ``fmt`` (``"1.0"``: the
    map starts the data, what GNU tar writes by default; ``"0.1"``: the map is a PAX record)."""
    data = b"".join(DATA * ((end - start) // BLOCK) for start, end in segments)
    numbers = [str(n).encode() for pair in segments for n in (pair[0], pair[1] - pair[0])]
    pax = {b"GNU.sparse.name": path.encode()}
    if fmt == "1.0":
        sparse_map = b"".join(n + b"\n" for n in [str(len(segments)).encode(), *numbers])
        data = sparse_map + b"\0" * (-len(sparse_map) % 512) + data
        pax |= {
            b"GNU.sparse.major": b"1",
            b"GNU.sparse.minor": b"0",
            b"GNU.sparse.realsize": str(size).encode(),
        }
    else:
        pax |= {
            b"GNU.sparse.numblocks": str(len(segments)).encode(),
            b"GNU.sparse.map": b",".join(numbers),
            b"GNU.sparse.size": str(size).encode(),
        }
    header = _entry_header(
        f"GNUSparseFile.0/{os.path.basename(path)}".encode(),
        tarfile.REGTYPE,
        size=len(data),
        pax=pax,
    )
    layer = tar().dir(os.path.dirname(path)).raw(header + data + b"\0" * (-len(data) % 512))
    return layer.build()


@pytest.mark.laminae_area("holes")
class TestHoles:
    def test_holes_survive_commit_and_children(self, store: laminae.Store) -> None:
        """Files written sparse in an active layer keep their holes in the committed layer,
        in a child, through a write into the child (overlayfs copies the file up), and in
        the child's committed layer."""
        active = store.create_layer(parent=None)
        with mounted(store, active.id) as root:
            write_shapes(root)
            expected = observe(root, list(SHAPES))
        committed = store.commit_layer(active.id)
        with mounted(store, committed.id) as root:
            assert_holes_kept(root, expected, "commit (the committed layer's mount)")

        child = store.create_layer(parent=committed.id)
        with mounted(store, child.id) as root:
            assert_holes_kept(root, expected, "create from parent (the child's mount)")
            # A write into a hole of a lower file: overlayfs copies it up, btrfs has
            # snapshotted it, vfs copied it; the rest of the hole must stay one. overlayfs
            # copies up in 1 MiB chunks and skips only holes that fill a chunk (the
            # OVL_COPY_UP_CHUNK_SIZE of fs/overlayfs/copy_up.c), so from here on maps are
            # compared in MiB.
            with open(root / "holes/middle", "r+b") as file:
                file.seek(HOLE // 2)
                file.write(DATA)
            changed = dict(expected)
            if expected["holes/middle"] == SHAPES["holes/middle"]:
                start, end = SHAPES["holes/middle"]
                changed["holes/middle"] = (start, (HOLE // 2, HOLE // 2 + BLOCK), end)
            else:  # blocks larger than 4 KiB: as the filesystem maps it
                changed["holes/middle"] = hole_map(root / "holes/middle")
            assert_holes_kept(root, changed, "a write into the child (copy-up)", granularity=MIB)
        grown = store.commit_layer(child.id)
        view = store.create_layer(parent=grown.id, view=True)
        with mounted(store, view.id) as root:
            assert_holes_kept(
                root, changed, "commit of the child, then a view of it", granularity=MIB
            )

    @pytest.mark.parametrize("fmt", ["1.0", "0.1"])
    def test_holes_survive_apply(self, store: laminae.Store, tar: type[LayerTar], fmt: str) -> None:
        """A GNU sparse entry (PAX format ``fmt``) is applied with its holes, and a child of
        the applied layer keeps them."""
        segments = SHAPES["holes/middle"]
        data = sparse_tar(tar, "holes/sparse", segments, HOLE + 2 * BLOCK, fmt)
        layer = apply(store, data)
        with mounted(store, layer.id) as root:
            expected = observe(root, ["holes/sparse"])
            assert os.stat(root / "holes/sparse").st_size == HOLE + 2 * BLOCK, "apparent size"
            assert_holes_kept(root, expected, f"apply of a PAX {fmt} sparse entry")
        child = store.create_layer(parent=layer.id)
        with mounted(store, child.id) as root:
            assert_holes_kept(root, expected, "create from an applied parent (the child's mount)")

    def test_diff_of_a_sparse_file(self, store: laminae.Store, scratch: Path) -> None:
        """A layer tar has no holes (it is not written in a sparse format): the diff of a
        sparse file carries its whole content, zeros where the holes are."""
        size = 16 << 20

        def write(root: Path) -> None:
            with open(root / "sparse", "wb") as file:
                file.write(DATA)
                file.seek(size // 2)
                file.write(DATA)
                file.truncate(size)

        active = store.create_layer(parent=None)
        with mounted(store, active.id) as root:
            write(root)
        layer = store.commit_layer(active.id)
        expected = hashlib.sha256()
        for piece in (DATA, bytes(size // 2 - BLOCK), DATA, bytes(size // 2 - BLOCK)):
            expected.update(piece)
        out = scratch / "diff.tar"
        with open(out, "wb") as stream:
            store.diff(layer.id, stream)
        with tarfile.open(out) as archive:
            member = archive.getmember("sparse")
            content = archive.extractfile(member)
            assert content is not None, "diff: /sparse is not a regular file"
            got = hashlib.sha256()
            while chunk := content.read(1 << 20):
                got.update(chunk)
        assert member.size == size, f"diff: /sparse size expected {size}, got {member.size}"
        assert got.hexdigest() == expected.hexdigest(), (
            "diff: /sparse content differs from the file (holes must read as zeros)"
        )
