"""Hostile layers, applied with ``store.apply_layer``: escapes through symlinks, hardlinks,
whiteouts and ``..`` modelled on the CVEs of REFERENCE section 8 and containerd's
TestBreakouts, decompression and header bombs, paths too deep or too long, and garbage.

Each must be refused (``InvalidArgument``; ``LimitExceeded`` for a broken limit) or applied
contained; nothing may change outside the store (the ``sentinel`` directory and its
``victim`` file are the targets), and a refused layer leaves nothing behind: the same
layers, no new storage, and a store that checks clean.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Final

import attrs
import pytest

import laminae
from laminae.conformance._fixtures import VICTIM_CONTENT, StoreFactory, StorePaths
from laminae.conformance._tars import LayerTar, file_header, pax_header, pax_record

UP: Final = "../" * 64  # more than any store's depth below /


@attrs.frozen
class Hostile:
    """One hostile layer.

    :param build: the layer's bytes, given the sentinel directory it aims at.
    :param expect: ``refuse`` (``InvalidArgument``), ``limit`` (``LimitExceeded``), or
        ``either`` (refused, or applied without touching anything outside).
    :param base: a layer applied first (what the hostile one stacks on).
    :param limits: the store's limits, smaller than the defaults for the bombs.
    """

    build: Callable[[Path], bytes]
    expect: str = "either"
    base: Callable[[Path], bytes] | None = None
    limits: laminae.Limits | None = None


def rel(path: Path) -> str:
    return str(path).lstrip("/")


def gzip_bomb(sentinel: Path) -> bytes:
    size = 64 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    parts = [compressor.compress(file_header("bomb", size))]
    block = b"\0" * (1 << 20)
    for _ in range(size >> 20):
        parts.append(compressor.compress(block))
    parts.append(compressor.compress(b"\0" * 1024))
    parts.append(compressor.flush())
    return b"".join(parts)


def entry_bomb(sentinel: Path) -> bytes:
    layer = LayerTar().dir("many")
    for number in range(2000):
        layer.file(f"many/{number}")
    return layer.build()


def pax_bomb(sentinel: Path) -> bytes:
    records = pax_record(b"comment", b"x" * (64 << 10))
    return LayerTar().raw(pax_header(records)).file("after-the-header", b"x").build()


def pax_size_claim(sentinel: Path) -> bytes:
    records = pax_record(b"comment", b"x" * 1000)
    return pax_header(records, declared_size=(8 << 30) - 1)  # and the stream ends


def gnu_long_name_claim(sentinel: Path) -> bytes:
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = 1 << 30
    return info.tobuf(tarfile.GNU_FORMAT) + b"n" * 4096  # and the stream ends


def truncated(sentinel: Path) -> bytes:
    return file_header("cut-short", 1 << 20) + b"only this much"


def bad_checksum(sentinel: Path) -> bytes:
    data = bytearray(LayerTar().file("file", b"data").build())
    data[148:156] = b"0000000\0"  # the header checksum field
    return bytes(data)


CASES: Final[dict[str, Hostile]] = {
    # Symlink escapes (CVE-2014-6407, CVE-2014-9356, CVE-2026-17106; TestBreakouts).
    "symlink-absolute": Hostile(
        lambda s: LayerTar().symlink("escape", str(s)).file("escape/pwned", b"x").build()
    ),
    "symlink-up-and-out": Hostile(
        lambda s: LayerTar().symlink("escape", UP + rel(s)).file("escape/pwned", b"x").build()
    ),
    "symlink-multiple": Hostile(
        lambda s: (
            LayerTar()
            .symlink("l1", "..")
            .symlink("l2", "l1/../..")
            .symlink("l3", "l2/" + UP + rel(s))
            .file("l3/pwned", b"x")
            .build()
        )
    ),
    "symlink-parent-directory": Hostile(
        lambda s: (
            LayerTar().dir("dir").symlink("dir/up", UP).file(f"dir/up/{rel(s)}/pwned", b"x").build()
        )
    ),
    "symlink-slash-ended": Hostile(
        lambda s: LayerTar().symlink("escape", f"{s}/").file("escape/pwned", b"x").build()
    ),
    "symlink-override-directory": Hostile(
        lambda s: LayerTar().dir("dir").symlink("dir", str(s)).file("dir/pwned", b"x").build()
    ),
    "directory-override-symlink": Hostile(
        lambda s: (
            LayerTar().symlink("dir", str(s)).dir("dir", mode=0o777).file("dir/pwned", b"x").build()
        )
    ),
    "symlink-then-write-file": Hostile(
        lambda s: (
            LayerTar()
            .symlink("victim", str(s / "victim"))
            .file("victim", b"pwned", mode=0o777)
            .build()
        )
    ),
    "symlink-in-lower-layer": Hostile(
        lambda s: LayerTar().file("escape/pwned", b"x").file("escape/victim", b"pwned").build(),
        base=lambda s: LayerTar().symlink("escape", str(s)).build(),
    ),
    # Hardlink escapes.
    "hardlink-absolute": Hostile(lambda s: LayerTar().hardlink("h", str(s / "victim")).build()),
    "hardlink-up-and-out": Hostile(
        lambda s: LayerTar().hardlink("h", UP + rel(s / "victim")).build()
    ),
    "hardlink-through-symlink": Hostile(
        lambda s: LayerTar().symlink("s", str(s)).hardlink("h", "s/victim").build()
    ),
    "hardlink-to-symlink-to-outside": Hostile(
        lambda s: (
            LayerTar()
            .symlink("s", str(s / "victim"))
            .hardlink("h", "s")
            .file("h", b"pwned", mode=0o777)
            .build()
        )
    ),
    # Whiteout escapes.
    "whiteout-dotdot": Hostile(
        lambda s: LayerTar().dir("dir").file("dir/.wh...", b"").build(),
        expect="refuse",
        base=lambda s: LayerTar().dir("dir").file("dir/keep", b"k").file("keep", b"k").build(),
    ),
    "whiteout-dot": Hostile(
        lambda s: LayerTar().dir("dir").file("dir/.wh..", b"").build(),
        expect="refuse",
        base=lambda s: LayerTar().dir("dir").file("dir/keep", b"k").build(),
    ),
    "whiteout-up-and-out": Hostile(
        lambda s: LayerTar().file(UP + rel(s) + "/.wh.victim", b"").build()
    ),
    "whiteout-through-symlink": Hostile(
        lambda s: LayerTar().symlink("link", str(s)).file("link/.wh.victim", b"").build()
    ),
    "whiteout-through-lower-symlink": Hostile(
        lambda s: LayerTar().file("link/.wh.victim", b"").build(),
        base=lambda s: LayerTar().symlink("link", str(s)).build(),
    ),
    "whiteout-of-lower-symlink": Hostile(
        lambda s: LayerTar().whiteout("link").build(),
        base=lambda s: LayerTar().symlink("link", str(s / "victim")).build(),
    ),
    "opaque-through-lower-symlink": Hostile(
        lambda s: LayerTar().opaque("link").build(),
        base=lambda s: LayerTar().symlink("link", str(s)).build(),
    ),
    "whiteout-dead-symlink-parent": Hostile(
        lambda s: LayerTar().symlink("dead", "/no/such/dir").file("dead/.wh.x", b"").build()
    ),
    # Paths that leave the root.
    "dotdot-path": Hostile(lambda s: LayerTar().file(UP + rel(s) + "/pwned", b"x").build()),
    "absolute-path": Hostile(lambda s: LayerTar().file(f"{s}/pwned", b"x").build()),
    "dotdot-inside-path": Hostile(
        lambda s: LayerTar().dir("a").file("a/" + UP + rel(s) + "/pwned", b"x").build()
    ),
    # Bombs: refused once a limit is reached, before memory or disk is spent.
    "decompression-bomb": Hostile(
        gzip_bomb, expect="limit", limits=laminae.Limits(max_bytes=8 << 20)
    ),
    "entry-count-bomb": Hostile(entry_bomb, expect="limit", limits=laminae.Limits(max_entries=500)),
    "pax-header-bomb": Hostile(
        pax_bomb, expect="limit", limits=laminae.Limits(max_header_bytes=4096)
    ),
    "pax-header-size-claim": Hostile(pax_size_claim, expect="limit"),
    "gnu-long-name-size-claim": Hostile(gnu_long_name_claim, expect="limit"),
    "xattr-value-bomb": Hostile(
        lambda s: LayerTar().file("f", b"", xattrs={"user.big": b"v" * (128 << 10)}).build(),
        expect="limit",
    ),
    "too-deep-path": Hostile(
        lambda s: LayerTar().file("d/" * 300 + "f", b"x").build(), expect="limit"
    ),
    "too-long-path": Hostile(
        lambda s: LayerTar().file("/".join(["p" * 200] * 25), b"x").build(), expect="limit"
    ),
    "too-long-link-target": Hostile(
        lambda s: LayerTar().symlink("l", "t" * 5000).build(), expect="limit"
    ),
    # Garbage (containers/storage applyjunk).
    "not-a-tar": Hostile(lambda s: hashlib.sha512(b"junk").digest() * 64, expect="refuse"),
    "truncated-tar": Hostile(truncated, expect="refuse"),
    "bad-header-checksum": Hostile(bad_checksum, expect="refuse"),
    "gzip-garbage": Hostile(lambda s: b"\x1f\x8b\x08\x00" + b"junk" * 100, expect="refuse"),
}


def storage_entries(paths: StorePaths) -> set[str]:
    home = paths.root / paths.driver
    return {
        os.path.relpath(os.path.join(dirpath, name), home)
        for dirpath, dirnames, filenames in os.walk(home)
        for name in dirnames + filenames
    }


def assert_untouched(sentinel: Path, before: os.stat_result) -> None:
    listing = sorted(os.listdir(sentinel))
    assert listing == ["victim"], f"the layer wrote outside the store: {sentinel} holds {listing}"
    victim = sentinel / "victim"
    after = os.lstat(victim)
    assert stat.S_ISREG(after.st_mode), "the layer replaced a file outside the store"
    assert victim.read_bytes() == VICTIM_CONTENT, "the layer changed a file outside the store"
    assert after.st_nlink == 1, "the layer hardlinked a file outside the store"
    assert after.st_mode == before.st_mode, "the layer changed the mode of a file outside"


@pytest.mark.laminae_area("hostile")
class TestHostile:
    @pytest.mark.parametrize("case", list(CASES))
    def test_hostile_layer(
        self,
        make_store: StoreFactory,
        store_paths: StorePaths,
        sentinel: Path,
        case: str,
    ) -> None:
        hostile = CASES[case]
        store = make_store(limits=hostile.limits)
        parent = None
        if hostile.base is not None:
            parent = store.apply_layer(io.BytesIO(hostile.base(sentinel))).id
        layers_before = [layer.id for layer in store.layers()]
        storage_before = storage_entries(store_paths)
        victim_before = os.lstat(sentinel / "victim")
        sentinel_mode = os.lstat(sentinel).st_mode
        data = hostile.build(sentinel)

        try:
            layer = store.apply_layer(io.BytesIO(data), parent=parent)
        except laminae.InvalidArgument as exc:
            if hostile.expect == "limit":
                assert isinstance(exc, laminae.LimitExceeded), (
                    f"{case}: refused, but not as a broken limit (LimitExceeded): {exc!r}"
                )
            assert_untouched(sentinel, victim_before)
            assert [existing.id for existing in store.layers()] == layers_before
            leftovers = storage_entries(store_paths) - storage_before
            assert not leftovers, f"{case}: the refused layer left storage: {sorted(leftovers)}"
            report = store.check()
            assert report.ok, f"{case}: the store does not check clean: {report.problems()}"
        else:
            assert hostile.expect == "either", (
                f"{case}: applied as layer {layer.id}, but must be refused"
                + (" with LimitExceeded" if hostile.expect == "limit" else "")
            )
            assert_untouched(sentinel, victim_before)
            path = store.mount(layer.id)
            try:
                # Whatever the layer holds, none of it is the victim's inode. (Symlinks are
                # not followed: they mean a path in the layer, not on the host.)
                victim = (victim_before.st_dev, victim_before.st_ino)
                for dirpath, dirnames, filenames in os.walk(path):
                    for name in dirnames + filenames:
                        full = os.path.join(dirpath, name)
                        st = os.lstat(full)
                        assert (st.st_dev, st.st_ino) != victim, (
                            f"{case}: {full} is the victim outside the store"
                        )
            finally:
                store.unmount(layer.id)
        assert os.lstat(sentinel).st_mode == sentinel_mode, "the sentinel dir's mode changed"
