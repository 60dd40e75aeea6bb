"""Layer tars: the bounded reader, the fd-based extractor, whiteouts, the diff writer.

Applying runs twice where resolution matters: through ``openat2(RESOLVE_IN_ROOT)`` and through
the ``O_NOFOLLOW`` walk that replaces it on kernels without ``openat2``. Hostile tars (after
containerd's TestBreakouts and the CVEs in docs/architecture.md, "Security of extraction") run
next to a sentinel directory that must come through untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tarbuild import CAPABILITY, END, Layer, gnu_long, header, member, pax, tar

from laminae._exceptions import InvalidArgument, LimitExceeded
from laminae.archive._apply import ApplyResult, WhiteoutMode, apply_tar
from laminae.archive._changes import Change, ChangeKind, naive_changes
from laminae.archive._limits import Limits
from laminae.archive._tarheader import EntryType
from laminae.archive._tarstream import TarReader
from laminae.archive._write import write_changes_tar
from laminae.kernel import _paths, _xattrs

NS = 1_700_000_000_123_456_789


@pytest.fixture(params=["openat2", "walk"])
def resolution(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through openat2, and again through the component walk that stands in."""
    if request.param == "walk":
        monkeypatch.setattr(_paths, "openat2_available", lambda: False)
    else:
        assert _paths.openat2_available()
    return str(request.param)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def apply(root: Path, data: bytes, **kwargs: object) -> ApplyResult:
    return apply_tar(root, io.BytesIO(data), **kwargs)  # type: ignore[arg-type]


def listing(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


# --- file types and attributes --------------------------------------------------------------


@pytest.mark.root
def test_every_file_type(root: Path, resolution: str) -> None:
    data = (
        Layer()
        .dir("d", mode=0o750, uid=7, gid=8)
        .file("d/f", b"hello", mode=0o640, uid=1000, gid=1001)
        .symlink("d/s", "../etc/passwd")
        .hardlink("d/h", "d/f")
        .char("dev/null", 1, 3, mode=0o666)
        .block("dev/loop7", 7, 7, mode=0o660, gid=6)
        .fifo("run/fifo", mode=0o600, uid=5)
        .bytes()
    )
    result = apply(root, data)
    assert result == ApplyResult(len(data), 7)
    d = os.lstat(root / "d")
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o750
    assert (d.st_uid, d.st_gid) == (7, 8)
    f = os.lstat(root / "d/f")
    assert stat.S_IMODE(f.st_mode) == 0o640 and (f.st_uid, f.st_gid) == (1000, 1001)
    assert (root / "d/f").read_bytes() == b"hello"
    assert os.readlink(root / "d/s") == "../etc/passwd"
    assert os.lstat(root / "d/h").st_ino == f.st_ino and f.st_nlink == 2
    null = os.lstat(root / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    loop = os.lstat(root / "dev/loop7")
    assert stat.S_ISBLK(loop.st_mode) and loop.st_rdev == os.makedev(7, 7) and loop.st_gid == 6
    fifo = os.lstat(root / "run/fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and fifo.st_uid == 5 and stat.S_IMODE(fifo.st_mode) == 0o600
    # Implied parents are root-owned 0755.
    dev = os.lstat(root / "dev")
    assert stat.S_IMODE(dev.st_mode) == 0o755 and dev.st_uid == 0


def test_old_style_regular_and_contiguous_types_and_trailing_slash_dir(root: Path) -> None:
    data = tar(
        member(b"old", b"v7", b"\x00", magic=bytes(8)),
        member(b"contig", b"c", b"7"),
        member(b"olddir/", b"", b"\x00", magic=bytes(8), mode=0o700),
    )
    apply(root, data)
    assert (root / "old").read_bytes() == b"v7"
    assert (root / "contig").read_bytes() == b"c"
    assert (root / "olddir").is_dir()
    assert stat.S_IMODE(os.lstat(root / "olddir").st_mode) == 0o700


@pytest.mark.root
def test_owner_and_setuid_setgid_sticky(root: Path) -> None:
    data = (
        Layer()
        .file("bin/su", b"x", mode=0o4755, uid=0, gid=0)
        .file("bin/wall", b"x", mode=0o2755, uid=1000, gid=5)
        .file("bin/both", b"x", mode=0o6711, uid=1, gid=1)
        .dir("tmp", mode=0o1777)
        .dir("shared", mode=0o2775, uid=100, gid=100)
        .bytes()
    )
    apply(root, data)
    # chmod comes after chown, or the kernel would have cleared setuid/setgid.
    assert stat.S_IMODE(os.lstat(root / "bin/su").st_mode) == 0o4755
    wall = os.lstat(root / "bin/wall")
    assert stat.S_IMODE(wall.st_mode) == 0o2755 and (wall.st_uid, wall.st_gid) == (1000, 5)
    assert stat.S_IMODE(os.lstat(root / "bin/both").st_mode) == 0o6711
    assert stat.S_IMODE(os.lstat(root / "tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.lstat(root / "shared").st_mode) == 0o2775


@pytest.mark.root
def test_group_under_setgid_directories(root: Path, resolution: str) -> None:
    """New files take a setgid directory's group; the header's group must still win."""
    data = (
        Layer()
        .file("late/before", b"", gid=0)
        .dir("late", mode=0o2775, gid=100)
        .file("late/after", b"", gid=0)
        .file("late/same", b"", gid=100)
        .dir("s", mode=0o2770, gid=200)
        .file("s/root-group", b"", gid=0)
        .bytes()
    )
    apply(root, data)
    assert os.lstat(root / "late/before").st_gid == 0
    assert os.lstat(root / "late/after").st_gid == 0
    assert os.lstat(root / "late/same").st_gid == 100
    assert os.lstat(root / "s/root-group").st_gid == 0


def test_subsecond_mtimes_and_directory_times_after_children(root: Path) -> None:
    data = (
        Layer()
        .dir("a", pax={"mtime": "1700000000.123456789"})
        .file("a/f", b"x", pax={"mtime": "1600000000.5", "atime": "1500000000.25"})
        .symlink("a/s", "f", pax={"mtime": "1650000000.000000001"})
        .file("a/g", b"y", mtime=1_400_000_000)
        .bytes()
    )
    apply(root, data)
    # "a" got children after its entry: its time is set after the last entry.
    assert os.lstat(root / "a").st_mtime_ns == NS
    f = os.lstat(root / "a/f")
    assert f.st_mtime_ns == 1_600_000_000_500_000_000
    assert f.st_atime_ns == 1_500_000_000_250_000_000
    assert os.lstat(root / "a/s").st_mtime_ns == 1_650_000_000_000_000_001
    assert os.lstat(root / "a/g").st_mtime_ns == 1_400_000_000_000_000_000


def test_negative_mtime(root: Path) -> None:
    apply(root, Layer().file("old", b"", pax={"mtime": "-1.5"}).bytes())
    assert os.lstat(root / "old").st_mtime_ns == -1_500_000_000


@pytest.mark.parametrize("length", [101, 256, 1000])
@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_names_and_links(root: Path, length: int, fmt: int) -> None:
    parts = []
    while len("/".join(parts)) < length:
        parts.append(f"dir{len(parts):03d}" + "x" * 40)
    name = "/".join(parts)[:length].rstrip("/")
    target = "/".join(reversed(parts))[:length]
    data = (
        Layer(fmt)
        .file(name, b"long")
        .symlink("link", target)
        .hardlink("hard/" + name, name)
        .bytes()
    )
    apply(root, data)
    assert (root / name).read_bytes() == b"long"
    assert os.readlink(root / "link") == target
    assert os.lstat(root / "hard" / name).st_ino == os.lstat(root / name).st_ino


def test_ustar_prefix_field(root: Path) -> None:
    prefix = b"p" * 150
    apply(root, tar(member(b"n" * 100, b"data", prefix=prefix)))
    assert (root / os.fsdecode(prefix) / ("n" * 100)).read_bytes() == b"data"


def test_gnu_long_name_and_link_headers(root: Path) -> None:
    name = b"g/" + b"n" * 200 + b"/" + b"m" * 100
    link = b"t" * 300
    apply(
        root,
        tar(
            gnu_long(b"L", name),
            member(b"truncated", b"gnu", magic=b"ustar  \x00"),
            gnu_long(b"L", b"sym"),
            gnu_long(b"K", link),
            member(b"x", b"", b"2", linkname=b"short", magic=b"ustar  \x00"),
        ),
    )
    assert (root / os.fsdecode(name)).read_bytes() == b"gnu"
    assert os.readlink(root / "sym") == os.fsdecode(link)


def test_base256_numeric_fields(root: Path) -> None:
    # GNU base-256: top bit set, big-endian; here a uid of 2**40 in an 8-byte field.
    block = bytearray(header(b"f", size=3))
    block[124:136] = b"\x80" + (3).to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    entries = list(TarReader(io.BytesIO(bytes(block) + b"abc".ljust(512, b"\0") + END), Limits()))
    assert [(e.name, e.size) for e in entries] == [(b"f", 3)]


@pytest.mark.root
def test_xattrs_binary_capability_and_non_utf8_names(root: Path) -> None:
    binary = bytes(range(256))
    data = tar(
        pax(
            [
                (b"SCHILY.xattr.user.bin", binary),
                (b"SCHILY.xattr.user.\xff\xfe", b"odd"),
                (b"SCHILY.xattr.security.capability", CAPABILITY),
                (b"SCHILY.xattr.trusted.kept", b"t"),
                (b"SCHILY.xattr.user.empty", b""),
            ]
        ),
        member(b"bin/ping", b"\x7fELF", mode=0o755, uid=1, gid=1),
        pax([(b"SCHILY.xattr.user.dir", b"d")]),
        member(b"dir", b"", b"5", mode=0o755),
        pax([(b"SCHILY.xattr.security.selinux", b"system_u:object_r:bin_t:s0\x00")]),
        member(b"sym", b"", b"2", linkname=b"bin/ping"),
    )
    apply(root, data)
    got = _xattrs.read_xattrs(str(root / "bin/ping"))
    # chown ran before the capability was set, or the kernel would have dropped it.
    assert got[b"security.capability"] == CAPABILITY
    assert got[b"user.bin"] == binary
    assert got[b"user.\xff\xfe"] == b"odd"
    assert got[b"user.empty"] == b""
    assert got[b"trusted.kept"] == b"t"
    assert _xattrs.read_xattrs(str(root / "dir")) == {b"user.dir": b"d"}
    assert _xattrs.get_xattr(str(root / "sym"), b"security.selinux") is not None


@pytest.mark.parametrize("mode", [WhiteoutMode.DELETE, WhiteoutMode.OVERLAY])
@pytest.mark.parametrize("name", [b"trusted.overlay.redirect", b"user.overlay.opaque"])
def test_overlay_xattrs_are_refused(root: Path, mode: WhiteoutMode, name: bytes) -> None:
    # A forged redirect or opaque flag would let a layer alias or hide other layers' files.
    data = tar(pax([(b"SCHILY.xattr." + name, b"y")]), member(b"d", b"", b"5", mode=0o755))
    with pytest.raises(InvalidArgument, match=r"layer tar entry 'd': xattr '.*overlay\.") as caught:
        apply(root, data, whiteouts=mode)
    assert name.decode() in str(caught.value)
    assert not (root / "d").exists()


@pytest.mark.root
def test_overlay_mode_keeps_other_trusted_xattrs(root: Path) -> None:
    data = tar(
        pax([(b"SCHILY.xattr.trusted.x", b"1")]),
        member(b"d", b"", b"5", mode=0o755),
        pax([(b"SCHILY.xattr.user.ok", b"1")]),
        member(b"f", b"x"),
    )
    apply(root, data, whiteouts=WhiteoutMode.OVERLAY)
    assert _xattrs.read_xattrs(str(root / "d")) == {b"trusted.x": b"1"}
    assert _xattrs.read_xattrs(str(root / "f")) == {b"user.ok": b"1"}


def _gnu_tar(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(["tar", *args], check=True, cwd=cwd)


@pytest.mark.parametrize(
    "options",
    [
        ["--format=gnu"],
        ["--format=posix", "--sparse-version=0.0"],
        ["--format=posix", "--sparse-version=0.1"],
        ["--format=posix", "--sparse-version=1.0"],
    ],
    ids=["gnu", "pax-0.0", "pax-0.1", "pax-1.0"],
)
def test_sparse_files_from_gnu_tar_keep_their_holes(
    tmp_path: Path, root: Path, options: list[str]
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    size = 64 << 20
    with open(source / "sparse", "wb") as f:
        f.truncate(size)
        for offset in (0, 10 << 20, 33 << 20, size - 5):
            f.seek(offset)
            f.write(b"data" + bytes([offset % 251]))
    with open(source / "many", "wb") as f:  # more segments than an old-GNU header holds
        f.truncate(8 << 20)
        for i in range(40):
            f.seek(i * (200 << 10))
            f.write(b"segment %d" % i)
    _gnu_tar("--sparse", *options, "-cf", str(tmp_path / "s.tar"), "-C", str(source), ".")
    with open(tmp_path / "s.tar", "rb") as f:
        entries = {e.name: e.sparse for e in TarReader(f, Limits())}
    assert entries[b"./sparse"] is not None
    with open(tmp_path / "s.tar", "rb") as f:
        apply_tar(root, f)  # type: ignore[arg-type]
    for name in ("sparse", "many"):
        got = os.lstat(root / name)
        want = os.lstat(source / name)
        assert got.st_size == want.st_size
        assert got.st_blocks * 512 < 1 << 20, f"{name} lost its holes"
        assert _sha(root / name) == _sha(source / name)


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_large_file_streams_in_chunks(root: Path) -> None:
    size = (3 << 20) + 17
    content = os.urandom(size)
    result = apply(root, Layer().file("big", content).bytes())
    assert (root / "big").read_bytes() == content
    assert result.entries == 1


# --- applying changesets ----------------------------------------------------------------------


def _lower(root: Path) -> None:
    (root / "a/d").mkdir(parents=True)
    (root / "a/x").write_bytes(b"x")
    (root / "a/y").write_bytes(b"y")
    (root / "a/d/z").write_bytes(b"z")
    (root / "keep").write_bytes(b"keep")


def test_existing_directory_keeps_its_content_and_takes_the_attributes(root: Path) -> None:
    _lower(root)
    apply(root, Layer().dir("a", mode=0o700, pax={"mtime": "1.5"}).file("a/new", b"n").bytes())
    assert sorted(os.listdir(root / "a")) == ["d", "new", "x", "y"]
    a = os.lstat(root / "a")
    assert stat.S_IMODE(a.st_mode) == 0o700 and a.st_mtime_ns == 1_500_000_000


@pytest.mark.parametrize(
    ("lower", "entry"),
    [
        ("file", "dir"),
        ("file", "symlink"),
        ("dir", "file"),
        ("dir", "symlink"),
        ("symlink", "file"),
        ("symlink", "dir"),
        ("file", "file"),
        ("symlink", "symlink"),
    ],
)
def test_replace_one_type_with_another(root: Path, resolution: str, lower: str, entry: str) -> None:
    (root / "other").mkdir()
    (root / "other/kept").write_bytes(b"kept")
    path = root / "p"
    if lower == "file":
        path.write_bytes(b"old")
    elif lower == "dir":
        path.mkdir()
        (path / "child").mkdir()
        (path / "child/deep").write_bytes(b"deep")
    else:
        path.symlink_to("other")
    layer = Layer()
    if entry == "file":
        layer.file("p", b"new")
    elif entry == "dir":
        layer.dir("p", mode=0o711).file("p/inside", b"i")
    else:
        layer.symlink("p", "elsewhere")
    apply(root, layer.bytes())
    st = os.lstat(path)
    if entry == "file":
        assert stat.S_ISREG(st.st_mode) and path.read_bytes() == b"new"
    elif entry == "dir":
        assert stat.S_ISDIR(st.st_mode) and os.listdir(path) == ["inside"]
    else:
        assert os.readlink(path) == "elsewhere"
    # Replacing a symlink never touches what it pointed to.
    assert listing(root / "other") == ["kept"]


def test_cached_directory_replaced_by_a_symlink(root: Path, resolution: str) -> None:
    """The dir-fd cache must not keep writing into a directory an entry replaced."""
    data = Layer().file("d/a").symlink("d", "e").dir("e").file("d/b", b"b").bytes()
    apply(root, data)
    assert os.readlink(root / "d") == "e"
    assert listing(root / "e") == ["b"]


def test_cached_directory_removed_by_a_whiteout(root: Path, resolution: str) -> None:
    (root / "x").mkdir()
    (root / "x/old").write_bytes(b"old")
    apply(root, Layer().file("x/a").file("y/.wh.x").file(".wh.x").file("x/b", b"b").bytes())
    assert listing(root) == ["x", "x/b"]


def test_missing_parents_are_made_through_a_dangling_symlink(root: Path, resolution: str) -> None:
    """Like containerd's RootPath: a dangling link in the path is followed inside the root."""
    apply(root, Layer().symlink("l", "/made/here").file("l/f", b"f").bytes())
    assert (root / "made/here/f").read_bytes() == b"f"
    assert os.readlink(root / "l") == "/made/here"


def test_parent_that_is_a_file_is_refused(root: Path, resolution: str) -> None:
    with pytest.raises(InvalidArgument, match=r"layer tar entry 'f/x': .*not a directory"):
        apply(root, Layer().file("f").file("f/x").bytes())


def test_hardlink_replaced_file_does_not_change_its_partner(root: Path) -> None:
    (root / "a").write_bytes(b"shared")
    os.link(root / "a", root / "b")
    apply(root, Layer().file("a", b"new").bytes())
    assert (root / "b").read_bytes() == b"shared"
    assert (root / "a").read_bytes() == b"new"


def test_duplicate_entries_later_wins(root: Path) -> None:
    data = Layer().file("f", b"first").file("f", b"second").dir("d").file("d", b"file").bytes()
    result = apply(root, data)
    assert (root / "f").read_bytes() == b"second"
    assert (root / "d").read_bytes() == b"file"
    assert result.entries == 4


def test_root_entry_is_ignored(root: Path) -> None:
    os.chmod(root, 0o711)
    apply(root, Layer().dir(".", mode=0o700).dir("./", mode=0o700).file("./f", b"f").bytes())
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o711
    assert (root / "f").read_bytes() == b"f"


def test_hardlinks(root: Path, resolution: str) -> None:
    (root / "lower").write_bytes(b"lower")
    data = (
        Layer()
        .file("f", b"f")
        .hardlink("to-new", "f")
        .hardlink("sub/to-lower", "/lower")
        .symlink("sym", "/etc/passwd")
        .hardlink("to-sym", "sym")
        .bytes()
    )
    apply(root, data)
    assert os.lstat(root / "to-new").st_ino == os.lstat(root / "f").st_ino
    assert os.lstat(root / "sub/to-lower").st_ino == os.lstat(root / "lower").st_ino
    # A link to a symlink is a second name of the symlink, not of what it points to.
    assert os.lstat(root / "to-sym").st_ino == os.lstat(root / "sym").st_ino
    assert os.readlink(root / "to-sym") == "/etc/passwd"


@pytest.mark.parametrize(
    ("target", "message"),
    [("missing", "does not exist"), ("d", "is a directory"), ("self", "itself")],
)
def test_bad_hardlinks_are_refused(root: Path, target: str, message: str) -> None:
    data = Layer().dir("d").hardlink("self", target).bytes()
    with pytest.raises(InvalidArgument, match=f"layer tar entry 'self': .*{message}"):
        apply(root, data)


# --- whiteouts ------------------------------------------------------------------------------


def test_whiteout_deletes_lower_path(root: Path, resolution: str) -> None:
    _lower(root)
    apply(root, Layer().file("a/.wh.x").file("a/.wh.d").file(".wh.missing").bytes())
    assert listing(root) == ["a", "a/y", "keep"]


def test_whiteout_in_missing_directory_creates_nothing(root: Path) -> None:
    apply(root, Layer().file("no/such/.wh.x").bytes())
    assert listing(root) == []


def test_whiteout_spares_what_this_layer_created(root: Path) -> None:
    _lower(root)
    apply(root, Layer().file("a/x", b"new").file("a/.wh.x").file("n/f").file("n/.wh.f").bytes())
    assert (root / "a/x").read_bytes() == b"new"
    assert (root / "n/f").exists()


@pytest.mark.parametrize("position", ["first", "last"])
def test_opaque_directory_in_delete_mode(root: Path, resolution: str, position: str) -> None:
    _lower(root)
    (root / "a/d/below").mkdir()
    (root / "a/d/below/old").write_bytes(b"old")
    layer = Layer()
    if position == "first":
        layer.file("a/.wh..wh..opq")
    layer.file("a/new", b"n").dir("a/d").file("a/d/n2", b"n2").dir("a/fresh").file("a/fresh/f")
    if position == "last":
        layer.file("a/.wh..wh..opq")
    apply(root, layer.bytes())
    # Lower children are gone whatever the marker's place; this layer's entries stay, and
    # a directory both layers have keeps only this layer's children.
    assert listing(root / "a") == ["d", "d/n2", "fresh", "fresh/f", "new"]
    assert (root / "keep").exists()


def test_opaque_marker_through_a_symlinked_path(root: Path) -> None:
    _lower(root)
    (root / "alias").symlink_to("a")
    apply(root, Layer().file("a/new", b"n").file("alias/.wh..wh..opq").bytes())
    assert listing(root / "a") == ["new"]


def _whiteout(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))


def _is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    """A lower dir of an overlay: a/gone, o/old, implied/x, mine, x/child, y/w."""
    path = tmp_path / "lower"
    for directory in ("a", "o", "implied", "x", "y"):
        (path / directory).mkdir(parents=True)
    for name in ("a/gone", "o/old", "implied/x", "mine", "x/child", "y/w"):
        (path / name).write_bytes(b"lower")
    return path


@pytest.mark.root
def test_whiteouts_in_overlay_mode(root: Path, lower: Path, resolution: str) -> None:
    data = (
        Layer()
        .file("a/.wh.gone", uid=1000, gid=1000)
        .dir("o", mode=0o750)
        .file("o/new", b"n")
        .file("o/.wh..wh..opq")
        .file("implied/.wh..wh..opq")
        .file("mine", b"mine")
        .file(".wh.mine")
        .bytes()
    )
    apply(root, data, whiteouts=WhiteoutMode.OVERLAY, parent_roots=[lower])
    gone = os.lstat(root / "a/gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert (gone.st_uid, gone.st_gid) == (1000, 1000)
    assert os.getxattr(root / "o", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(root / "implied", "trusted.overlay.opaque") == b"y"
    assert (root / "o/new").read_bytes() == b"n"
    assert (root / "mine").read_bytes() == b"mine"
    assert not any(name.startswith(".wh.") for name in listing(root))


@pytest.mark.root
def test_overlay_whiteouts_only_where_the_lowers_show_the_name(
    tmp_path: Path, root: Path, lower: Path
) -> None:
    # overlayfs lists a whiteout in a directory with no lower as an entry nobody can open,
    # so a whiteout of what no lower shows is not written, nor are its parents.
    upper_lower = tmp_path / "upper-lower"
    _whiteout(upper_lower / "mine")
    (upper_lower / "x").mkdir()
    os.setxattr(upper_lower / "x", "trusted.overlay.opaque", b"y")
    data = (
        Layer()
        .file(".wh.never")
        .file("no/such/.wh.dir")
        .file(".wh.mine")  # hidden already by the nearer lower's whiteout
        .file("x/.wh.child")  # hidden already by the nearer lower's opaque x
        .file("x/.wh..wh..opq")  # x is a directory there: it is made here, opaque
        .file("a/.wh..wh..opq")
        .file("mine/.wh..wh..opq")  # not a directory over there: nothing to do
        .bytes()
    )
    apply(root, data, whiteouts=WhiteoutMode.OVERLAY, parent_roots=[upper_lower, lower])
    assert listing(root) == ["a", "x"]
    assert os.getxattr(root / "a", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(root / "x", "trusted.overlay.opaque") == b"y"


@pytest.mark.root
def test_overlay_opaque_marker_at_the_root_whites_out_every_lower_name(
    root: Path, lower: Path
) -> None:
    # overlayfs ignores the opaque flag on a layer's root.
    data = Layer().dir("x").file("x/new", b"n").file("fresh", b"f").file(".wh..wh..opq").bytes()
    apply(root, data, whiteouts=WhiteoutMode.OVERLAY, parent_roots=[lower])
    assert listing(root) == ["a", "fresh", "implied", "mine", "o", "x", "x/new", "y"]
    for name in ("a", "implied", "mine", "o", "y"):
        assert _is_whiteout(root / name), name
    assert os.getxattr(root / "x", "trusted.overlay.opaque") == b"y"
    assert _xattrs.get_xattr(str(root), b"trusted.overlay.opaque") is None


@pytest.mark.root
def test_overlay_directory_made_over_a_whiteout_is_opaque(
    root: Path, lower: Path, resolution: str
) -> None:
    data = (
        Layer()
        .file(".wh.x")
        .dir("x", mode=0o700)
        .file("x/new", b"n")
        .file(".wh.y")
        .file("y/z", b"z")  # no "y/" entry: made through the whiteout
        .bytes()
    )
    apply(root, data, whiteouts=WhiteoutMode.OVERLAY, parent_roots=[lower])
    assert listing(root) == ["x", "x/new", "y", "y/z"]
    for name, mode in (("x", 0o700), ("y", 0o755)):
        assert os.getxattr(root / name, "trusted.overlay.opaque") == b"y", name
        assert stat.S_IMODE(os.lstat(root / name).st_mode) == mode, name


@pytest.mark.root
def test_overlay_opaque_flags_only_over_lower_directories(root: Path, lower: Path) -> None:
    # A flag with nothing beneath it would be a stray xattr, visible where a layer is a bind.
    data = (
        Layer()
        .dir("new")
        .file("new/.wh..wh..opq")  # no lower "new"
        .file("mine")
        .dir("mine")  # over a file of this layer, the lower "mine" being a file too
        .file("a/.wh..wh..opq")  # a lower directory: flagged
        .file(".wh..wh..opq")
        .bytes()
    )
    apply(root, data, whiteouts=WhiteoutMode.OVERLAY, parent_roots=[lower])
    for name in ("new", "mine"):
        assert _xattrs.read_xattrs(str(root / name)) == {}, name
    assert os.getxattr(root / "a", "trusted.overlay.opaque") == b"y"
    base = root.parent / "base"
    base.mkdir()
    apply(base, data, whiteouts=WhiteoutMode.OVERLAY)  # a base layer: no lowers at all
    assert all(_xattrs.read_xattrs(str(path)) == {} for path in [base, *base.rglob("*")])
    assert listing(base) == ["mine", "new"]


@pytest.mark.root
def test_overlay_hardlink_to_a_lower_file_copies_it_up(tmp_path: Path, root: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "usr/bin").mkdir(parents=True)
    python = lower / "usr/bin/python3.11"
    python.write_bytes(b"interpreter")
    os.chown(python, 3, 4)
    os.chmod(python, 0o755)
    os.setxattr(python, "user.k", b"v")
    os.utime(python, ns=(NS, NS))
    (lower / "usr/bin/sh").symlink_to("dash")
    data = (
        Layer()
        .hardlink("usr/bin/python3", "usr/bin/python3.11")
        .hardlink("usr/bin/sh-link", "usr/bin/sh")
        .bytes()
    )
    apply(root, data, whiteouts=WhiteoutMode.OVERLAY, parent_roots=[lower])
    copy = os.lstat(root / "usr/bin/python3.11")
    want = os.lstat(python)
    assert os.path.samefile(root / "usr/bin/python3", root / "usr/bin/python3.11")
    assert (root / "usr/bin/python3").read_bytes() == b"interpreter"
    assert (copy.st_mode, copy.st_uid, copy.st_gid, copy.st_mtime_ns) == (
        want.st_mode,
        want.st_uid,
        want.st_gid,
        want.st_mtime_ns,
    )
    assert _xattrs.read_xattrs(str(root / "usr/bin/python3")) == {b"user.k": b"v"}
    assert os.readlink(root / "usr/bin/sh-link") == "dash"
    assert os.lstat(root / "usr/bin/sh").st_ino == os.lstat(root / "usr/bin/sh-link").st_ino


@pytest.mark.root
def test_overlay_hardlink_to_a_path_this_layer_deleted_is_refused(root: Path, lower: Path) -> None:
    data = Layer().file(".wh.mine").hardlink("link", "mine").bytes()
    with pytest.raises(InvalidArgument, match="hard link target 'mine' does not exist"):
        apply(root, data, whiteouts=WhiteoutMode.OVERLAY, parent_roots=[lower])


@pytest.mark.root
def test_overlay_mode_refuses_a_0_0_character_device(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="would read it as a whiteout"):
        apply(root, Layer().char("dev/zero-zero", 0, 0).bytes(), whiteouts=WhiteoutMode.OVERLAY)


@pytest.mark.root
def test_userxattr_marks_and_reads_opaque_directories_with_user_xattrs(
    tmp_path: Path, root: Path, lower: Path
) -> None:
    upper_lower = tmp_path / "upper-lower"
    (upper_lower / "o").mkdir(parents=True)
    os.setxattr(upper_lower / "o", "user.overlay.opaque", b"y")
    data = Layer().file("o/.wh.old").file("a/.wh..wh..opq").bytes()
    apply(
        root,
        data,
        whiteouts=WhiteoutMode.OVERLAY,
        parent_roots=[upper_lower, lower],
        userxattr=True,
    )
    assert listing(root) == ["a"]
    assert os.getxattr(root / "a", "user.overlay.opaque") == b"y"
    assert _xattrs.get_xattr(str(root / "a"), b"trusted.overlay.opaque") is None


@pytest.mark.root
def test_overlay_parents_take_attributes_from_the_lower_tree(tmp_path: Path, root: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "usr/lib").mkdir(parents=True)
    os.chmod(lower / "usr/lib", 0o750)
    os.chown(lower / "usr/lib", 3, 4)
    os.setxattr(lower / "usr/lib", "user.lower", b"1")
    os.setxattr(lower / "usr/lib", "trusted.overlay.opaque", b"y")
    os.utime(lower / "usr/lib", ns=(NS, NS))
    apply(
        root,
        Layer().file("usr/lib/new", b"n").bytes(),
        whiteouts=WhiteoutMode.OVERLAY,
        parent_roots=[lower],
    )
    st = os.lstat(root / "usr/lib")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 3, 4)
    assert st.st_mtime_ns == NS
    assert _xattrs.read_xattrs(str(root / "usr/lib")) == {b"user.lower": b"1"}


@pytest.mark.parametrize(
    "name", [".wh.", "a/.wh.", ".wh..wh.foo", "a/.wh..wh..opq2", ".wh..", "a/.wh..."]
)
def test_invalid_whiteouts_are_refused(root: Path, name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid whiteout name"):
        apply(root, Layer().file(name).bytes())


# --- hostile tars -----------------------------------------------------------------------------


class Jail:
    """A root with a sentinel directory beside it that a hostile tar must not reach."""

    def __init__(self, tmp_path: Path) -> None:
        self.base = tmp_path
        self.root = tmp_path / "root"
        self.outside = tmp_path / "outside"
        self.root.mkdir()
        self.outside.mkdir()
        (self.outside / "file").write_bytes(b"sentinel")
        (self.outside / "dir").mkdir()
        (self.outside / "dir/inner").write_bytes(b"inner")
        os.chmod(self.outside, 0o755)
        self.before = self._state()

    def _state(self) -> dict[str, tuple[int, int, int, int, bytes]]:
        state = {}
        for path in [self.outside, *sorted(self.outside.rglob("*"))]:
            st = os.lstat(path)
            content = path.read_bytes() if path.is_file() else b""
            state[str(path)] = (st.st_mode, st.st_uid, st.st_nlink, st.st_mtime_ns, content)
        return state

    def check(self) -> None:
        assert self._state() == self.before, "the sentinel next to the root changed"
        assert sorted(os.listdir(self.base)) == ["outside", "root"], "a file appeared outside"


@pytest.fixture
def jail(tmp_path: Path) -> Iterator[Jail]:
    jail = Jail(tmp_path)
    yield jail
    jail.check()


# Each case: a tar built from the jail's paths, and "error" (InvalidArgument) or "contained"
# (applies, inside the root).
Hostile = Callable[[Jail], bytes]


def _out(jail: Jail) -> str:
    return str(jail.outside)


HOSTILE: dict[str, tuple[Hostile, str]] = {
    "symlink-absolute-then-write": (
        lambda j: Layer().symlink("l", _out(j)).file("l/evil", b"x").bytes(),
        "contained",
    ),
    "symlink-up-and-out-then-write": (
        lambda j: Layer().symlink("l", "../../../../../../" + _out(j)).file("l/evil").bytes(),
        "contained",
    ),
    "symlink-relative-parent-then-write": (
        lambda j: Layer().symlink("l", "..").file("l/outside/file", b"evil").bytes(),
        "contained",
    ),
    "symlink-multiple-hops": (
        lambda j: (
            Layer()
            .symlink("a", "b/../..")
            .dir("b")
            .symlink("b/c", "../a/..")
            .file("b/c/outside/file", b"evil")
            .bytes()
        ),
        "contained",
    ),
    "symlink-to-file-then-overwrite": (
        lambda j: Layer().symlink("l", _out(j) + "/file").file("l", b"evil").bytes(),
        "contained",
    ),
    "symlink-to-dir-then-mkdir-through": (
        lambda j: Layer().symlink("l", _out(j)).dir("l/dir", mode=0o777).bytes(),
        "contained",
    ),
    "directory-over-symlink": (
        lambda j: Layer().symlink("d", _out(j)).dir("d", mode=0o777, uid=12).bytes(),
        "contained",
    ),
    "directory-over-symlink-and-hardlink": (
        lambda j: (
            Layer().symlink("d", _out(j)).dir("d", mode=0o777).hardlink("d/file", "d").bytes()
        ),
        "error",
    ),
    "symlink-over-directory": (
        lambda j: Layer().dir("d").symlink("d", _out(j)).file("d/file", b"evil").bytes(),
        "contained",
    ),
    "symlink-loop": (
        lambda j: Layer().symlink("a", "b").symlink("b", "a").file("a/x").bytes(),
        "error",
    ),
    "hardlink-relative": (
        lambda j: Layer().hardlink("h", "../outside/file").bytes(),
        "error",
    ),
    "hardlink-absolute": (
        lambda j: Layer().hardlink("h", _out(j) + "/file").bytes(),
        "error",
    ),
    "hardlink-down-and-out": (
        lambda j: Layer().dir("d").hardlink("h", "d/../../outside/file").bytes(),
        "error",
    ),
    "hardlink-through-symlink-parent": (
        lambda j: Layer().symlink("l", _out(j)).hardlink("h", "l/file").bytes(),
        "error",
    ),
    "hardlink-through-relative-symlink": (
        lambda j: Layer().symlink("l", "../outside").hardlink("h", "l/file").bytes(),
        "error",
    ),
    "hardlink-to-escaping-symlink-then-write": (
        lambda j: (
            Layer()
            .symlink("s", _out(j) + "/file")
            .hardlink("h", "s")
            .file("h", b"evil", mode=0o777)
            .bytes()
        ),
        "contained",
    ),
    "hardlink-to-symlink-then-chmod": (
        lambda j: Layer().symlink("s", _out(j)).hardlink("h", "s", mode=0o777).bytes(),
        "contained",
    ),
    "absolute-entry-name": (
        lambda j: Layer().file(_out(j) + "/file", b"evil").bytes(),
        "contained",
    ),
    "dotdot-entry-name": (
        lambda j: Layer().file("../outside/file", b"evil").file("a/../../x", b"x").bytes(),
        "contained",
    ),
    "whiteout-dotdot-name": (lambda j: Layer().file("../.wh.outside").bytes(), "contained"),
    "whiteout-dotdot-path": (lambda j: Layer().file("../outside/.wh.file").bytes(), "contained"),
    "whiteout-of-dotdot": (lambda j: Layer().file("a/.wh..").bytes(), "error"),
    "whiteout-through-symlink-parent": (
        lambda j: Layer().symlink("l", _out(j)).file("l/.wh.file").file("l/.wh.dir").bytes(),
        "contained",
    ),
    "whiteout-through-relative-symlink": (
        lambda j: Layer().symlink("l", "..").file("l/.wh.outside").bytes(),
        "contained",
    ),
    "whiteout-of-escaping-symlink-target": (
        lambda j: Layer().symlink("l", _out(j) + "/file").file(".wh.l").bytes(),
        "contained",
    ),
    "opaque-through-symlink": (
        lambda j: Layer().symlink("l", _out(j)).file("l/.wh..wh..opq").bytes(),
        "contained",
    ),
    "bare-whiteout": (lambda j: Layer().file("d/.wh.").bytes(), "error"),
    "symlink-empty-target": (lambda j: Layer().symlink("l", "").bytes(), "error"),
    "device-number-out-of-range": (
        lambda j: tar(member(b"dev", b"", b"3", devmajor=0o7777777, devminor=0)),
        "contained-or-error",
    ),
}


@pytest.mark.root
@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("mode", list(WhiteoutMode), ids=lambda m: m.value)
def test_hostile_tar_stays_inside_the_root(
    jail: Jail, resolution: str, case: str, mode: WhiteoutMode
) -> None:
    build, expected = HOSTILE[case]
    data = build(jail)
    if expected == "error":
        with pytest.raises(InvalidArgument):
            apply(jail.root, data, whiteouts=mode)
    elif expected == "contained":
        apply(jail.root, data, whiteouts=mode)
    else:
        with contextlib.suppress(InvalidArgument):
            apply(jail.root, data, whiteouts=mode)
    # The fixture checks the sentinel; nothing may have been created in the real filesystem.
    assert not (Path(_out(jail)) / "evil").exists()
    assert not (jail.base / "x").exists()


def test_symlink_written_verbatim_and_write_through_it_lands_inside(jail: Jail) -> None:
    apply(jail.root, HOSTILE["symlink-absolute-then-write"][0](jail))
    assert os.readlink(jail.root / "l") == _out(jail)
    inside = jail.root / _out(jail).lstrip("/") / "evil"
    assert inside.read_bytes() == b"x"


def test_whiteout_dotdot_name_removes_only_inside(jail: Jail) -> None:
    (jail.root / "outside").mkdir()
    (jail.root / "outside/file").write_bytes(b"inside copy")
    apply(jail.root, HOSTILE["whiteout-dotdot-name"][0](jail))
    assert not (jail.root / "outside").exists()


# --- limits and malformed tars ----------------------------------------------------------------


class HugeStream(io.RawIOBase):
    """A stream whose first block is ``head``; then it would produce zeros up to ``size``."""

    def __init__(self, head: bytes, size: int) -> None:
        self._head = head
        self._left = size
        self.served = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._head:
            data, self._head = self._head[:n], self._head[n:]
        else:
            data = bytes(min(n, self._left, 1 << 20))
            self._left -= len(data)
        self.served += len(data)
        return data


@pytest.mark.parametrize("kind", [b"x", b"g", b"L", b"K"])
def test_header_size_bomb_fails_before_reading_it(root: Path, kind: bytes) -> None:
    stream = HugeStream(header(b"bomb", kind, size=1 << 30), 1 << 30)
    started = time.monotonic()
    with pytest.raises(LimitExceeded, match="max_header_bytes"):
        apply_tar(root, stream)  # type: ignore[arg-type]
    assert stream.served <= 2 << 20, "the header was read before its size was checked"
    assert time.monotonic() - started < 5


def test_many_small_extension_headers_are_bounded_together(root: Path) -> None:
    one = pax([(b"comment", b"c" * 1000)])
    data = one * 64 + member(b"f") + END
    with pytest.raises(LimitExceeded, match="extension headers of one entry"):
        apply(root, data, limits=Limits(max_header_bytes=32 << 10))


def test_too_many_entries(root: Path) -> None:
    layer = Layer()
    for i in range(11):
        layer.file(f"f{i}")
    with pytest.raises(LimitExceeded, match="max_entries"):
        apply(root, layer.bytes(), limits=Limits(max_entries=10))


def test_too_deep_path(root: Path) -> None:
    apply(root, Layer().file("a/b/c/d").bytes(), limits=Limits(max_path_depth=4))
    with pytest.raises(LimitExceeded, match="max_path_depth"):
        apply(root, Layer().file("a/b/c/d/e").bytes(), limits=Limits(max_path_depth=4))


def test_too_long_path_and_link(root: Path) -> None:
    limits = Limits(max_path_bytes=200)
    with pytest.raises(LimitExceeded, match="max_path_bytes"):
        apply(root, Layer().file("p" * 201).bytes(), limits=limits)
    with pytest.raises(LimitExceeded, match="max_path_bytes"):
        apply(root, Layer().symlink("l", "t" * 201).bytes(), limits=limits)


def test_too_large_xattr(root: Path) -> None:
    data = tar(pax([(b"SCHILY.xattr.user.big", b"v" * 101)]), member(b"f"))
    with pytest.raises(LimitExceeded, match="max_xattr_bytes"):
        apply(root, data, limits=Limits(max_xattr_bytes=100))


def test_too_many_bytes(root: Path) -> None:
    data = Layer().file("f", bytes(10_000)).bytes()
    with pytest.raises(LimitExceeded, match="max_bytes"):
        apply(root, data, limits=Limits(max_bytes=8192))


def test_sparse_apparent_size_is_bounded(root: Path) -> None:
    records = [
        (b"GNU.sparse.major", b"1"),
        (b"GNU.sparse.minor", b"0"),
        (b"GNU.sparse.name", b"holes"),
        (b"GNU.sparse.realsize", b"%d" % (1 << 50)),
    ]
    data = tar(pax(records), member(b"x", b"1\n0\n0\n".ljust(512, b"\0")))
    with pytest.raises(LimitExceeded, match="apparent size"):
        apply(root, data, limits=Limits(max_bytes=1 << 30))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (Layer().file("f", b"x" * 2000).bytes()[:1536], "truncated entry data"),
        (header(b"f")[:300], "truncated header"),
        (header(b"f")[:148] + b"0000000\x00" + header(b"f")[156:] + END, "checksum"),
        (b"garbage!" * 64 + END, "checksum"),
        (bytes(512) + header(b"f") + END, "zero block in front of a header"),
        (tar(member(b"PaxHeaders/x", b"5 a=b\n", b"x"), member(b"f")), "PAX record"),
        (tar(member(b"PaxHeaders/x", b"9 nokey\n", b"x"), member(b"f")), "PAX record"),
        (tar(pax([(b"size", b"12x")]), member(b"f")), "PAX size"),
        (tar(pax([(b"mtime", b"1.x")]), member(b"f")), "PAX mtime"),
        (tar(pax([(b"path", b"f")])), "without an entry"),
        (tar(member(b"f", size_field=b"0000000008x\x00")), "malformed size field"),
        (tar(member(b"vol", b"", b"V")), "unsupported entry type 'V'"),
        (tar(pax([(b"path", b"a\x00b")]), member(b"f")), "NUL"),
    ],
    ids=[
        "truncated-data",
        "truncated-header",
        "bad-checksum",
        "garbage",
        "zero-block-then-header",
        "pax-bad-length",
        "pax-no-keyword",
        "pax-bad-size",
        "pax-bad-mtime",
        "pax-without-entry",
        "bad-octal",
        "unknown-type",
        "nul-in-path",
    ],
)
def test_malformed_tars_are_refused(root: Path, data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        apply(root, data)
    assert "layer tar" in str(info.value)


def test_error_names_the_entry_number_and_name(root: Path) -> None:
    data = Layer().file("ok").file("bad", b"x" * 600).bytes()[:1700]
    with pytest.raises(InvalidArgument, match=r"layer tar: truncated entry data, at entry 2 'bad'"):
        apply(root, data)


def test_reads_to_the_end_of_the_stream(root: Path) -> None:
    data = Layer().file("f", b"x").bytes() + b"trailing bytes after the archive"
    result = apply(root, data)
    assert result.size == len(data)


@pytest.mark.parametrize("ending", [b"", bytes(512)], ids=["eof", "lone-zero-block"])
def test_lenient_endings_like_go_and_gnu_tar(root: Path, ending: bytes) -> None:
    data = member(b"f", b"x") + ending
    assert apply(root, data) == ApplyResult(len(data), 1)


def test_global_headers_are_ignored(root: Path) -> None:
    data = tar(pax([(b"uid", b"1234"), (b"comment", b"git")], b"g"), member(b"f", b"x"))
    apply(root, data)
    assert os.lstat(root / "f").st_uid == 0


def test_reader_yields_lazily_and_skips_unread_data() -> None:
    data = Layer().file("a", b"A" * 5000).file("b", b"B" * 10).bytes()
    entries = TarReader(io.BytesIO(data), Limits())
    first = entries.next()
    assert first is not None and first.name == b"a" and first.type == EntryType.REGULAR
    second = entries.next()
    assert second is not None
    assert b"".join(bytes(piece) for _, piece in second.chunks()) == b"B" * 10
    assert entries.next() is None
    assert entries.bytes_read == len(data)


# --- the diff writer and the round trip ---------------------------------------------------------


def _set_times(root: Path) -> None:
    for i, path in enumerate(sorted(root.rglob("*"), reverse=True)):
        if path.is_socket():
            continue
        os.utime(path, ns=(NS + i, NS + i * 1_000_001), follow_symlinks=False)


def _make_parent_tree(path: Path) -> None:
    (path / "etc").mkdir(parents=True)
    (path / "etc/passwd").write_bytes(b"root:x:0:0\n")
    (path / "etc/gone").write_bytes(b"gone")
    (path / "etc/keep").write_bytes(b"keep")
    (path / "old/sub").mkdir(parents=True)
    (path / "old/sub/f").write_bytes(b"f")
    (path / "f2d").write_bytes(b"file")
    (path / "d2f/child").mkdir(parents=True)
    (path / "l2f").symlink_to("etc")
    (path / "h1").write_bytes(b"linked")
    os.link(path / "h1", path / "h2")
    _set_times(path)


def _modify(path: Path) -> None:
    long = path / ("long-" + "n" * 120) / ("deeper-" + "m" * 150)
    long.mkdir(parents=True)
    (long / "file").write_bytes(b"long name")
    (path / "etc/passwd").write_bytes(b"root:x:0:0\nuser:x:1000:1000\n")
    (path / "etc/gone").unlink()
    shutil.rmtree(path / "old")
    (path / "f2d").unlink()
    (path / "f2d").mkdir()
    (path / "f2d/inside").write_bytes(b"i")
    shutil.rmtree(path / "d2f")
    (path / "d2f").write_bytes(b"now a file")
    (path / "l2f").unlink()
    (path / "l2f").write_bytes(b"was a link")
    (path / "bin").mkdir()
    (path / "bin/ping").write_bytes(b"\x7fELF ping")
    os.chmod(path / "bin/ping", 0o4755)
    os.setxattr(path / "bin/ping", "security.capability", CAPABILITY)
    (path / "bin/sgid").write_bytes(b"")
    os.chown(path / "bin/sgid", 1000, 50)
    os.chmod(path / "bin/sgid", 0o2711)
    (path / "tmp").mkdir(mode=0o700)
    os.chmod(path / "tmp", 0o1777)
    (path / "home").mkdir()
    os.chown(path / "home", 1000, 1000)
    (path / "home/data").write_bytes(os.urandom(3 << 20))
    os.setxattr(path / "home/data", b"user.\xff\xfe", bytes(range(256)))
    os.setxattr(path / "home/data", "user.plain", b"text")
    (path / "links").mkdir()
    (path / "links/a").write_bytes(b"same inode")
    os.link(path / "links/a", path / "links/b")
    os.link(path / "links/a", path / "links/c")
    (path / "links/abs").symlink_to("/etc/passwd")
    (path / "links/rel").symlink_to("../etc/keep")
    os.mkfifo(path / "fifo")
    os.mknod(path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(path / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    (path / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    os.chmod(path / "etc", 0o750)
    _set_times(path)


def _snapshot(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Everything a layer carries, per path (the root's own times aside)."""
    base = os.fsencode(root)
    result: dict[bytes, tuple[object, ...]] = {}
    inodes: dict[int, list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            if stat.S_ISSOCK(st.st_mode):
                continue
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = _sha(Path(os.fsdecode(full)))
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(full)
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
            xattrs = _xattrs.read_xattrs(os.fsdecode(full))
            result[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, rdev, content, xattrs)
    groups = sorted(sorted(names) for names in inodes.values() if len(names) > 1)
    result[b"<hardlink groups>"] = tuple(tuple(g) for g in groups)
    return result


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return archive.getmembers()


def _copy(source: Path, target: Path) -> None:
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)


def _diff(parent: Path | None, child: Path) -> bytes:
    out = io.BytesIO()
    write_changes_tar(child, naive_changes(parent, child), out)
    return out.getvalue()


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    parent = tmp_path / "parent"
    parent.mkdir()
    _make_parent_tree(parent)
    child = tmp_path / "child"
    _copy(parent, child)
    _modify(child)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(child / "socket"))
    listener.close()
    return parent, child


@pytest.mark.root
def test_round_trip_diff_then_apply_gives_the_same_tree(
    tmp_path: Path, trees: tuple[Path, Path], resolution: str
) -> None:
    parent, child = trees
    data = _diff(parent, child)
    target = tmp_path / "target"
    _copy(parent, target)
    result = apply(target, data)
    assert result.size == len(data)
    assert _snapshot(target) == _snapshot(child)
    names = [m.name for m in _members(data)]
    assert "etc/.wh.gone" in names and ".wh.old" in names and "socket" not in names


@pytest.mark.root
def test_round_trip_of_a_base_layer(tmp_path: Path, trees: tuple[Path, Path]) -> None:
    _, child = trees
    data = _diff(None, child)
    target = tmp_path / "target"
    target.mkdir()
    apply(target, data)
    assert _snapshot(target) == _snapshot(child)


@pytest.mark.root
def test_gnu_tar_extracts_our_diff_to_the_same_tree(
    tmp_path: Path, trees: tuple[Path, Path]
) -> None:
    _, child = trees
    (tmp_path / "diff.tar").write_bytes(_diff(None, child))
    target = tmp_path / "gnu"
    target.mkdir()
    _gnu_tar(
        "--xattrs",
        "--xattrs-include=*",
        "--numeric-owner",
        "-xpf",
        str(tmp_path / "diff.tar"),
        "-C",
        str(target),
    )
    assert _snapshot(target) == _snapshot(child)


@pytest.mark.root
def test_diff_is_deterministic(trees: tuple[Path, Path]) -> None:
    parent, child = trees
    first = _diff(parent, child)
    assert _diff(parent, child) == first
    assert hashlib.sha256(first).digest() == hashlib.sha256(_diff(parent, child)).digest()


@pytest.mark.root
def test_diff_entries_headers(trees: tuple[Path, Path]) -> None:
    parent, child = trees
    members = {m.name: m for m in _members(_diff(parent, child))}
    ping = members["bin/ping"]
    assert ping.mode == 0o4755 and ping.uname == "" and ping.gname == ""
    assert "SCHILY.xattr.security.capability" in ping.pax_headers
    assert members["etc"].isdir() and members["etc"].mode == 0o750
    whiteout = members["etc/.wh.gone"]
    assert whiteout.isreg() and whiteout.size == 0 and whiteout.mtime == 0
    assert members["links/b"].islnk() and members["links/b"].linkname == "links/a"
    assert members["links/c"].linkname == "links/a"
    assert members["null"].ischr() and (members["null"].devmajor, members["null"].devminor) == (
        1,
        3,
    )
    data = members["home/data"]
    assert data.pax_headers["hdrcharset"] == "BINARY"
    assert float(data.pax_headers["mtime"]) != int(float(data.pax_headers["mtime"]))
    # Parents of a change are included even when unchanged themselves.
    assert "links" in members and "home" in members


def test_diff_includes_parents_of_whiteouts(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    (parent / "a/b").mkdir(parents=True)
    (parent / "a/b/gone").write_bytes(b"")
    os.chmod(parent / "a", 0o700)
    child = tmp_path / "child"
    _copy(parent, child)
    (child / "a/b/gone").unlink()
    names = [m.name for m in _members(_diff(parent, child))]
    assert names == ["a", "a/b", "a/b/.wh.gone"]


def test_empty_diff_is_just_the_trailer(tmp_path: Path) -> None:
    (tmp_path / "same").mkdir()
    assert _diff(tmp_path / "same", tmp_path / "same") == bytes(1024)


def test_diff_refuses_unclean_change_paths(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a clean absolute path"):
        write_changes_tar(tmp_path, [Change("/a/../b", ChangeKind.ADDED)], io.BytesIO())


def test_diff_reads_through_no_symlink_out_of_the_root(jail: Jail) -> None:
    (jail.root / "l").symlink_to(jail.outside)
    out = io.BytesIO()
    # A change below a symlink (a tree changed under the differ) resolves inside the root,
    # where there is no such directory.
    with pytest.raises(InvalidArgument, match="parent is missing"):
        write_changes_tar(jail.root, [Change("/l/file", ChangeKind.ADDED)], out)
    assert b"sentinel" not in out.getvalue()
