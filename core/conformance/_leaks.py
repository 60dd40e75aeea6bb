"""The leak guard: what a test left behind on the host, and cleaning it up.

After every conformance test the guard compares the host with how it was before: mount
points (``/proc/self/mountinfo``), loop devices (``/sys/block/loop*/loop/backing_file``), and
files in the directories around the driver's home and a sentinel directory that hostile
layers aim at. A leak fails the test with a message naming what leaked; leaked mounts are
unmounted and loop devices detached by path, so that the next test starts clean.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

import attrs

__all__ = ["FileWatch", "HostState", "Mount", "cleanup", "mount_table", "private_propagation"]


@attrs.frozen
class Mount:
    """One line of ``mountinfo``: enough to name it and to unmount it."""

    mount_id: int
    mount_point: str
    fs_type: str
    source: str
    shared: bool


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (fs/proc_namespace.c).
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def mount_table() -> dict[int, Mount]:
    """The calling process's mounts by mount id."""
    with open("/proc/self/mountinfo", "rb") as file:
        text = file.read()
    table = {}
    for line in text.splitlines():
        fields = line.split(b" ")
        separator = fields.index(b"-", 6)
        optional = fields[6:separator]
        mount = Mount(
            mount_id=int(fields[0]),
            mount_point=_unescape(fields[4]),
            fs_type=_unescape(fields[separator + 1]),
            source=_unescape(fields[separator + 2]),
            shared=any(tag.startswith(b"shared:") for tag in optional),
        )
        table[mount.mount_id] = mount
    return table


def mount_points() -> set[str]:
    """The calling process's mount points."""
    return {m.mount_point for m in mount_table().values()}


def private_propagation() -> bool:
    """Whether no mount of this process propagates to a peer (nothing leaks to the host)."""
    return not any(m.shared for m in mount_table().values())


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
    """Mounts and loop devices at one moment."""

    mounts: dict[int, Mount]
    loops: dict[str, str]

    @classmethod
    def now(cls) -> HostState:
        """The host as it is."""
        return cls(mount_table(), loop_devices())

    def leaks_since(
        self, before: HostState, scope: Path
    ) -> tuple[list[Mount], list[tuple[str, str]]]:
        """Mounts and loop devices present now that were not ``before``, and that belong to
        ``scope`` (mounted below it, or from a source below it; backed by a file below it).

        Only those: other processes on the host mount and attach loop devices too, and the
        guard must never take theirs for a leak, let alone undo them. In a private mount
        namespace, though, every new mount is this process's (the host's do not propagate
        in), so there a mount anywhere counts: a driver mounting outside its home is caught.
        """
        anywhere = private_propagation()
        mounts = [
            m
            for i, m in self.mounts.items()
            if i not in before.mounts
            and (anywhere or _below(m.mount_point, scope) or _below(m.source, scope))
        ]
        loops = [
            (device, backing)
            for device, backing in self.loops.items()
            if before.loops.get(device) != backing and _below(backing, scope)
        ]
        return mounts, loops


def _below(path: str, scope: Path) -> bool:
    return path == str(scope) or path.startswith(str(scope).rstrip("/") + "/")


def describe(mounts: list[Mount], loops: list[tuple[str, str]]) -> list[str]:
    """One line per leaked mount or loop device."""
    lines = [f"leaked mount: {m.mount_point} ({m.fs_type} from {m.source})" for m in mounts]
    lines += [f"leaked loop device: {device} (backing {backing})" for device, backing in loops]
    return lines


def cleanup(mounts: list[Mount], loops: list[tuple[str, str]]) -> list[str]:
    """Unmount leaked mounts (deepest first) and detach leaked loop devices, by path.

    :returns: what could not be cleaned, one line each.
    """
    from laminae.kernel import _loop, _mounts

    failures = []
    for mount in sorted(mounts, key=lambda m: m.mount_point.count("/"), reverse=True):
        try:
            _mounts.umount(mount.mount_point, _mounts.MNT_DETACH)
        except OSError as exc:
            failures.append(f"could not unmount {mount.mount_point}: {exc}")
    for device, _ in loops:
        try:
            _loop.detach_loop(device)
        except OSError as exc:
            failures.append(f"could not detach {device}: {exc}")
    return failures
