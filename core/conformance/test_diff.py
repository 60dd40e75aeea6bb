"""Changes and diffs: what changed between a layer and its parent (graphtest Changes and
Echo), and the layer tar of it (graphtest DiffApply), which must apply elsewhere to the same
tree, and come out byte for byte the same every time."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import tarfile
from collections.abc import Collection
from pathlib import Path

import pytest
import zstandard

import laminae
from laminae import Change, ChangeKind
from laminae.conformance._fixtures import StoreFactory
from laminae.conformance._layers import apply, commit_written, mounted
from laminae.conformance._tars import UNOWNED_MAJOR, LayerTar
from laminae.conformance._tree import assert_same_tree, hardlink_groups, snapshot


def diff_bytes(
    store: laminae.Store, ref: str, compression: laminae.Compression = laminae.Compression.NONE
) -> tuple[bytes, laminae.DiffResult]:
    out = io.BytesIO()
    result = store.diff(ref, out, compression=compression)
    return out.getvalue(), result


def tar_differences(want: bytes, got: bytes, limit: int = 10) -> str:
    """Why two layer tars differ, entry by entry: what a DiffID mismatch alone cannot say."""

    def entries(data: bytes) -> dict[str, tuple[tuple[str, object], ...]]:
        found: dict[str, tuple[tuple[str, object], ...]] = {}
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            for member in archive:
                content = archive.extractfile(member) if member.isfile() else None
                digest = hashlib.sha256(content.read()).hexdigest()[:12] if content else None
                found[member.name] = (
                    ("type", member.type),
                    ("mode", oct(member.mode)),
                    ("uid", member.uid),
                    ("gid", member.gid),
                    ("mtime", member.pax_headers.get("mtime", member.mtime)),
                    ("size", member.size),
                    ("linkname", member.linkname),
                    ("devices", (member.devmajor, member.devminor)),
                    ("pax", tuple(sorted(member.pax_headers.items()))),
                    ("content", digest),
                )
        return found

    a, b = entries(want), entries(got)
    lines = [f"{name}: only in the first tar" for name in sorted(a.keys() - b.keys())]
    lines += [f"{name}: only in the second tar" for name in sorted(b.keys() - a.keys())]
    for name in sorted(a.keys() & b.keys()):
        lines += [
            f"{name}: {field} {x!r} then {y!r}"
            for (field, x), (_, y) in zip(a[name], b[name], strict=True)
            if x != y
        ]
    if list(a) != list(b) and not lines:
        lines.append(f"the same entries in another order: {list(a)} then {list(b)}")
    if not lines and want != got:
        lines.append("the entries agree: the difference is in the padding or end blocks")
    return "; ".join(lines[:limit]) + (
        f"; ... {len(lines) - limit} more" if len(lines) > limit else ""
    )


def many_files(root: Path, count: int, seed: int) -> list[str]:
    """graphtest ``addManyFiles``: 64-byte random files, 100 per directory."""
    rng = random.Random(seed)
    paths = []
    for number in range(count):
        directory = root / f"directory-{number // 100 * 100}"
        directory.mkdir(exist_ok=True)
        path = directory / f"file-{number}"
        path.write_bytes(rng.randbytes(64))
        paths.append("/" + str(path.relative_to(root)))
    return paths


def assert_changes(
    got: list[Change],
    expected: dict[str, ChangeKind],
    *,
    optional_dirs: Collection[str] = frozenset(),
) -> None:
    """``got`` lists exactly ``expected``, sorted; a directory in ``optional_dirs`` may also
    be reported modified (its children changed; drivers differ on reporting that)."""
    assert [c.path for c in got] == sorted(c.path for c in got), "changes are not sorted"
    reported = {c.path: c.kind for c in got}
    extra = {
        path: kind
        for path, kind in reported.items()
        if path not in expected and not (path in optional_dirs and kind is ChangeKind.MODIFIED)
    }
    missing = {path: kind for path, kind in expected.items() if reported.get(path) != kind}
    assert not extra and not missing, (
        f"changes differ: unexpected {sorted((p, k.value) for p, k in extra.items())}, "
        f"missing or of the wrong kind {sorted((p, k.value) for p, k in missing.items())}"
    )


def ancestors(path: str) -> set[str]:
    parts = path.strip("/").split("/")
    return {"/" + "/".join(parts[:n]) for n in range(1, len(parts))}


def rich_chain(tar: type[LayerTar]) -> list[LayerTar]:
    """Three layers with every kind of entry, whiteouts and an opaque directory."""
    base = (
        tar()
        .dir("etc", mode=0o755)
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mtime_ns=1_600_000_000_123_456_789)
        .file("etc/shadow", b"root:*::0:::::\n", mode=0o640, gid=42)
        .dir("bin")
        .file("bin/busybox", b"\x7fELF busybox", mode=0o755)
        .hardlink("bin/sh", "bin/busybox")
        .symlink("bin/ls", "busybox")
        .file("bin/ping", b"\x7fELF ping", mode=0o4755, xattrs={"user.tag": b"\x00\xffbin"})
        .dir("dev")
        .chardev("dev/chr0", UNOWNED_MAJOR, 3)
        .blockdev("dev/blk0", UNOWNED_MAJOR, 0)
        .fifo("dev/initctl", mode=0o600)
        .dir("var/cache/apt", mode=0o755)
        .file("var/cache/apt/pkgcache.bin", b"cache" * 100)
        .dir("opt/app")
        .file("opt/app/old", b"old")
        .file("long-" + "n" * 200, b"long name")
    )
    middle = (
        tar()
        .whiteout("etc/shadow")
        .whiteout("var/cache")
        .file("etc/passwd", b"root:x:0:0::/root:/bin/ash\n")
        .dir("opt/app", mode=0o750)
        .opaque("opt/app")
        .file("opt/app/new", b"new")
        .dir("home/user", mode=0o700, uid=1000, gid=1000)
        .file("home/user/.profile", b"PATH=/bin\n", uid=1000, gid=1000)
        .hardlink("home/user/profile-link", "home/user/.profile")
    )
    top = (
        tar()
        .whiteout("bin/ls")
        .dir("bin/ls")
        .file("bin/ls/now-a-dir", b"type changed")
        .whiteout("home")
        .file("home", b"home is a file now")
        .file("etc/\udcff-not-utf8", b"bytes name")
    )
    return [base, middle, top]


@pytest.mark.laminae_area("diff")
class TestDiff:
    @pytest.mark.parametrize("file_count", [10, 100], ids=["10-files", "100-files"])
    def test_diff_apply(self, make_store: StoreFactory, scratch: Path, file_count: int) -> None:
        """graphtest DiffApply: the diff of a layer, applied on the same parent elsewhere,
        gives the same tree and the same size."""
        store = make_store()

        def write_base(root: Path) -> None:
            many_files(root, file_count, seed=3)
            (root / "file-remove.txt").write_bytes(b"remove me")
            (root / "var" / "lib").mkdir(parents=True)

        def write_upper(root: Path) -> None:
            many_files(root, file_count, seed=6)
            (root / "file-remove.txt").unlink()
            os.rmdir(root / "var" / "lib")

        base = commit_written(store, None, write_base)
        upper = commit_written(store, base, write_upper)
        base_tar, _ = diff_bytes(store, base.id)
        upper_tar, upper_diff = diff_bytes(store, upper.id)
        assert upper_diff.diff_id == upper.diff_id and upper_diff.size == upper.size == len(
            upper_tar
        ), "the diff of a committed layer is not the tar its DiffID was computed from"

        elsewhere = make_store(scratch / "elsewhere")
        base2 = elsewhere.apply_layer(io.BytesIO(base_tar))
        upper2 = elsewhere.apply_layer(io.BytesIO(upper_tar), parent=base2.id)
        assert (base2.id, upper2.id) == (base.id, upper.id)
        assert upper2.size == upper.size
        with mounted(store, upper.id) as want, mounted(elsewhere, upper2.id) as got:
            assert not os.path.lexists(got / "file-remove.txt"), "deleted file came back"
            assert not os.path.lexists(got / "var" / "lib"), "deleted dir came back"
            assert_same_tree(want, got, mtimes=True, what="layer applied from the diff")

    def test_changes(self, store: laminae.Store) -> None:
        """graphtest Changes: modified, added and deleted files in an upper layer."""
        base_paths: list[str] = []
        base = commit_written(store, None, lambda root: base_paths.extend(many_files(root, 20, 3)))
        expected: dict[str, ChangeKind] = {}

        def change_many(root: Path) -> None:
            rng = random.Random(6)
            for number, path in enumerate(base_paths):
                target = root / path.lstrip("/")
                if number % 3 == 0:  # modify: another size, so no mtime granularity hides it
                    target.write_bytes(rng.randbytes(65))
                    expected[path] = ChangeKind.MODIFIED
                elif number % 3 == 1:  # add a sibling
                    added = target.with_name(f"file-6-{number}")
                    added.write_bytes(rng.randbytes(64))
                    expected["/" + str(added.relative_to(root))] = ChangeKind.ADDED
                else:
                    target.unlink()
                    expected[path] = ChangeKind.DELETED

        upper = commit_written(store, base, change_many)
        assert_changes(store.changes(upper.id), expected, optional_dirs={"/directory-0"})
        assert_changes(
            store.changes(base.id),
            {p: ChangeKind.ADDED for p in [*base_paths, "/directory-0"]},
        )

    @pytest.mark.parametrize("depth", range(10))
    def test_echo(self, store: laminae.Store, depth: int) -> None:
        """containers/storage Echo: a 10-component path, removed at ``depth`` in a second
        layer and made again in a third (where opaque dirs and redirects go wrong)."""
        components = [f"level-{n}" for n in range(10)]
        full = "/" + "/".join(components)
        prefixes = ["/" + "/".join(components[: n + 1]) for n in range(10)]

        def create(root: Path, start: int) -> None:
            for number, prefix in enumerate(prefixes[start:], start):
                path = root / prefix.lstrip("/")
                if number == 9:
                    path.write_bytes(b"echo")
                else:
                    path.mkdir()

        base = commit_written(store, None, lambda root: create(root, 0))
        assert_changes(store.changes(base.id), dict.fromkeys(prefixes, ChangeKind.ADDED))

        removed = prefixes[depth]

        def remove(root: Path) -> None:
            path = root / removed.lstrip("/")
            shutil.rmtree(path) if path.is_dir() else path.unlink()

        second = commit_written(store, base, remove)
        assert_changes(
            store.changes(second.id),
            {removed: ChangeKind.DELETED},
            optional_dirs=ancestors(removed),
        )
        third = commit_written(store, second, lambda root: create(root, depth))
        assert_changes(
            store.changes(third.id),
            dict.fromkeys(prefixes[depth:], ChangeKind.ADDED),
            optional_dirs=ancestors(removed),
        )
        with mounted(store, third.id) as root:
            assert (root / full.lstrip("/")).read_bytes() == b"echo"

    def test_diff_round_trip(
        self, make_store: StoreFactory, tar: type[LayerTar], scratch: Path
    ) -> None:
        """What none of the peers tests: every layer's diff, applied in another store in
        order, gives the same tree (times, owners, xattrs, devices, hardlinks), and the diffs
        of the copies are byte for byte the diffs of the originals."""
        store = make_store()
        elsewhere = make_store(scratch / "elsewhere")
        parent = parent2 = None
        for number, layer_tar in enumerate(rich_chain(tar)):
            layer = apply(store, layer_tar, parent)
            data, result = diff_bytes(store, layer.id)
            assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
            copy = elsewhere.apply_layer(io.BytesIO(data), parent=parent2, diff_id=result.diff_id)
            assert copy.diff_id == result.diff_id
            with mounted(store, layer.id) as want, mounted(elsewhere, copy.id) as got:
                assert_same_tree(want, got, mtimes=True, what=f"copy of layer {number}")
                assert hardlink_groups(want) == hardlink_groups(got), f"hardlinks of {number}"
            again, again_result = diff_bytes(elsewhere, copy.id)
            assert again_result.diff_id == result.diff_id, (
                f"diff of the copy of layer {number} has another DiffID: "
                + tar_differences(data, again)
            )
            parent, parent2 = layer.id, copy.id

    def test_diff_is_deterministic(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        """Two diffs of one layer are the same bytes, compressed or not."""
        parent = None
        for layer_tar in rich_chain(tar):
            parent = apply(store, layer_tar, parent).id
        assert parent is not None
        first, first_result = diff_bytes(store, parent)
        second, second_result = diff_bytes(store, parent)
        assert first == second, "two diffs of the same layer differ: " + tar_differences(
            first, second
        )
        assert first_result == second_result
        for compression, decompress in (
            (laminae.Compression.GZIP, gzip.decompress),
            (laminae.Compression.ZSTD, zstandard.ZstdDecompressor().decompressobj().decompress),
        ):
            packed, result = diff_bytes(store, parent, compression)
            assert decompress(packed) == first, f"{compression} diff is not the plain diff"
            assert result.diff_id == first_result.diff_id
            assert result.digest == "sha256:" + hashlib.sha256(packed).hexdigest()
            assert result.size == len(packed)

    def test_diff_writes_whiteouts(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        """A deleted file or directory is one whiteout entry, its children are not listed."""
        base = apply(
            store,
            tar().dir("etc").file("etc/gone", b"x").file("etc/kept", b"y").file("d/a/b", b"z"),
        )
        top = commit_written(
            store,
            base,
            lambda root: (root / "etc" / "gone").unlink(),
            lambda root: shutil.rmtree(root / "d"),
        )
        data, _ = diff_bytes(store, top.id)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            names = [m.name.rstrip("/") for m in archive.getmembers()]
        whiteouts = sorted(n for n in names if os.path.basename(n).startswith(".wh."))
        assert whiteouts == [".wh.d", "etc/.wh.gone"], f"whiteouts in the diff: {names}"
        assert not any(n.startswith("d/") for n in names), f"children of a deleted dir: {names}"

    def test_diff_writes_hardlinks(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        layer = apply(store, tar().file("a", b"data").hardlink("b", "a").hardlink("c", "a"))
        data, _ = diff_bytes(store, layer.id)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            members = {m.name: m for m in archive.getmembers()}
        regular = [n for n, m in members.items() if m.isreg()]
        links = {n: m.linkname for n, m in members.items() if m.islnk()}
        assert len(regular) == 1, f"one file and hardlinks to it expected: {sorted(members)}"
        assert sorted([*regular, *links]) == ["a", "b", "c"]
        assert set(links.values()) == set(regular), f"hardlinks point elsewhere: {links}"

    def test_empty_diff(self, make_store: StoreFactory, scratch: Path) -> None:
        """containerd EmptyDiff: no change, an empty tar, an empty layer elsewhere."""
        store = make_store()
        base = commit_written(store, None, lambda root: (root / "f").write_bytes(b"f"))
        active = store.create_layer("unchanged", parent=base.id)
        assert store.changes(active.id) == []
        data, result = diff_bytes(store, active.id)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            assert archive.getmembers() == []
        copy = make_store(scratch / "elsewhere").apply_layer(io.BytesIO(data))
        assert copy.diff_id == result.diff_id

    def test_changes_after_apply(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        """Changes of an applied layer are what its tar said, whiteouts as deletions."""
        base = apply(store, tar().dir("a").file("a/one", b"1").file("a/two", b"2").dir("b"))
        top = apply(
            store,
            tar().whiteout("a/one").file("a/two", b"two").file("a/three", b"3").whiteout("b"),
            base,
        )
        assert_changes(
            store.changes(top.id),
            {
                "/a/one": ChangeKind.DELETED,
                "/a/two": ChangeKind.MODIFIED,
                "/a/three": ChangeKind.ADDED,
                "/b": ChangeKind.DELETED,
            },
            optional_dirs={"/a"},
        )
        with mounted(store, top.id) as root:
            assert sorted(snapshot(root)) == ["/", "/a", "/a/three", "/a/two"]
