"""A fresh ext4 or btrfs filesystem on a loop device for one benchmark run, and the hygiene
around it.

Every run gets a new filesystem, so neither tool profits from a warm, fragmented or half-full
disk, and nothing is written to the root filesystem except the sparse image file. The script
re-executes itself in a private mount namespace first, so a crash cannot leave the mount
visible on the host; the loop device is detached as soon as it is mounted (the kernel then
auto-clears it at the last unmount), so a crash cannot leak it either.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "GIB",
    "btrfs_sync",
    "drop_caches",
    "enter_private_mount_namespace",
    "remove_tree",
    "require_root",
    "scratch_ext4",
    "scratch_filesystem",
    "unmount_under",
]

GIB = 1 << 30
_NAMESPACE_MARK = "LAMINAE_BENCH_PRIVATE_NS"


def require_root(tools: Sequence[str] = ()) -> None:
    """Exit with a message unless running as root (loop devices, mounts, chown, drop_caches)
    with the commands the benchmarks need, and ``tools`` besides, on PATH."""
    if os.geteuid() != 0:
        sys.exit("benchmarks need root: they make a loop filesystem and drop the page cache")
    for tool in ("losetup", "mkfs.ext4", "mount", "umount", "unshare", "tar", "sync", *tools):
        if shutil.which(tool) is None:
            sys.exit(f"benchmarks need {tool!r} on PATH")


def enter_private_mount_namespace(script: Path, argv: Sequence[str]) -> None:
    """Re-execute ``script`` with ``argv`` under ``unshare --mount --propagation private``.

    Returns only in the re-executed process, which is recognised by an environment mark.
    """
    if os.environ.get(_NAMESPACE_MARK) == "1":
        # SIGTERM (``kill PID``) ends the run through the ``finally`` blocks, as Ctrl-C does:
        # unmounts, stopping containerd, deleting the image.
        signal.signal(signal.SIGTERM, _terminate)
        return
    env = dict(os.environ, **{_NAMESPACE_MARK: "1"})
    command = ["unshare", "--mount", "--propagation", "private", "--"]
    command += [sys.executable, str(script), *argv]
    sys.stdout.flush()
    os.execvpe("unshare", command, env)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (host-wide)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def btrfs_sync(path: Path) -> None:
    """Wait until the btrfs cleaner has freed every deleted subvolume (``btrfs subvolume
    sync``), so that it does not work in the background of the next measurement."""
    _run("btrfs", "subvolume", "sync", str(path))


def remove_tree(path: Path) -> None:
    """``rm -rf --one-file-system``: quicker than ``shutil.rmtree`` on 100,000 files.

    On btrfs the subvolumes below ``path`` go first, deepest first, with ``btrfs subvolume
    delete`` (a read-only snapshot refuses ``rm``, and deleting a subvolume is one call, not
    one per file), and then the cleaner is waited for (``btrfs subvolume sync``), so that it
    does not go on freeing extents while the next run is measured.
    """
    if not path.exists():
        return
    if _run("stat", "-f", "-c", "%T", str(path)) == "btrfs":
        _remove_subvolumes(path)
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)


def _remove_subvolumes(path: Path) -> None:
    resolved = str(path.resolve())
    mount = max(
        (p for p in _mount_points() if resolved == p or resolved.startswith(p.rstrip("/") + "/")),
        key=len,
    )
    listing = _run("btrfs", "subvolume", "list", mount)
    # "ID 257 gen 9 top level 5 path a/b": paths are relative to the filesystem's top level,
    # which is what the scratch filesystems mount.
    paths = [os.path.join(mount, line.split(" path ", 1)[1]) for line in listing.splitlines()]
    below = [p for p in paths if p.startswith(resolved + "/") or p == resolved]
    for subvolume in sorted(below, key=lambda p: p.count("/"), reverse=True):
        _run("btrfs", "subvolume", "delete", subvolume)
    if below:
        btrfs_sync(Path(mount))


def _run(*command: str) -> str:
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo", "rb") as f:
        # Field 5 is the mount point, octal-escaped; our paths never hold spaces or escapes.
        return [os.fsdecode(line.split()[4]) for line in f]


def _is_mountpoint(path: Path) -> bool:
    return str(path) in _mount_points()


def unmount_under(path: Path) -> list[str]:
    """Unmount, by path and deepest first, every mount at or below ``path`` (what a peer
    left behind, e.g. containers-storage's private bind of its overlay home); returns them."""
    top = str(path)
    found = [p for p in _mount_points() if p == top or p.startswith(top + "/")]
    for point in sorted(set(found), key=lambda p: p.count("/"), reverse=True):
        if _is_mountpoint(Path(point)):
            _run("umount", point)
    return found


def _loop_backing_file(device: str) -> str | None:
    try:
        return Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()
    except FileNotFoundError:
        return None


def scratch_ext4(parent: Path, size: int) -> contextlib.AbstractContextManager[Path]:
    """:func:`scratch_filesystem` with ext4."""
    return scratch_filesystem(parent, size, "ext4")


_MKFS = {
    # Inode tables and journal initialised up front: otherwise the kernel's ext4lazyinit
    # thread zeroes them in the background while the benchmark runs.
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


@contextlib.contextmanager
def scratch_filesystem(parent: Path, size: int, fstype: str = "ext4") -> Iterator[Path]:
    """Make a sparse ``size``-byte image under ``parent``, put ``fstype`` (ext4 or btrfs) on
    it, mount it; yield the mount point. On the way out, unmounts what is left below the mount
    point and the mount point itself by path, detaches by device and deletes the image.

    The loop device uses direct I/O, so the image's pages are not cached twice (once for the
    filesystem, once for the backing file).
    """
    if fstype not in _MKFS:
        raise ValueError(f"scratch filesystem type {fstype!r}: not one of {sorted(_MKFS)}")
    if size < 256 << 20:
        raise ValueError(f"scratch filesystem of {size} bytes is too small")
    work = Path(tempfile.mkdtemp(prefix="laminae-bench-", dir=parent))
    image = work / "fs.img"
    mnt = work / "mnt"
    device: str | None = None
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        _run(*_MKFS[fstype], str(image))
        mnt.mkdir()
        device = _run("losetup", "--find", "--show", "--direct-io=on", str(image))
        _run("mount", "-t", fstype, device, str(mnt))
        # The device is busy now, so this only sets auto-clear: it goes with the last unmount.
        _run("losetup", "--detach", device)
        yield mnt
    finally:
        try:
            unmount_under(mnt)
        finally:
            if device is not None and _loop_backing_file(device) == str(image):
                _run("losetup", "--detach", device)
            # Only ever unlink and rmdir, never a recursive delete: if the unmount failed,
            # this fails too instead of deleting through the mount.
            image.unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                mnt.rmdir()
            work.rmdir()
