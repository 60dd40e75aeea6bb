"""Tar-split: record a layer tar while it is applied, rebuild the same bytes from the files."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tarbuild import END, gnu_long, header, make_tar, member, pad, pax, tar

from laminae._exceptions import CorruptLayer, InvalidArgument, LaminaeError, LimitExceeded
from laminae.archive._apply import apply_tar
from laminae.archive._changes import naive_changes
from laminae.archive._limits import Limits
from laminae.archive._tarsplit import TarSplitRecorder, _RecordWriter, replay_tar
from laminae.archive._tarstream import TarReader
from laminae.archive._write import write_changes_tar

MiB = 1 << 20


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record(data: bytes, root: Path) -> tuple[bytes, bool]:
    """Apply ``data`` onto ``root`` through a recorder: the record, and whether it is exact."""
    out = io.BytesIO()
    recorder = TarSplitRecorder(io.BytesIO(data), out, Limits())
    apply_tar(root, recorder)
    recorder.finish()
    assert recorder.bytes_read == len(data)
    return out.getvalue(), recorder.exact


def _replay(record: bytes, root: Path) -> bytes:
    out = io.BytesIO()
    replay_tar(io.BytesIO(record), root, out)
    return out.getvalue()


def _passed(data: bytes, size: int = MiB, limits: Limits | None = None) -> bytes:
    """Pass ``data`` through a recorder, reading ``size`` bytes at a time: the record."""
    out = io.BytesIO()
    recorder = TarSplitRecorder(io.BytesIO(data), out, limits or Limits())
    pieces = []
    while piece := recorder.read(size):
        pieces.append(piece)
    recorder.finish()
    assert b"".join(pieces) == data
    return out.getvalue()


Op = tuple[str, bytes | int, int]


def _ops(record: bytes) -> list[Op]:
    """The operations of a record, decoded by the format the module docstring gives:
    ``("data", bytes, 0)``, ``("file", path, size)``, ``("stale", path, 0)``, ``("end", total,
    0)``."""
    assert record[:8] == b"LTSPLIT\x01"
    body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(record[8:])).read()
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = body[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    def take(size: int) -> bytes:
        nonlocal pos
        pos += size
        return body[pos - size : pos]

    ops: list[Op] = []
    while True:
        op = take(1)[0]
        if op == 0x01:
            ops.append(("data", take(varint()), 0))
        elif op == 0x02:
            path = take(varint())
            ops.append(("file", path, varint()))
        elif op == 0x03:
            ops.append(("stale", take(varint()), 0))
        else:
            assert op == 0x00
            ops.append(("end", varint(), 0))
            assert pos == len(body)
            return ops


def _references(record: bytes) -> list[tuple[bytes, int]]:
    return [(path, size) for kind, path, size in _ops(record) if kind == "file"]  # type: ignore[misc]


def _roundtrip(data: bytes, root: Path) -> bytes:
    root.mkdir(exist_ok=True)
    record, exact = _record(data, root)
    assert exact
    rebuilt = _replay(record, root)
    assert len(rebuilt) == len(data)
    assert _sha(rebuilt) == _sha(data)
    return record


# --- tars from tarfile and by hand --------------------------------------------------------


def test_make_tar_round_trips_with_trailing_garbage(tmp_path: Path) -> None:
    files = {
        "a/b.txt": b"hello" * 300,
        "one": b"x",
        "empty": b"",
        "exact-block": bytes(range(256)) * 2,
        "d/" + "n" * 150: b"long name",
        "d/" + "m" * 200 + "/" + "m" * 100: b"longer name",
        "./dot/slash": b"dotted",
    }
    data = make_tar(files, dirs=["a", "d", "dot"], whiteouts=["gone", "a/old"])
    record = _roundtrip(data + b"garbage after the end" * 100, tmp_path / "root")
    # Payload is referenced, not stored: the record is much smaller than the tar's content.
    assert len(record) < 2000


def test_hand_built_entries_round_trip(tmp_path: Path) -> None:
    data = tar(
        member(b"/abs/file", b"absolute", prefix=b""),
        member(b"dir/../up", b"collapsed"),
        gnu_long(b"L", b"g" * 200),
        member(b"ignored-name", b"gnu long name payload"),
        pax([(b"path", b"pax/" + b"p" * 200 + b"/" + b"q" * 100), (b"size", b"11")]),
        member(b"short", b"pax payload"),
        member(b"name", b"prefixed", prefix=b"some/prefix"),
        member(b".wh.big", b"a whiteout with data is stored verbatim"),
        member(b"seven", b"contiguous", typeflag=b"7"),
        member(b"old-regular", b"nul flag", typeflag=b"\x00"),
        member(b"link", typeflag=b"1", linkname=b"seven"),
        pax([(b"comment", b"global")], typeflag=b"g"),
        member(b"after-global", b"g"),
        # A PAX header that cannot change the framing is not parsed again: the GNU long name
        # in front of it still names the entry.
        gnu_long(b"L", b"k" * 120),
        pax([(b"mtime", b"1700000000.5"), (b"SCHILY.xattr.user.a", b"b")]),
        member(b"ignored-too", b"named by the long name"),
    )
    record = _roundtrip(data, tmp_path / "root")
    assert (tmp_path / "root" / ("k" * 120)).read_bytes() == b"named by the long name"
    references = _references(record)
    assert (b"k" * 120, 22) in references
    assert (b"pax/" + b"p" * 200 + b"/" + b"q" * 100, 11) in references
    assert (b"abs/file", 8) in references and (b"up", 9) in references
    assert not any(path.startswith(b".wh.") for path, _ in references)
    assert len(record) < len(data)


def test_base256_size_round_trips(tmp_path: Path) -> None:
    content = b"base-256 size field"
    field = b"\x80" + len(content).to_bytes(11, "big")
    data = tar(header(b"b256", size_field=field) + pad(content))
    _roundtrip(data, tmp_path / "root")


# --- tars from GNU tar --------------------------------------------------------------------


def _tree(root: Path, *, format: str, devices: bool) -> None:
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "small").write_bytes(b"small file\n")
    (root / "big").write_bytes(os.urandom(3 * MiB + 17))
    deep = root / ("d" * 60) / ("e" * 60)  # a ustar prefix holds at most 155 bytes
    deep.mkdir(parents=True)
    (deep / ("f" * 60)).write_bytes(b"a name over 100 bytes")
    if format != "ustar":
        longest = root / ("x" * 200) / ("y" * 200)
        longest.mkdir(parents=True)
        (longest / "z").write_bytes(b"a name over 255 bytes")
        os.symlink("t" * 150, root / "long-target")
    os.link(root / "small", root / "hardlink")
    os.symlink("small", root / "symlink")
    (root / "xattr").write_bytes(b"has an xattr")
    os.setxattr(root / "xattr", "user.laminae", b"value")
    (root / ".wh.gone").write_bytes(b"")
    (root / "opaque").mkdir()
    (root / "opaque" / ".wh..wh..opq").write_bytes(b"")
    os.mkfifo(root / "fifo")
    with open(root / "sparse", "wb") as f:
        f.seek(MiB)
        f.write(b"data in the middle")
        f.seek(3 * MiB)
        f.write(b"and near the end")
        f.truncate(4 * MiB)
    if devices:
        os.mknod(root / "null", 0o600 | 0o020000, os.makedev(1, 3))


def _gnu_tar(source: Path, target: Path, format: str) -> bytes:
    args = ["tar", f"--format={format}", "--numeric-owner", "-C", str(source), "-cf"]
    if format == "pax":
        args.insert(1, "--xattrs")
    if format != "ustar":
        args.insert(1, "-S")  # GNU tar: "GNU features wanted on incompatible archive format"
    subprocess.run([*args, str(target), "."], check=True, capture_output=True)
    return target.read_bytes()


@pytest.mark.parametrize("format", ["pax", "gnu", "ustar"])
def test_gnu_tar_round_trips(tmp_path: Path, format: str) -> None:
    _tree(tmp_path / "src", format=format, devices=False)
    data = _gnu_tar(tmp_path / "src", tmp_path / "layer.tar", format)
    _roundtrip(data, tmp_path / "root")


@pytest.mark.root
@pytest.mark.parametrize("format", ["pax", "gnu", "ustar"])
def test_gnu_tar_with_devices_round_trips(tmp_path: Path, format: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make device nodes")
    _tree(tmp_path / "src", format=format, devices=True)
    data = _gnu_tar(tmp_path / "src", tmp_path / "layer.tar", format)
    _roundtrip(data, tmp_path / "root")


def test_gnu_sparse_payload_is_stored_verbatim(tmp_path: Path) -> None:
    _tree(tmp_path / "src", format="gnu", devices=False)
    data = _gnu_tar(tmp_path / "src", tmp_path / "layer.tar", "gnu")
    referenced = {path for path, _ in _references(_passed(data))}
    assert b"sparse" not in referenced
    assert {b"small", b"big", b"xattr"} <= referenced
    assert b"empty" not in referenced and b".wh.gone" not in referenced


# --- the record, whatever the reads ------------------------------------------------------


def test_record_operations() -> None:
    data = make_tar({"f": b"x" * 600}) + b"tail"
    ops = _ops(_passed(data))
    assert [(kind, size) for kind, _, size in ops] == [
        ("data", 0),
        ("file", 600),
        ("data", 0),
        ("end", 0),
    ]
    assert ops[0][1] == data[:512]
    assert ops[1][1] == b"f"
    assert ops[2][1] == data[1112:]
    assert ops[3][1] == len(data)


@pytest.fixture(scope="module")
def gnu_tars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("recorder")
    tars = {}
    for format in ("pax", "gnu", "ustar"):
        source = base / f"src-{format}"
        _tree(source, format=format, devices=False)
        tars[format] = _gnu_tar(source, base / f"{format}.tar", format) + b"trailing"
    return tars


@pytest.mark.parametrize("format", ["pax", "gnu", "ustar"])
def test_record_does_not_depend_on_read_sizes(gnu_tars: dict[str, bytes], format: str) -> None:
    data = gnu_tars[format]
    whole = _passed(data, len(data))
    assert (b"big", 3 * MiB + 17) in _references(whole)
    for size in (7, 512, 513, MiB):
        assert _passed(data, size) == whole, size


def test_record_with_one_byte_reads() -> None:
    data = make_tar({"a": b"x" * 1000, "b/" + "c" * 120: b"yz"}, dirs=["b"]) + b"tail"
    assert _passed(data, 1) == _passed(data, len(data))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=9 * 1024), min_size=1, max_size=40))
def test_record_any_reads(cuts: list[int]) -> None:
    data = tar(
        pax([(b"path", b"p" * 300), (b"SCHILY.xattr.user.a", b"b")]),
        member(b"x", b"pax named file " * 40),
        gnu_long(b"L", b"l" * 180),
        member(b"y", b"gnu named file"),
        member(b"z", b""),
        member(b"w", b"w" * 2000),
    )
    out = io.BytesIO()
    recorder = TarSplitRecorder(io.BytesIO(data), out, Limits())
    pieces = [recorder.read(size) for size in cuts]
    recorder.finish()
    assert recorder.bytes_read == len(data)
    assert b"".join(pieces) == data[: len(b"".join(pieces))]
    assert out.getvalue() == _passed(data)


def test_whiteout_data_is_verbatim() -> None:
    data = tar(member(b".wh.x", b"whiteout data"), member(b"f", b"1"))
    assert _references(_passed(data)) == [(b"f", 1)]


# --- the limits: the reader's, enforced once -----------------------------------------------


def _reader_error(data: bytes, limits: Limits) -> LaminaeError:
    with pytest.raises(LaminaeError) as caught:
        for entry in TarReader(io.BytesIO(data), limits):
            for _ in entry.chunks():
                pass
    return caught.value


def test_recorder_refuses_more_entries_than_max_entries_with_the_readers_error(
    tmp_path: Path,
) -> None:
    data = tar(member(b"a", b"1"), member(b"b", b"2"), member(b"c", b"3"))
    limits = Limits(max_entries=2)
    expected = _reader_error(data, limits)
    assert isinstance(expected, LimitExceeded) and "max_entries" in str(expected)
    recorder = TarSplitRecorder(io.BytesIO(data), io.BytesIO(), limits)
    with pytest.raises(LimitExceeded) as caught:
        recorder.read()
    assert str(caught.value) == str(expected)
    # Through the store's path: the applier reads the recorder, whose reader refuses first.
    recorder = TarSplitRecorder(io.BytesIO(data), io.BytesIO(), limits)
    with pytest.raises(LimitExceeded) as caught:
        apply_tar(tmp_path, recorder, limits=Limits())
    assert str(caught.value) == str(expected)


@pytest.mark.parametrize(
    ("data", "limits", "match"),
    [
        (
            tar(pax([(b"comment", b"c" * 5000)]), member(b"f", b"x")),
            Limits(max_header_bytes=4096),
            "max_header_bytes",
        ),
        (make_tar({"f": b"x" * 5000}), Limits(max_bytes=4096), "max_bytes"),
        (make_tar({"p" * 300: b"x"}), Limits(max_path_bytes=200), "max_path_bytes"),
        (
            make_tar({"f": b"x"}) + b"trailing garbage" * 1000,
            Limits(max_bytes=10240 + 100),
            "max_bytes",
        ),
    ],
    ids=["header-bytes", "bytes", "path-bytes", "bytes-after-the-end"],
)
def test_recorder_enforces_the_readers_limits(data: bytes, limits: Limits, match: str) -> None:
    expected = _reader_error(data, limits)
    recorder = TarSplitRecorder(io.BytesIO(data), io.BytesIO(), limits)
    with pytest.raises(LimitExceeded, match=match) as caught:
        recorder.finish()
    assert str(caught.value) == str(expected)


def test_recorder_refuses_a_bad_checksum() -> None:
    block = bytearray(header(b"f", size=1))
    block[0] ^= 1
    recorder = TarSplitRecorder(io.BytesIO(bytes(block) + bytes(511) + END), io.BytesIO(), Limits())
    with pytest.raises(InvalidArgument, match="checksum"):
        recorder.read(512)


@pytest.mark.parametrize("cut", [100, 512, 700])
def test_recorder_refuses_a_truncated_tar(cut: int) -> None:
    data = tar(member(b"f", b"x" * 1000))
    recorder = TarSplitRecorder(io.BytesIO(data[:cut]), io.BytesIO(), Limits())
    with pytest.raises(InvalidArgument, match="truncated"):
        recorder.finish()


# --- laminae's own writer -----------------------------------------------------------------


def test_record_of_write_changes_tar(tmp_path: Path) -> None:
    root = tmp_path / "layer"
    _tree(root, format="pax", devices=False)
    tar_out = io.BytesIO()
    write_changes_tar(root, naive_changes(None, root), tar_out)
    data = tar_out.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        assert "big" in archive.getnames()
    assert _replay(_passed(data), root) == data


# --- replay refuses what it cannot rebuild ------------------------------------------------


def test_changed_file_size_names_the_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    record, _ = _record(make_tar({"dir/file": b"twelve bytes"}, dirs=["dir"]), root)
    with open(root / "dir" / "file", "ab") as f:
        f.write(b"!")
    with pytest.raises(CorruptLayer, match="'dir/file' has 13 bytes"):
        _replay(record, root)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    record, _ = _record(make_tar({"dir/file": b"content"}, dirs=["dir"]), root)
    (root / "dir" / "file").unlink()
    with pytest.raises(CorruptLayer, match="'dir/file' is missing"):
        _replay(record, root)


def test_symlink_in_place_of_a_file_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    record, _ = _record(make_tar({"file": b"content"}), root)
    (root / "file").unlink()
    (root / "other").write_bytes(b"content")
    os.symlink("other", root / "file")
    with pytest.raises(CorruptLayer, match="'file' is a symbolic link"):
        _replay(record, root)


def _hand_record(path: bytes, size: int) -> bytes:
    out = io.BytesIO()
    writer = _RecordWriter(out)
    writer.verbatim(memoryview(b"HEAD"))
    writer.reference(path, size)
    writer.close()
    return out.getvalue()


@pytest.mark.parametrize(
    "path",
    [b"../../../../../outside/secret", b"/outside/secret", b"escape/secret", b"up/secret"],
)
def test_hostile_record_path_stays_inside_root(tmp_path: Path, path: bytes) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"SECRET")
    root = tmp_path / "a" / "b" / "root"
    root.mkdir(parents=True)
    os.symlink(str(outside), root / "escape")
    os.symlink("../../../outside", root / "up")
    with pytest.raises(CorruptLayer, match="missing"):
        _replay(_hand_record(path, 6), root)
    # What a replay reads is the file the same path names inside the root, as if it were "/".
    inside = root / str(outside).lstrip("/") if path.startswith(b"escape") else root / "outside"
    inside.mkdir(parents=True)
    (inside / "secret").write_bytes(b"inside")
    assert _replay(_hand_record(path, 6), root) == b"HEADinside"


def test_record_replaced_file_is_not_replayed(tmp_path: Path) -> None:
    data = tar(member(b"f", b"first"), member(b"f", b"second!"))
    root = tmp_path / "root"
    root.mkdir()
    record, exact = _record(data, root)
    assert not exact
    # The first reference fails (the file has the second entry's size) before the stale mark.
    with pytest.raises(CorruptLayer, match="'f'"):
        _replay(record, root)


def test_record_directory_replaced_by_symlink_is_not_replayed(tmp_path: Path) -> None:
    data = tar(
        member(b"d", typeflag=b"5", mode=0o755),
        member(b"d/f", b"content"),
        member(b"d", typeflag=b"2", linkname=b"elsewhere", mode=0o777),
    )
    root = tmp_path / "root"
    root.mkdir()
    record, exact = _record(data, root)
    assert not exact
    with pytest.raises(CorruptLayer, match="'d/f' is missing"):
        _replay(record, root)


def test_directory_entry_again_keeps_the_record_exact(tmp_path: Path) -> None:
    data = tar(
        member(b"d", typeflag=b"5", mode=0o755),
        member(b"d/f", b"content"),
        member(b"d", typeflag=b"5", mode=0o700),
    )
    _roundtrip(data, tmp_path / "root")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b"NOTSPLIT", "bad magic"),
        (b"LTSPLIT\x09", "unknown version"),
        (b"LTSPLIT\x01not zstd", "tar-split record"),
    ],
)
def test_malformed_record(tmp_path: Path, record: bytes, message: str) -> None:
    with pytest.raises(CorruptLayer, match=message):
        _replay(record, tmp_path)


def test_truncated_record(tmp_path: Path) -> None:
    record = _hand_record(b"f", 1)
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(CorruptLayer):
        _replay(record[:-6], tmp_path)


def test_end_blocks_only(tmp_path: Path) -> None:
    _roundtrip(END, tmp_path / "root")
