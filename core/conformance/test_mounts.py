"""Mounts: read-only where they must be, counted, and showing exactly what was written
through them across layers (containerd's content cases, each checked against a flat
directory written by the same steps)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

import laminae
from laminae.conformance._layers import (
    Writer,
    apply,
    assert_read_only,
    build_checked_chain,
    commit_written,
    mounted,
)
from laminae.conformance._leaks import mount_points
from laminae.conformance._tars import LayerTar


def create_file(path: str, data: bytes, mode: int = 0o644) -> Writer:
    def write(root: Path) -> None:
        target = root / path.lstrip("/")
        target.write_bytes(data)
        os.chmod(target, mode)

    return write


def create_dir(path: str, mode: int = 0o755) -> Writer:
    def write(root: Path) -> None:
        target = root / path.lstrip("/")
        target.mkdir()
        os.chmod(target, mode)

    return write


def remove(path: str) -> Writer:
    def write(root: Path) -> None:
        target = root / path.lstrip("/")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()

    return write


def chown(path: str, uid: int, gid: int) -> Writer:
    def write(root: Path) -> None:
        os.chown(root / path.lstrip("/"), uid, gid, follow_symlinks=False)

    return write


def chmod(path: str, mode: int) -> Writer:
    def write(root: Path) -> None:
        os.chmod(root / path.lstrip("/"), mode)

    return write


def link(target: str, path: str) -> Writer:
    def write(root: Path) -> None:
        os.link(root / target.lstrip("/"), root / path.lstrip("/"))

    return write


def rename(source: str, destination: str) -> Writer:
    def write(root: Path) -> None:
        os.rename(root / source.lstrip("/"), root / destination.lstrip("/"))

    return write


@pytest.mark.laminae_area("mounts")
class TestMounts:
    def test_view_readonly(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        """containerd ViewReadonly: writing into a mounted view fails with EROFS, for real."""
        base = apply(store, tar().file("inside", b"x"))
        view = store.create_layer("view", parent=base.id, view=True)
        with mounted(store, view.id) as root:
            assert_read_only(root)
            with pytest.raises(OSError) as caught:
                (root / "inside").write_bytes(b"changed")
            assert caught.value.errno == 30, caught.value  # EROFS
            assert (root / "inside").read_bytes() == b"x"

    def test_committed_mount_readonly(self, store: laminae.Store, tar: type[LayerTar]) -> None:
        base = apply(store, tar().file("inside", b"x"))
        with mounted(store, base.id) as root:
            assert_read_only(root)

    def test_active_readonly_mount(self, store: laminae.Store) -> None:
        """An active layer mounted with ``readonly=True`` refuses writes too."""
        layer = store.create_layer("ro-active")
        with mounted(store, layer.id, readonly=True) as root:
            assert_read_only(root)

    def test_active_mount_writable(self, store: laminae.Store) -> None:
        layer = store.create_layer("rw")
        with mounted(store, layer.id) as root:
            (root / "written").write_bytes(b"data")
        with mounted(store, layer.id) as root:
            assert (root / "written").read_bytes() == b"data"

    def test_mount_point_under_runroot(self, store: laminae.Store) -> None:
        layer = store.create_layer("where")
        with mounted(store, layer.id) as root:
            assert root.is_relative_to(store.runroot), root
            assert str(root) in mount_points(), f"{root} is not a mount point"
            assert store.layer(layer.id).mount_point == root

    def test_mount_counting(self, store: laminae.Store) -> None:
        """Mounted twice, unmounted once: still mounted; unmounted again: gone from mountinfo."""
        layer = store.create_layer("counted")
        first = store.mount(layer.id)
        second = store.mount(layer.id)
        assert first == second
        assert store.layer(layer.id).mount_count == 2
        store.unmount(layer.id)
        assert store.layer(layer.id).mount_count == 1
        assert str(first) in mount_points(), "unmounted while a second mount was counted"
        store.unmount(layer.id)
        assert store.layer(layer.id).mount_count == 0
        assert str(first) not in mount_points(), "still mounted after the last unmount"
        with pytest.raises(laminae.FailedPrecondition):
            store.unmount(layer.id)

    def test_force_unmount(self, store: laminae.Store) -> None:
        layer = store.create_layer("forced")
        path = store.mount(layer.id)
        store.mount(layer.id)
        store.unmount(layer.id, force=True)
        assert store.layer(layer.id).mount_count == 0
        assert str(path) not in mount_points()

    def test_mount_again_shows_same_content(
        self, store: laminae.Store, tar: type[LayerTar]
    ) -> None:
        """Mounts are described anew each time and show the same tree."""
        base = apply(store, tar().dir("etc").file("etc/hostname", b"box\n"))
        for _ in range(3):
            with mounted(store, base.id) as root:
                assert (root / "etc" / "hostname").read_bytes() == b"box\n"

    def test_layer_file_update(self, store: laminae.Store, scratch: Path) -> None:
        """containerd LayerFileupdate (docker#21555): a file rewritten with the same size and
        the same mtime, and a mode change, show in the upper layer."""
        same_time = (1_700_000_000_000_000_000,) * 2

        def hosts(content: bytes) -> Writer:
            def write(root: Path) -> None:
                (root / "etc" / "hosts").write_bytes(content)
                os.utime(root / "etc" / "hosts", ns=same_time)

            return write

        build_checked_chain(
            store,
            scratch / "flat",
            [
                [
                    create_dir("/etc"),
                    hosts(b"mydomain 10.0.0.1"),
                    create_file("/etc/profile", b"PATH=/usr/bin", 0o644),
                ],
                [hosts(b"mydomain 10.0.0.2"), chmod("/etc/profile", 0o666)],
                [hosts(b"mydomain 10.0.0.3"), chmod("/etc/profile", 0o644)],
            ],
        )

    def test_remove_directory_in_lower_layer(self, store: laminae.Store, scratch: Path) -> None:
        """containerd RemoveDirectoryInLowerLayer (docker#25244): a directory removed and
        made again must not show the lower layer's children."""
        build_checked_chain(
            store,
            scratch / "flat",
            [
                [
                    create_dir("/lib"),
                    create_dir("/lib/hidden"),
                    create_file("/lib/hidden/file", b"hidden"),
                ],
                [remove("/lib"), create_dir("/lib"), create_file("/lib/not-hidden", b"x")],
                [create_file("/lib/newfile", b"new")],
            ],
        )

    def test_chown(self, store: laminae.Store, scratch: Path) -> None:
        """containerd Chown (docker#20240, #24913, #28391)."""
        build_checked_chain(
            store,
            scratch / "flat",
            [
                [create_dir("/opt"), create_dir("/opt/a"), create_dir("/opt/a/b")],
                [
                    create_file("/opt/a/b/file.txt", b"hello"),
                    chown("/opt", 1, 1),
                    chown("/opt/a", 1, 1),
                    chown("/opt/a/b", 1, 1),
                    chown("/opt/a/b/file.txt", 1, 1),
                ],
            ],
        )

    def test_directory_permission_on_commit(self, store: laminae.Store, scratch: Path) -> None:
        """containerd DirectoryPermissionOnCommit (docker#27298)."""
        build_checked_chain(
            store,
            scratch / "flat",
            [
                [
                    create_dir("/dir1", 0o700),
                    create_dir("/dir2", 0o700),
                    create_dir("/dir3", 0o700),
                    chown("/dir1", 1, 1),
                    create_file("/dir3/file", b"hello", 0o644),
                    chown("/dir3", 1, 1),
                ],
                [create_dir("/dir4", 0o700), chown("/dir4", 1, 1), remove("/dir2")],
                [
                    create_dir("/dir2", 0o700),
                    chown("/dir2", 1, 1),
                    create_file("/dir2/file", b"hello", 0o644),
                ],
            ],
        )

    def test_deleted_files_in_child_layer(self, store: laminae.Store, scratch: Path) -> None:
        """containerd DeletedFilesInChildSnapshot: a file deleted in layer 2 stays deleted."""
        build_checked_chain(
            store,
            scratch / "flat",
            [
                [create_file("/foobar", b"foo")],
                [remove("/foobar")],
                [create_file("/another", b"bar")],
            ],
        )

    def test_move_file_from_lower_layer(self, store: laminae.Store, scratch: Path) -> None:
        """containerd MoveFileFromLowerLayer: a hardlink to a lower file, then the lower name
        removed."""
        build_checked_chain(
            store,
            scratch / "flat",
            [
                [
                    create_dir("/dir1"),
                    create_file("/dir1/f1", b"dir1 f1"),
                    create_dir("/dir2"),
                    create_file("/dir2/f2", b"dir2 f2"),
                ],
                [
                    remove("/dir1"),
                    create_dir("/dir3"),
                    create_file("/dir3/f1", b"dir3 f1"),
                    link("/dir2/f2", "/dir3/f2"),
                    remove("/dir2/f2"),
                ],
            ],
        )

    def test_rename_directory(self, store: laminae.Store, scratch: Path) -> None:
        """containerd Rename (docker#25409): a lower directory renamed in an upper layer."""
        build_checked_chain(
            store,
            scratch / "flat",
            [
                [create_dir("/dir1"), create_file("/dir1/f", b"f")],
                [rename("/dir1", "/dir2")],
            ],
        )

    def test_rename_file(self, store: laminae.Store, scratch: Path) -> None:
        """containerd Rename: a lower file renamed, and a file renamed over another."""
        build_checked_chain(
            store,
            scratch / "flat",
            [
                [create_file("/f1", b"one"), create_file("/f2", b"two")],
                [rename("/f1", "/f3"), create_file("/f4", b"four"), rename("/f4", "/f2")],
            ],
        )

    def test_permissions_and_owners_across_commit(
        self, store: laminae.Store, scratch: Path
    ) -> None:
        """Modes (setuid, setgid, sticky) and owners written through a mount survive commit
        and show in children."""
        base = commit_written(
            store,
            None,
            create_dir("/srv", 0o2775),
            chown("/srv", 1000, 1001),
            create_file("/srv/tool", b"#!/bin/true\n", 0o4755),
            create_dir("/tmp", 0o1777),
            create_file("/srv/secret", b"s", 0o600),
            chown("/srv/secret", 33, 33),
        )
        child = store.create_layer("child", parent=base.id)
        for ref in (base.id, child.id):
            with mounted(store, ref) as root:
                srv = os.lstat(root / "srv")
                assert (stat.S_IMODE(srv.st_mode), srv.st_uid, srv.st_gid) == (0o2775, 1000, 1001)
                tool = os.lstat(root / "srv" / "tool")
                assert stat.S_IMODE(tool.st_mode) == 0o4755, oct(tool.st_mode)
                assert stat.S_IMODE(os.lstat(root / "tmp").st_mode) == 0o1777
                secret = os.lstat(root / "srv" / "secret")
                assert (stat.S_IMODE(secret.st_mode), secret.st_uid, secret.st_gid) == (
                    0o600,
                    33,
                    33,
                )
