"""The kernel calls of laminae.kernel (mounts, mountinfo, loop devices, copies, statfs,
openat2), against the real kernel (no mocks)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from laminae.kernel import _filecopy, _filesystems, _loop, _mountinfo, _mounts, _paths

# --- mountinfo ---------------------------------------------------------------------------------

SAMPLE_MOUNTINFO = (
    b"36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
    b"40 36 0:42 / /srv/with\\040space\\011tab\\134slash rw shared:7 master:2"
    b" - tmpfs my\\040src rw\n"
    b"41 36 0:43 /sub /srv/plain ro - overlay overlay ro,lowerdir=/a:/b\n"
    b"42 36 0:44 / /srv/\\377name rw - tmpfs  rw,size=4k\n"
)


def test_mountinfo_parses_fields_and_skips_optional_ones() -> None:
    first, spaced, plain, odd = _mountinfo.parse_mountinfo(SAMPLE_MOUNTINFO)
    assert first == _mountinfo.MountInfo(
        mount_id=36,
        parent_id=35,
        root="/mnt1",
        mount_point="/mnt2",
        options="rw,noatime",
        fs_type="ext3",
        source="/dev/root",
        super_options="rw,errors=continue",
    )
    assert spaced.mount_point == "/srv/with space\ttab\\slash"
    assert spaced.source == "my src"
    assert spaced.fs_type == "tmpfs"
    assert (plain.root, plain.options, plain.super_options) == ("/sub", "ro", "ro,lowerdir=/a:/b")
    # A name that is not UTF-8 survives as surrogateescape, so os.fsencode gives the bytes back.
    assert os.fsencode(odd.mount_point) == b"/srv/\xffname"
    assert odd.source == ""


def test_mountinfo_rejects_a_malformed_line() -> None:
    with pytest.raises(ValueError, match="malformed mountinfo"):
        _mountinfo.parse_mountinfo(b"36 35 98:0 / /mnt rw\n")


def test_mountinfo_live_has_the_root_mount() -> None:
    entries = _mountinfo.mountinfo()
    assert any(entry.mount_point == "/" for entry in entries)
    assert "/" in _mountinfo.mount_points()
    assert _mountinfo.is_mountpoint("/")
    assert not _mountinfo.is_mountpoint(str(Path(__file__).parent))


@pytest.mark.root
def test_mountinfo_live_decodes_a_mount_point_with_a_space(tmp_path: Path) -> None:
    target = tmp_path / "a dir\twith blanks"
    target.mkdir()
    _mounts.mount("laminae test", str(target), "tmpfs", 0, "size=1m")
    try:
        (entry,) = [e for e in _mountinfo.mountinfo() if e.mount_point == str(target)]
        assert (entry.fs_type, entry.source) == ("tmpfs", "laminae test")
        assert _mountinfo.is_mountpoint(str(target))
    finally:
        _mounts.umount(str(target))
    assert not _mountinfo.is_mountpoint(str(target))


# --- openat2 -------------------------------------------------------------------------------------


@pytest.fixture
def rootfs(tmp_path: Path) -> Iterator[int]:
    """A tiny root filesystem with an absolute symlink to /etc/passwd; yields its dir fd."""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("inside\n")
    (root / "abs").symlink_to("/etc/passwd")
    (root / "up").symlink_to("../../../../../etc/passwd")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _read_fd(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def test_openat2_is_available_on_this_kernel() -> None:
    assert _paths.openat2_available()


def test_openat2_in_root_keeps_an_absolute_symlink_inside(rootfs: int) -> None:
    fd = _paths.openat2(rootfs, "abs", os.O_RDONLY, resolve=_paths.RESOLVE_IN_ROOT)
    assert _read_fd(fd) == b"inside\n"
    fd = _paths.openat2(rootfs, b"up", os.O_RDONLY, resolve=_paths.RESOLVE_IN_ROOT)
    assert _read_fd(fd) == b"inside\n"


def test_openat2_beneath_refuses_dotdot_and_absolute_links(rootfs: int) -> None:
    for path in ("../etc/passwd", "abs", "up", "/etc/passwd"):
        with pytest.raises(OSError) as info:
            _paths.openat2(rootfs, path, os.O_RDONLY, resolve=_paths.RESOLVE_BENEATH)
        assert info.value.errno == errno.EXDEV, path
        assert info.value.filename == path


def test_openat2_no_symlinks_refuses_a_link(rootfs: int) -> None:
    with pytest.raises(OSError) as info:
        _paths.openat2(rootfs, "abs", os.O_RDONLY, resolve=_paths.RESOLVE_NO_SYMLINKS)
    assert info.value.errno == errno.ELOOP


def test_openat2_creates_with_mode_and_cloexec(rootfs: int) -> None:
    old_umask = os.umask(0)
    try:
        fd = _paths.openat2(
            rootfs, "etc/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, _paths.RESOLVE_IN_ROOT
        )
    finally:
        os.umask(old_umask)
    try:
        assert not os.get_inheritable(fd)
        assert os.fstat(fd).st_mode & 0o7777 == 0o640
    finally:
        os.close(fd)


# --- ficlone and copies, statfs, syncfs, rename, unshare ------------------------------------------


def _clone_file(directory: Path) -> tuple[Path, Path]:
    src, dst = directory / "src", directory / "dst"
    src.write_bytes(os.urandom(256 * 1024))
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        _filecopy.ficlone(src_fd, dst_fd)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    return src, dst


def test_ficlone_on_ext4_raises(tmp_path: Path) -> None:
    assert _filesystems.statfs_type(str(tmp_path)) == _filesystems.EXT4_SUPER_MAGIC
    with pytest.raises(OSError) as info:
        _clone_file(tmp_path)
    assert info.value.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "tmpfs"
    target.mkdir()
    _mounts.mount("tmpfs", str(target), "tmpfs", 0, "size=16m")
    try:
        yield target
    finally:
        _mounts.umount(str(target))


@pytest.mark.root
def test_ficlone_on_tmpfs_raises(tmpfs: Path) -> None:
    assert _filesystems.statfs_type(str(tmpfs)) == _filesystems.TMPFS_MAGIC
    with pytest.raises(OSError) as info:
        _clone_file(tmpfs)
    assert info.value.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL)


@pytest.mark.root
def test_ficlone_across_filesystems_raises_exdev(tmpfs: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"data")
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(tmpfs / "dst", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as info:
            _filecopy.ficlone(src_fd, dst_fd)
        assert info.value.errno == errno.EXDEV
    finally:
        os.close(src_fd)
        os.close(dst_fd)


@pytest.mark.root
def test_ficlone_on_btrfs_shares_content(btrfs: Path) -> None:
    assert _filesystems.statfs_type(str(btrfs)) == _filesystems.BTRFS_SUPER_MAGIC
    src, dst = _clone_file(btrfs)
    assert dst.read_bytes() == src.read_bytes()
    # A clone is a new inode: changing one leaves the other alone.
    with open(dst, "r+b") as file:
        file.write(b"changed")
    assert src.read_bytes()[:7] != b"changed"


def _sparse_file(path: Path) -> bytes:
    """A 16 MiB file: 64 KiB of data at 0 and at 8 MiB, holes around them and at its end."""
    head, middle = os.urandom(64 * 1024), os.urandom(64 * 1024)
    with open(path, "wb") as file:
        file.write(head)
        file.seek(8 << 20)
        file.write(middle)
        file.truncate(16 << 20)
    return head + bytes((8 << 20) - len(head)) + middle + bytes((8 << 20) - len(middle))


def _copy_data(copier: _filecopy.DataCopier, src: Path, dst: Path) -> None:
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        copier.copy(src_fd, dst_fd)
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def test_data_copier_keeps_holes_where_it_cannot_reflink(tmp_path: Path) -> None:
    src, dst, again = tmp_path / "src", tmp_path / "dst", tmp_path / "again"
    content = _sparse_file(src)
    copier = _filecopy.DataCopier()
    _copy_data(copier, src, dst)
    assert not copier.reflink, "ext4 refused FICLONE once; the copier remembers"
    _copy_data(copier, src, again)
    for copy in (dst, again):
        assert copy.read_bytes() == content
        st = copy.stat()
        assert st.st_size == 16 << 20
        assert st.st_blocks * 512 <= 256 * 1024, "the holes stay holes"


def test_data_copier_copies_an_empty_file_and_a_file_that_is_all_hole(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    with open(tmp_path / "hole", "wb") as file:
        file.truncate(1 << 20)
    copier = _filecopy.DataCopier(reflink=False)
    _copy_data(copier, tmp_path / "empty", tmp_path / "empty-copy")
    _copy_data(copier, tmp_path / "hole", tmp_path / "hole-copy")
    assert (tmp_path / "empty-copy").read_bytes() == b""
    assert (tmp_path / "hole-copy").read_bytes() == bytes(1 << 20)
    assert (tmp_path / "hole-copy").stat().st_blocks == 0


def _dense_file_with_zero_blocks(path: Path) -> bytes:
    """Data, 8 MiB of zeros, data, 1 MiB of zeros, and a tail shorter than a block, every
    byte written (no hole)."""
    content = (
        os.urandom(64 * 1024)
        + bytes(8 << 20)
        + os.urandom(64 * 1024)
        + bytes(1 << 20)
        + os.urandom(100)
    )
    path.write_bytes(content)
    return content


def test_data_copier_leaves_holes_for_zeros_where_the_map_shows_none(tmp_path: Path) -> None:
    """A filesystem without a SEEK_DATA of its own (NFSv3, FUSE) maps a sparse file as all
    data; its size and blocks still tell, and blocks of zeros become holes in the copy."""
    content = _dense_file_with_zero_blocks(tmp_path / "src")
    trailing = os.urandom(4096) + bytes(2 << 20)
    (tmp_path / "src-trailing").write_bytes(trailing)
    copier = _filecopy.DataCopier(reflink=False)
    for name, data in (("src", content), ("src-trailing", trailing)):
        src_fd = os.open(tmp_path / name, os.O_RDONLY)
        dst_fd = os.open(tmp_path / f"{name}-copy", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # ext4 maps this dense file as one data segment, as such a filesystem maps a
            # sparse one; the allocation it reports then is what the caller passes.
            copier.copy(src_fd, dst_fd, len(data), allocated=256 * 1024)
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        copy = tmp_path / f"{name}-copy"
        assert copy.read_bytes() == data
        assert copy.stat().st_blocks * 512 <= 256 * 1024, f"{name}: the zeros became holes"


def test_data_copier_keeps_the_zeros_of_a_dense_file(tmp_path: Path) -> None:
    """Zeros a file has allocated are data: a copy of a dense file is as dense."""
    content = _dense_file_with_zero_blocks(tmp_path / "src")
    _copy_data(_filecopy.DataCopier(reflink=False), tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == content
    assert (tmp_path / "dst").stat().st_blocks >= len(content) // 512


@pytest.mark.root
def test_data_copier_reflinks_on_btrfs(btrfs: Path) -> None:
    content = _sparse_file(btrfs / "src")
    copier = _filecopy.DataCopier()
    _copy_data(copier, btrfs / "src", btrfs / "dst")
    assert copier.reflink
    assert (btrfs / "dst").read_bytes() == content


def test_statfs_type_raises_naming_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as info:
        _filesystems.statfs_type(missing)
    assert info.value.filename == missing


def test_syncfs_flushes_and_rejects_a_bad_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _filesystems.syncfs(fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        _filesystems.syncfs(fd)
    assert info.value.errno == errno.EBADF


def test_rename_noreplace_refuses_an_existing_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        _paths.rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
    _paths.rename_noreplace(str(tmp_path / "a"), str(tmp_path / "c"))
    assert (tmp_path / "c").is_dir()


@pytest.mark.root
def test_unshare_gives_the_process_its_own_mount_namespace() -> None:
    code = (
        "import os; from laminae.kernel import _mounts; before = os.readlink('/proc/self/ns/mnt'); "
        "_mounts.unshare(_mounts.CLONE_NEWNS); "
        "print(before != os.readlink('/proc/self/ns/mnt'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "True", result.stderr


# --- mounts ---------------------------------------------------------------------------------------


@pytest.mark.root
def test_mount_and_umount_raise_naming_the_target(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        _mounts.umount(str(tmp_path))
    assert info.value.errno == errno.EINVAL
    assert info.value.filename == str(tmp_path)
    with pytest.raises(OSError) as info:
        _mounts.mount("none", str(tmp_path / "missing"), "tmpfs")
    assert info.value.errno == errno.ENOENT


@pytest.mark.root
def test_bind_mount_readonly_refuses_writes_recursively(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    (source / "sub").mkdir(parents=True)
    target.mkdir()
    (source / "file").write_text("x")
    _mounts.mount("tmpfs", str(source / "sub"), "tmpfs", 0, "size=1m")
    try:
        _mounts.bind_mount(str(source), str(target), readonly=True)
        try:
            assert (target / "file").read_text() == "x"
            for path in (target / "new", target / "sub" / "new"):
                with pytest.raises(OSError) as info:
                    path.write_text("y")
                assert info.value.errno == errno.EROFS
            (source / "sub" / "seen").write_text("z")
            assert (target / "sub" / "seen").read_text() == "z"
        finally:
            _mounts.umount(str(target), _mounts.MNT_DETACH)
    finally:
        _mounts.umount(str(source / "sub"))


@pytest.mark.root
def test_bind_mount_writable_writes_through(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    _mounts.bind_mount(str(source), str(target), recursive=False)
    try:
        assert _mountinfo.is_mountpoint(str(target))
        (target / "new").write_text("y")
    finally:
        _mounts.umount(str(target))
    assert (source / "new").read_text() == "y"


def _lowers(base: Path, count: int) -> list[str]:
    paths = []
    for index in range(count):
        lower = base / f"l{index}"
        lower.mkdir()
        (lower / f"f{index}").write_text(str(index))
        (lower / "shadowed").write_text(str(index))
        paths.append(str(lower))
    return paths


@pytest.mark.root
def test_mount_overlay_shows_the_union_of_three_lowers(tmp_path: Path) -> None:
    lowers = _lowers(tmp_path, 3)
    target = tmp_path / "merged"
    target.mkdir()
    _mounts.mount_overlay(str(target), lowers)
    try:
        assert sorted(os.listdir(target)) == ["f0", "f1", "f2", "shadowed"]
        # The first lower is the uppermost.
        assert (target / "shadowed").read_text() == "0"
        assert _filesystems.statfs_type(str(target)) == _filesystems.OVERLAYFS_SUPER_MAGIC
        with pytest.raises(OSError) as info:
            (target / "new").write_text("x")
        assert info.value.errno == errno.EROFS
    finally:
        _mounts.umount(str(target))


@pytest.mark.root
def test_mount_overlay_with_upper_writes_to_upper(tmp_path: Path) -> None:
    lowers = _lowers(tmp_path, 2)
    upper, work, target = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for path in (upper, work, target):
        path.mkdir()
    # A key=value option, a bare flag, and a mount attribute.
    options = ["redirect_dir=nofollow", "userxattr", "nodev"]
    _mounts.mount_overlay(str(target), lowers, str(upper), str(work), options)
    try:
        (target / "new").write_text("x")
        (entry,) = [e for e in _mountinfo.mountinfo() if e.mount_point == str(target)]
        assert "nodev" in entry.options.split(",")
        assert {"redirect_dir=nofollow", "userxattr"} <= set(entry.super_options.split(","))
    finally:
        _mounts.umount(str(target))
    assert (upper / "new").read_text() == "x"


@pytest.mark.root
def test_mount_overlay_takes_500_lowers_and_refuses_501(tmp_path: Path) -> None:
    lowers = _lowers(tmp_path, 501)
    target = tmp_path / "merged"
    target.mkdir()
    _mounts.mount_overlay(str(target), lowers[:500])
    try:
        assert len(os.listdir(target)) == 501
    finally:
        _mounts.umount(str(target))
    with pytest.raises(OSError) as info:
        _mounts.mount_overlay(str(target), lowers)
    assert info.value.errno == errno.EINVAL
    assert "limit is 500" in str(info.value)
    assert not _mountinfo.is_mountpoint(str(target))


@pytest.mark.root
def test_mount_overlay_takes_a_lower_path_longer_than_fsconfig_strings(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["d" * 60] * 5)
    deep.mkdir(parents=True)
    (deep / "deep-file").write_text("x")
    assert len(str(deep)) > 256
    target = tmp_path / "merged"
    target.mkdir()
    _mounts.mount_overlay(str(target), [str(deep), *_lowers(tmp_path, 1)])
    try:
        assert sorted(os.listdir(target)) == ["deep-file", "f0", "shadowed"]
    finally:
        _mounts.umount(str(target))


@pytest.mark.root
def test_mount_overlay_error_carries_the_kernel_reason(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    target.mkdir()
    with pytest.raises(OSError) as info:
        _mounts.mount_overlay(str(target), _lowers(tmp_path, 1), options=["bogus=1"])
    assert info.value.errno == errno.EINVAL
    assert "Unknown parameter 'bogus'" in str(info.value)
    with pytest.raises(FileNotFoundError) as missing:
        _mounts.mount_overlay(str(target), [str(tmp_path / "nowhere")])
    assert missing.value.filename == str(tmp_path / "nowhere")


@pytest.mark.root
def test_classic_overlay_fallback_escapes_separators(tmp_path: Path) -> None:
    odd = tmp_path / "a,b:c"
    odd.mkdir()
    (odd / "odd").write_text("x")
    target = tmp_path / "merged"
    target.mkdir()
    # The fallback for kernels without lowerdir+ (< 6.8), exercised directly.
    _mounts._mount_overlay_classic(
        str(target), [str(odd), *_lowers(tmp_path, 1)], None, None, ["ro"]
    )
    try:
        assert sorted(os.listdir(target)) == ["f0", "odd", "shadowed"]
    finally:
        _mounts.umount(str(target))


# --- loop devices ---------------------------------------------------------------------------------


def _attached(image: Path) -> bool:
    listing = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True)
    return str(image) in listing.stdout


@pytest.mark.root
def test_attach_and_detach_loop_leave_no_device(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as file:
        file.truncate(16 * 1024 * 1024)
    device = _loop.attach_loop(str(image), readonly=True)
    try:
        assert device.startswith("/dev/loop")
        assert _attached(image)
        assert Path(f"/sys/block/{Path(device).name}/ro").read_text().strip() == "1"
    finally:
        _loop.detach_loop(device)
    assert not _attached(image)
    with pytest.raises(OSError) as info:
        _loop.detach_loop(device)
    assert info.value.errno == errno.ENXIO


@pytest.mark.root
def test_loop_device_of_finds_the_device_an_image_is_attached_to(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as file:
        file.truncate(16 * 1024 * 1024)
    assert _loop.loop_device_of(image) is None
    device = _loop.attach_loop(str(image))
    try:
        assert _loop.loop_device_of(image) == device
        assert _loop.loop_device_of(str(tmp_path / "other.img")) is None
    finally:
        _loop.detach_loop(device)
    assert _loop.loop_device_of(image) is None


def _make_ext4(image: Path) -> None:
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)


@pytest.mark.root
def test_loop_device_goes_away_with_its_unmount(tmp_path: Path) -> None:
    image, target = tmp_path / "disk.img", tmp_path / "mnt"
    target.mkdir()
    _make_ext4(image)
    device = _loop.attach_loop(str(image))
    try:
        _mounts.mount(device, str(target), "ext4")
        try:
            assert _attached(image)
            (target / "file").write_text("x")
        finally:
            _mounts.umount(str(target))
        # Auto-clear: the mount held the device, nothing else does.
        assert not _attached(image)
    finally:
        # Already gone: detaching again is a no-op, never another process's device.
        _loop.detach_loop(device)


@pytest.mark.root
def test_detach_loop_while_mounted_clears_at_unmount(tmp_path: Path) -> None:
    image, target = tmp_path / "disk.img", tmp_path / "mnt"
    target.mkdir()
    _make_ext4(image)
    device = _loop.attach_loop(str(image))
    try:
        _mounts.mount(device, str(target), "ext4")
    except BaseException:
        _loop.detach_loop(device)
        raise
    try:
        _loop.detach_loop(device)
        assert _attached(image)
    finally:
        _mounts.umount(str(target))
    assert not _attached(image)


@pytest.mark.root
def test_attach_loop_of_a_missing_image_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    with pytest.raises(FileNotFoundError) as info:
        _loop.attach_loop(str(missing))
    assert info.value.filename == str(missing)
