"""The leak guard: what a test left behind in its own directories, and cleaning it up.

After every conformance test the guard compares the mounts (``/proc/self/mountinfo``) and
loop devices (``/sys/block/loop*/loop/backing_file``) with how they were before, and looks
for files written in the directories around the driver's home and a sentinel directory that
hostile layers aim at. A leak fails the test with a message naming what leaked; leaked mounts
are unmounted and loop devices detached by path, so that the next test starts clean.

The guard looks only in the test's own directories (its ``tmp_path``, which holds the
driver's home, the store's root and run directory, the scratch and sentinel directories, and
any other directory a fixture hands out): a mount counts if its mount point is there, a loop
device if its backing file is. Everything else on the machine belongs to someone else, even
in the session's private mount namespace, which the test's own child processes share. The
guard never counts it and never unmounts or detaches it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection, Iterable
from pathlib import Path

import attrs

from laminae.kernel import _loop, _mountinfo, _mounts

__all__ = ["FileWatch", "HostState", "cleanup", "describe", "mount_points"]


def mount_points() -> set[str]:
    """The calling process's mount points."""
    return _mountinfo.mount_points()


def loop_devices() -> dict[str, str]:
    """Attached loop devices: ``/dev/loopN`` -> backing file."""
    result: dict[str, str] = {}
    base = Path("/sys/block")
    if not base.is_dir():
        return result
    for entry in base.iterdir():
        backing = entry / "loop" / "backing_file"
        if entry.name.startswith("loop") and backing.exists():
            try:
                result[f"/dev/{entry.name}"] = backing.read_text().strip()
            except OSError:  # detached between the listing and the read
                continue
    return result


@attrs.frozen
class _FileState:
    kind: int
    size: int
    mode: int
    nlink: int
    mtime_ns: int


@attrs.define
class FileWatch:
    """The files below ``root`` (but not below ``excluded``), with what they are, so that a
    later look finds what was added or changed.

    :param root: the directory watched.
    :param excluded: paths below ``root`` whose contents may change (the driver's home,
        the test's scratch directory).
    """

    root: Path
    excluded: frozenset[Path]
    before: dict[str, _FileState] = attrs.field(factory=dict)

    @classmethod
    def start(cls, root: Path, excluded: Iterable[Path] = ()) -> FileWatch:
        """Watch ``root`` from now on."""
        watch = cls(root, frozenset(excluded))
        watch.before = watch._scan()
        return watch

    def _scan(self) -> dict[str, _FileState]:
        result: dict[str, _FileState] = {}
        if not self.root.is_dir():
            return result
        todo = [self.root]
        while todo:
            path = todo.pop()
            try:
                entries = list(os.scandir(path))
            except OSError:
                continue
            for entry in entries:
                full = Path(entry.path)
                if full in self.excluded:
                    continue
                st = entry.stat(follow_symlinks=False)
                rel = str(full.relative_to(self.root))
                result[rel] = _FileState(
                    stat.S_IFMT(st.st_mode), st.st_size, st.st_mode, st.st_nlink, st.st_mtime_ns
                )
                if stat.S_ISDIR(st.st_mode):
                    todo.append(full)
        return result

    def changes(self) -> list[str]:
        """What appeared or changed below ``root`` since :meth:`start`, one line each."""
        now = self._scan()
        lines = []
        for rel in sorted(now.keys() - self.before.keys()):
            lines.append(f"file written outside the driver's home: {self.root / rel}")
        for rel in sorted(now.keys() & self.before.keys()):
            old, new = self.before[rel], now[rel]
            if old != new and not (old.kind == new.kind == stat.S_IFDIR and old.mode == new.mode):
                lines.append(f"file changed outside the driver's home: {self.root / rel}")
        return lines


@attrs.frozen
class HostState:
    """Mounts (by mount id) and loop devices (device -> backing file) at one moment."""

    mounts: dict[int, _mountinfo.MountInfo]
    loops: dict[str, str]

    @classmethod
    def now(cls) -> HostState:
        """The mounts this process sees and the attached loop devices, as they are."""
        return cls({m.mount_id: m for m in _mountinfo.mountinfo()}, loop_devices())

    def leaks_since(
        self, before: HostState, scopes: Collection[Path]
    ) -> tuple[list[_mountinfo.MountInfo], list[tuple[str, str]]]:
        """Mounts and loop devices present now that were not ``before``, and that belong to
        one of ``scopes``: mounted below it, or backed by a file below it.

        Only those: other programs mount and attach loop devices too, and so do the test's
        own helper processes, in the session's namespace; the guard must never take theirs
        for a leak, let alone undo them. A mount's source is not looked at: for a bind or a
        loop mount it names a device, and for a tmpfs or an overlay any string.
        """
        mounts = [
            m
            for i, m in self.mounts.items()
            if i not in before.mounts and any(_below(m.mount_point, s) for s in scopes)
        ]
        loops = [
            (device, backing)
            for device, backing in self.loops.items()
            if before.loops.get(device) != backing and any(_below(backing, s) for s in scopes)
        ]
        return mounts, loops


def _below(path: str, scope: Path) -> bool:
    return path == str(scope) or path.startswith(str(scope).rstrip("/") + "/")


def describe(mounts: list[_mountinfo.MountInfo], loops: list[tuple[str, str]]) -> list[str]:
    """One line per leaked mount or loop device."""
    lines = [f"leaked mount: {m.mount_point} ({m.fs_type} from {m.source})" for m in mounts]
    lines += [f"leaked loop device: {device} (backing {backing})" for device, backing in loops]
    return lines


def cleanup(mounts: list[_mountinfo.MountInfo], loops: list[tuple[str, str]]) -> list[str]:
    """Unmount leaked mounts (deepest first) and detach leaked loop devices, by path.

    Only what :meth:`HostState.leaks_since` found, that is below the test's own
    directories. A mount is unmounted only while its mount id is still mounted (the test's
    helper may have unmounted it since), and lazily (``MNT_DETACH``) only if a plain
    unmount finds it busy: a file a leaked process still holds there must not fail the next
    test. A loop device is detached only while it still has the same backing file.

    :returns: what could not be cleaned, one line each.
    """
    failures = []
    for mount in sorted(mounts, key=lambda m: m.mount_point.count("/"), reverse=True):
        if mount.mount_id not in {m.mount_id for m in _mountinfo.mountinfo()}:
            continue
        try:
            try:
                _mounts.umount(mount.mount_point)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                _mounts.umount(mount.mount_point, _mounts.MNT_DETACH)
        except OSError as exc:
            failures.append(f"could not unmount {mount.mount_point}: {exc}")
    attached = loop_devices()
    for device, backing in loops:
        if attached.get(device) != backing:
            continue
        try:
            _loop.detach_loop(device)
        except OSError as exc:
            failures.append(f"could not detach {device}: {exc}")
    return failures
