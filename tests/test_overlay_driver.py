"""The overlay driver: layout, mounts, depth, options, probe, direct apply, and native changes
held against naive ones, byte for byte, over layers written through real overlay mounts.

Every test mounts or writes overlayfs whiteouts and trusted xattrs, so all need root and run
in a private mount namespace (``tox -e unit``); each unmounts what it mounted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
from tarbuild import Layer

import laminae
from laminae import (
    AlreadyExists,
    Change,
    ChangeKind,
    DriverUnavailable,
    FailedPrecondition,
    Feature,
    InvalidArgument,
    NotFound,
)
from laminae.driverkit import (
    DetachedApplier,
    MountSpec,
    ParentsNeeded,
    Unsettled,
    naive_changes,
    write_changes_tar,
)
from laminae.driverkit._mount import mount_all, unmount_all
from laminae.drivers.overlay import OverlayDriver
from laminae.drivers.overlay._driver import (
    _FALLBACK_DEPTH,
    _FALLBACK_HOME_MAX,
    LOWERDIR_APPEND,
    USERXATTR,
)
from laminae.drivers.overlay._known_failures import _contiguous_from_zero, known_failures
from laminae.drivers.overlay._probe import check_kernel_options
from laminae.kernel import _mountinfo, _mounts
from laminae.kernel._xattrs import get_xattr, set_xattr

pytestmark = pytest.mark.root

OPAQUE = b"trusted.overlay.opaque"
NATIVE_OPTIONS = ("index=off", "redirect_dir=nofollow", "metacopy=off")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def driver(home: Path) -> OverlayDriver:
    return OverlayDriver(home, {})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[laminae.Store]:
    with laminae.open_store(tmp_path / "root", runroot=tmp_path / "run", driver="overlay") as s:
        try:
            yield s
        finally:
            for layer in s.layers():
                if layer.mount_count:
                    s.unmount(layer.id, force=True)


@contextlib.contextmanager
def mounted(store: laminae.Store, ref: str) -> Iterator[Path]:
    path = store.mount(ref)
    try:
        yield path
    finally:
        store.unmount(ref)


@contextlib.contextmanager
def mounted_specs(specs: list[MountSpec], target: Path) -> Iterator[Path]:
    mount_all(specs, target)
    try:
        yield target
    finally:
        unmount_all(target)


def chain(driver: OverlayDriver, count: int, *, writable_top: bool = True) -> list[str]:
    """Layers e0 (base) .. e<count-1>, each on the one before; parents of the top, first."""
    ids = [f"e{n}" for n in range(count)]
    for number, id in enumerate(ids):
        parents = list(reversed(ids[:number]))
        driver.create(id, parents, writable=writable_top or number < count - 1)
    return ids


def parents_of(ids: list[str], id: str) -> list[str]:
    return list(reversed(ids[: ids.index(id)]))


# --- registration and layout ----------------------------------------------------------------


def test_registered_with_its_capabilities() -> None:
    entry = laminae.available_drivers()["overlay"]
    assert entry.cls is OverlayDriver and entry.priority == 30
    caps = OverlayDriver.capabilities
    assert caps.features == {Feature.APPLY, Feature.CHANGES, Feature.APPLY_DETACHED}
    assert caps.needs_root and caps.independent_layers  # applied detached, settled in order
    assert LOWERDIR_APPEND, "this kernel (6.18) takes lowerdir+"
    assert caps.max_depth == 500
    assert dict(caps.known_failures).keys() == {"mounts::test_rename_directory"}
    assert not USERXATTR


def test_layout_of_writable_and_read_only_layers(driver: OverlayDriver, home: Path) -> None:
    driver.create("a1", [], writable=True)
    driver.create("d2", ["a1"], writable=False)
    assert stat.S_IMODE(os.lstat(home).st_mode) == 0o700
    assert (home / "xattrs").read_text() == "trusted\n"
    for id in ("a1", "d2"):
        layer = home / "layers" / id
        st = os.lstat(layer / "diff")
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
        assert os.listdir(layer / "diff") == []
        link = (layer / "link").read_text().strip()
        assert len(link) == 10
        assert os.readlink(home / "l" / link) == f"../layers/{id}/diff"
        assert (home / "l" / link).resolve() == (layer / "diff").resolve()
    assert (home / "layers/a1/work").is_dir()
    assert not (home / "layers/d2/work").exists()
    assert driver.layers() == ["a1", "d2"]


def test_create_refuses_a_taken_id_a_missing_parent_and_a_bad_id(driver: OverlayDriver) -> None:
    driver.create("a1", [], writable=True)
    with pytest.raises(AlreadyExists):
        driver.create("a1", [], writable=True)
    with pytest.raises(NotFound, match="parent layer b2"):
        driver.create("c3", ["b2"], writable=True)
    for bad in ("", "..", "a/b", "-x", "x" * 129):
        with pytest.raises(InvalidArgument):
            driver.create(bad, [], writable=True)
    assert driver.layers() == ["a1"]


def test_remove_takes_the_layer_and_its_link(driver: OverlayDriver, home: Path) -> None:
    chain(driver, 2)
    link = (home / "layers/e1/link").read_text().strip()
    driver.remove("e1")
    assert driver.layers() == ["e0"]
    assert not os.path.lexists(home / "l" / link)
    assert os.listdir(home / "l") == [(home / "layers/e0/link").read_text().strip()]
    with pytest.raises(NotFound):
        driver.remove("e1")


def test_crash_leftovers_are_not_layers_and_are_swept(driver: OverlayDriver, home: Path) -> None:
    driver.create("a1", [], writable=True)
    # What a crash leaves: a half-made layer (create) and a half-removed one (remove).
    (home / "tmp-b2" / "diff").mkdir(parents=True)
    (home / "tmp-b2" / "link").write_text("BBBBBBBBBB\n")
    os.symlink("../layers/b2/diff", home / "l" / "BBBBBBBBBB")
    (home / "rm-c3" / "diff" / "x").mkdir(parents=True)
    assert driver.layers() == ["a1"]
    driver.create("b2", [], writable=True)  # the half-made one is swept first
    driver.remove("c3")  # nothing but leftovers: swept, no error
    assert not (home / "rm-c3").exists()
    assert not os.path.lexists(home / "l" / "BBBBBBBBBB")
    assert driver.layers() == ["a1", "b2"]


def test_usage_counts_the_layers_own_dir_and_each_inode_once(
    driver: OverlayDriver, home: Path
) -> None:
    chain(driver, 2)
    diff = home / "layers/e1/diff"
    (diff / "data").write_bytes(b"x" * 100_000)
    os.link(diff / "data", diff / "again")
    (diff / "d").mkdir()
    usage = driver.usage("e1")
    assert usage.inodes == 3  # the root, data (once), d
    assert usage.size >= 100_000
    assert driver.usage("e0").inodes == 1
    with pytest.raises(NotFound):
        driver.usage("dead")


def test_close_twice_is_fine(driver: OverlayDriver) -> None:
    driver.close()
    driver.close()


# --- mounts ---------------------------------------------------------------------------------


def test_mount_descriptions(driver: OverlayDriver, home: Path) -> None:
    ids = chain(driver, 3)
    driver.create("face", ["e1", "e0"], writable=False)
    driver.create("face1", ["e0"], writable=False)
    diff = {id: str(home / "layers" / id / "diff") for id in [*ids, "face"]}

    assert driver.mounts("e0", [], readonly=False) == [
        MountSpec(type="bind", source=diff["e0"], options=("rw",))
    ]
    assert driver.mounts("e0", [], readonly=True) == [
        MountSpec(type="bind", source=diff["e0"], options=("ro",))
    ]
    writable = driver.mounts("e2", ["e1", "e0"], readonly=False)
    assert writable == [
        MountSpec(
            type="overlay",
            source="overlay",
            options=NATIVE_OPTIONS,
            lowerdirs=(diff["e1"], diff["e0"]),
            upperdir=diff["e2"],
            workdir=str(home / "layers/e2/work"),
        )
    ]
    assert driver.mounts("e2", ["e1", "e0"], readonly=True) == [
        MountSpec(
            type="overlay",
            source="overlay",
            options=NATIVE_OPTIONS,
            lowerdirs=(diff["e2"], diff["e1"], diff["e0"]),
        )
    ]
    # A view's own dir is never written: its parents are its content.
    assert driver.mounts("face", ["e1", "e0"], readonly=True)[0].lowerdirs == (
        diff["e1"],
        diff["e0"],
    )
    assert driver.mounts("face1", ["e0"], readonly=True) == [
        MountSpec(type="bind", source=diff["e0"], options=("ro",))
    ]
    with pytest.raises(NotFound):
        driver.mounts("e2", ["e1", "0bad"], readonly=False)


def test_mounts_stack_and_write_into_the_upper(driver: OverlayDriver, home: Path) -> None:
    ids = chain(driver, 3)
    (home / "layers/e0/diff/base").write_bytes(b"0")
    (home / "layers/e1/diff/base").write_bytes(b"1")
    (home / "layers/e1/diff/mid").write_bytes(b"m")
    target = home.parent / "mnt"
    with mounted_specs(driver.mounts("e2", parents_of(ids, "e2"), readonly=False), target) as root:
        assert (root / "base").read_bytes() == b"1"
        (root / "top").write_bytes(b"t")
        os.unlink(root / "mid")
        options = {m.mount_point: m.super_options for m in _mountinfo.mountinfo()}[str(root)]
        assert "redirect_dir=nofollow" in options
    assert (home / "layers/e2/diff/top").read_bytes() == b"t"
    mid = os.lstat(home / "layers/e2/diff/mid")
    assert stat.S_ISCHR(mid.st_mode) and mid.st_rdev == 0
    with mounted_specs(driver.mounts("e2", parents_of(ids, "e2"), readonly=True), target) as root:
        assert sorted(os.listdir(root)) == ["base", "top"]
        with pytest.raises(OSError) as caught:
            (root / "new").write_bytes(b"x")
        assert caught.value.errno == errno.EROFS


def test_a_layer_with_500_parents_mounts_read_only_and_writable(
    driver: OverlayDriver, home: Path
) -> None:
    """500 parents: writable = 500 lowers and an upper; read-only would be 501 lowers, so
    the layer's own dir is the upper of a mount made read-only."""
    ids = chain(driver, 501)
    (home / "layers/e0/diff/base").write_bytes(b"base")
    (home / "layers/e500/diff/top").write_bytes(b"top")
    parents = parents_of(ids, "e500")
    assert len(parents) == 500
    target = home.parent / "mnt"
    specs = driver.mounts("e500", parents, readonly=True)
    assert len(specs[0].lowerdirs) == 500 and specs[0].upperdir is not None
    assert specs[0].readonly and "ro" in specs[0].options
    with mounted_specs(specs, target) as root:
        assert (root / "base").read_bytes() == b"base"
        assert (root / "top").read_bytes() == b"top"
        with pytest.raises(OSError) as caught:
            (root / "new").write_bytes(b"x")
        assert caught.value.errno == errno.EROFS
    assert sorted(os.listdir(home / "layers/e500/diff")) == ["top"]
    with mounted_specs(driver.mounts("e500", parents, readonly=False), target) as root:
        (root / "new").write_bytes(b"x")
    assert (home / "layers/e500/diff/new").read_bytes() == b"x"


def test_501_parents_are_refused_before_mounting(driver: OverlayDriver) -> None:
    ids = chain(driver, 502)
    with pytest.raises(
        FailedPrecondition, match="501 lower layers; this kernel mounts at most 500"
    ):
        driver.mounts("e501", parents_of(ids, "e501"), readonly=False)


def test_store_refuses_a_501st_parent(store: laminae.Store) -> None:
    assert store.capabilities.max_depth == 500
    layer = store.apply_layer(io.BytesIO(Layer().file("f", b"0").bytes()))
    for number in range(1, 501):
        layer = store.apply_layer(
            io.BytesIO(Layer().file("f", str(number).encode()).bytes()), parent=layer.id
        )
    assert layer.depth == 500
    with mounted(store, layer.id) as root:
        assert (root / "f").read_bytes() == b"500"
    with pytest.raises(FailedPrecondition, match="supports at most 500"):
        store.create_layer(parent=layer.id)


class ShortLinkOverlay(OverlayDriver):  # type: ignore[misc]
    """The driver as it runs on a kernel without lowerdir+ (Linux < 6.8)."""

    short_links = True
    capabilities = laminae.Capabilities(
        features=OverlayDriver.capabilities.features,
        max_depth=_FALLBACK_DEPTH,
    )


@pytest.fixture
def short_home() -> Iterator[Path]:
    """A home short enough for the fallback's declared depth (pytest's tmp_path is not)."""
    base = Path(tempfile.mkdtemp(prefix="ovl-"))
    try:
        yield base / "h"
    finally:
        shutil.rmtree(base)


def test_short_links_keep_the_options_within_a_page(short_home: Path, tmp_path: Path) -> None:
    """Without lowerdir+ the lowers are l/ short names, and mount(2) takes them all."""
    home = short_home
    assert len(str(home)) <= _FALLBACK_HOME_MAX
    ShortLinkOverlay.probe(home, {})
    driver = ShortLinkOverlay(home, {})
    ids = chain(driver, _FALLBACK_DEPTH + 1)
    (home / "layers/e0/diff/base").write_bytes(b"base")
    target = tmp_path / "mnt"
    target.mkdir()
    for readonly in (False, True):
        spec = driver.mounts(ids[-1], parents_of(ids, ids[-1]), readonly=readonly)[0]
        assert len(spec.lowerdirs) == _FALLBACK_DEPTH + readonly
        assert all(os.path.dirname(lower) == str(home / "l") for lower in spec.lowerdirs)
        data = ",".join(
            [
                "lowerdir=" + ":".join(spec.lowerdirs),
                *([] if spec.upperdir is None else [f"upperdir={spec.upperdir}"]),
                *([] if spec.workdir is None else [f"workdir={spec.workdir}"]),
                *spec.options,
            ]
        )
        assert len(data) < os.sysconf("SC_PAGE_SIZE")
        # The classic mount(2) way, as on a kernel without lowerdir+.
        _mounts.mount("overlay", str(target), "overlay", _mounts.MS_RDONLY if readonly else 0, data)
        try:
            assert (target / "base").read_bytes() == b"base"
        finally:
            _mounts.umount(str(target))
    # A lost short link (a crash between create's rename and its symlink) is made again.
    link = (home / "layers/e0/link").read_text().strip()
    os.unlink(home / "l" / link)
    driver.mounts("e1", ["e0"], readonly=False)
    assert os.readlink(home / "l" / link) == "../layers/e0/diff"


def test_short_links_refuse_a_stack_past_the_page(short_home: Path) -> None:
    driver = ShortLinkOverlay(short_home, {"mountopt": ",".join(["noatime"] * 600)})
    chain(driver, 3)
    with pytest.raises(FailedPrecondition, match=r"without lowerdir\+ .* must fit in 4095"):
        driver.mounts("e2", ["e1", "e0"], readonly=False)


def test_short_links_probe_refuses_a_long_home(tmp_path: Path) -> None:
    with pytest.raises(DriverUnavailable, match="has no lowerdir\\+"):
        ShortLinkOverlay.probe(tmp_path / ("x" * 60), {})


# --- options --------------------------------------------------------------------------------


def test_mountopt_is_added_to_every_overlay_mount(tmp_path: Path) -> None:
    driver = OverlayDriver(tmp_path / "home", {"mountopt": "nodev, noatime"})
    chain(driver, 2)
    spec = driver.mounts("e1", ["e0"], readonly=False)[0]
    assert spec.options == (*NATIVE_OPTIONS, "nodev", "noatime")
    with mounted_specs([spec], tmp_path / "mnt") as root:
        entry = {m.mount_point: m for m in _mountinfo.mountinfo()}[str(root)]
        assert "nodev" in entry.options.split(",") and "noatime" in entry.options.split(",")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"size": "10G"}, "overlay option size: not supported here"),
        ({"colour": "blue"}, "unknown option 'colour'"),
        ({"mountopt": "lowerdir=/x"}, "'lowerdir=/x' is set by the driver"),
        ({"mountopt": "userxattr"}, "'userxattr' is set by the driver"),
        ({"mountopt": "volatile"}, "use the volatile option"),
        ({"mountopt": "redirect_dir=on"}, "'redirect_dir=on' is refused.*redirect_dir=off"),
        ({"mountopt": "metacopy=on"}, "'metacopy=on' is refused"),
        ({"mountopt": "index=on"}, "'index=on' is refused"),
        ({"volatile": "maybe"}, "overlay option volatile: 'maybe' is not true or false"),
        ({"skip_mount_home": "true"}, "never mounts its home"),
    ],
)
def test_bad_options_are_refused_by_name(
    tmp_path: Path, options: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        OverlayDriver.probe(tmp_path, options)
    with pytest.raises(InvalidArgument, match=message):
        OverlayDriver(tmp_path / "home", options)


def test_native_settings_in_mountopt_are_the_drivers_own(tmp_path: Path) -> None:
    driver = OverlayDriver(tmp_path / "home", {"mountopt": "index=off,redirect_dir=off,nosuid"})
    chain(driver, 2)
    assert driver.mounts("e1", ["e0"], readonly=False)[0].options == (*NATIVE_OPTIONS, "nosuid")


def test_volatile_mounts_and_mounts_again(tmp_path: Path) -> None:
    """The kernel keeps work/work/incompat/volatile after a volatile mount and refuses the
    work dir while it is there; the driver clears it before the next mount."""
    driver = OverlayDriver(tmp_path / "home", {"volatile": "true"})
    chain(driver, 2)
    spec = driver.mounts("e1", ["e0"], readonly=False)[0]
    assert spec.options[-1] == "volatile"
    assert driver.mounts("e0", [], readonly=False)[0].type == "bind"  # nothing to make volatile
    flag = tmp_path / "home/layers/e1/work/work/incompat/volatile"
    with mounted_specs([spec], tmp_path / "mnt") as root:
        (root / "scratch").write_bytes(b"x")
        entry = {m.mount_point: m for m in _mountinfo.mountinfo()}[str(root)]
        assert "volatile" in entry.super_options
    assert flag.exists()
    for _ in range(2):
        specs = driver.mounts("e1", ["e0"], readonly=False)
        assert not flag.exists()
        with mounted_specs(specs, tmp_path / "mnt") as root:
            assert (root / "scratch").read_bytes() == b"x"


# --- probe ----------------------------------------------------------------------------------


def test_probe_passes_here_and_leaves_nothing(tmp_path: Path) -> None:
    OverlayDriver.probe(tmp_path / "not" / "yet", {})
    assert os.listdir(tmp_path) == []


def test_probe_refuses_overlay_on_overlay(driver: OverlayDriver, tmp_path: Path) -> None:
    chain(driver, 2)
    specs = driver.mounts("e1", ["e0"], readonly=False)
    with (
        mounted_specs(specs, tmp_path / "mnt") as root,
        pytest.raises(DriverUnavailable, match="is on overlayfs"),
    ):
        OverlayDriver.probe(root / "home", {})


def test_probe_refuses_a_filesystem_without_trusted_xattrs(tmp_path: Path) -> None:
    target = tmp_path / "ramfs"  # ramfs has no xattrs at all
    target.mkdir()
    _mounts.mount("none", str(target), "ramfs")
    try:
        with pytest.raises(DriverUnavailable, match=r"does not take trusted\.\* xattrs"):
            OverlayDriver.probe(target / "home", {})
        assert os.listdir(target) == []
    finally:
        _mounts.umount(str(target))


def test_probe_refuses_a_home_made_in_a_user_namespace(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "xattrs").write_text("user\n")
    with pytest.raises(DriverUnavailable, match="made in a user namespace"):
        OverlayDriver.probe(home, {})
    with pytest.raises(FailedPrecondition, match=r"user\.overlay"):
        OverlayDriver(home, {})


def test_probe_refuses_a_kernel_without_the_native_diff_options(tmp_path: Path) -> None:
    parameters = tmp_path / "parameters"  # what /sys/module/overlay/parameters holds
    parameters.mkdir()
    for name in ("index", "redirect_dir"):
        (parameters / name).write_text("N\n")
    with pytest.raises(DriverUnavailable, match="has no metacopy option"):
        check_kernel_options(False, parameters)
    (parameters / "metacopy").write_text("N\n")
    check_kernel_options(False, parameters)
    check_kernel_options(True, parameters)  # Linux 6.18 has userxattr
    check_kernel_options(False, tmp_path / "not-loaded")


def test_probe_refuses_without_privileges(tmp_path: Path) -> None:
    script = "from pathlib import Path; from laminae.drivers.overlay import OverlayDriver as D; "
    script += f"D.probe(Path({str(tmp_path / 'home')!r}), {{}})"
    os.chmod(tmp_path, 0o755)
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "needs root (CAP_SYS_ADMIN), or root of a user namespace" in result.stderr


# --- known failures -------------------------------------------------------------------------


def test_known_failures_follow_the_user_namespace_and_its_id_map() -> None:
    assert known_failures(user_namespace=False, ids=1 << 32).keys() == {
        "mounts::test_rename_directory"
    }
    one = known_failures(user_namespace=True, ids=1)
    assert "apply::test_devices" in one and "apply::test_xattrs" in one
    assert "mounts::test_chown" in one and "apply::test_regular_files" in one
    wide = known_failures(user_namespace=True, ids=65536)
    assert "mounts::test_chown" not in wide and "apply::test_regular_files" in wide
    assert _contiguous_from_zero("0 1000 1\n") == 1
    assert _contiguous_from_zero("1 100000 65535\n0 1000 1\n") == 65536
    assert _contiguous_from_zero("0 0 4294967295\n") == 4294967295


# --- apply ----------------------------------------------------------------------------------


def test_apply_writes_into_diff_without_mounting(driver: OverlayDriver, home: Path) -> None:
    chain(driver, 2)
    base = home / "layers/e0/diff"
    (base / "etc").mkdir()
    (base / "etc/gone").write_bytes(b"x")
    (base / "opt").mkdir()
    (base / "opt/old").write_bytes(b"x")
    before = _mountinfo.mount_points()
    tar = Layer().file("etc/.wh.gone").dir("opt").file("opt/.wh..wh..opq").file("new", b"n")
    driver.apply("e1", ["e0"], io.BytesIO(tar.bytes()), laminae.Limits())
    assert _mountinfo.mount_points() == before
    top = home / "layers/e1/diff"
    gone = os.lstat(top / "etc/gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert get_xattr(str(top / "opt"), OPAQUE) == b"y"
    assert (top / "new").read_bytes() == b"n"
    with pytest.raises(InvalidArgument, match=r"are not laminae\.Limits"):
        driver.apply("e1", ["e0"], io.BytesIO(b""), object())


def test_apply_refuses_overlay_xattrs_in_the_tar(store: laminae.Store) -> None:
    tar = Layer().file("f", b"x", xattrs={"trusted.overlay.redirect": "/etc"})
    with pytest.raises(
        InvalidArgument, match=r"layer tar entry 'f': xattr 'trusted\.overlay\.redirect'"
    ):
        store.apply_layer(io.BytesIO(tar.bytes()))
    assert store.layers() == []


# --- native changes against naive ones --------------------------------------------------------

Writer = Callable[[Path], object]
NS = 1_600_000_000_000_000_000


def move(source: str, destination: str) -> Writer:
    """``mv``: rename(2), which overlayfs refuses with EXDEV for a directory from a lower
    layer (no redirect_dir); coreutils then copies the tree with its attributes and removes
    the source. Done by ``mv`` itself, as a container would."""

    def write(root: Path) -> None:
        subprocess.run(["mv", "-T", root / source, root / destination], check=True)

    return write


def base_tree(root: Path) -> None:
    for directory in ("etc", "bin", "usr/lib/deep", "var/cache", "opt/app", "srv", "mode"):
        (root / directory).mkdir(parents=True)
    (root / "etc/passwd").write_bytes(b"root:x:0:0\n")
    (root / "etc/hosts").write_bytes(b"127.0.0.1 localhost\n")
    (root / "etc/gone").write_bytes(b"to delete")
    (root / "bin/busybox").write_bytes(b"\x7fELF busybox")
    os.link(root / "bin/busybox", root / "bin/sh")
    (root / "bin/ls").symlink_to("busybox")
    (root / "usr/lib/deep/libc.so").write_bytes(b"libc")
    (root / "usr/lib/keep").write_bytes(b"keep")
    (root / "var/cache/a").write_bytes(b"a")
    (root / "var/cache/b").write_bytes(b"b")
    (root / "opt/app/old").write_bytes(b"old")
    (root / "opt/app/sub").mkdir()
    (root / "opt/app/sub/deep").write_bytes(b"deep")
    (root / "srv/file-to-dir").write_bytes(b"a file")
    (root / "srv/dir-to-file").mkdir()
    (root / "srv/dir-to-file/child").write_bytes(b"child")
    (root / "mode/exec").write_bytes(b"#!/bin/sh\n")
    (root / "mode/xattr").write_bytes(b"x")
    (root / "mode/touched").write_bytes(b"t")
    (root / "mode/same").write_bytes(b"s")
    os.mkfifo(root / "mode/fifo")
    os.mknod(root / "mode/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (root / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    for path in [root, *root.rglob("*")]:
        os.utime(path, ns=(NS, NS), follow_symlinks=False)


def middle_tree(root: Path) -> None:
    (root / "etc/hosts").write_bytes(b"127.0.0.1 localhost box\n")  # modified
    os.unlink(root / "etc/gone")  # deleted file
    shutil.rmtree(root / "var/cache")  # deleted directory
    (root / "home/user").mkdir(parents=True)  # added directories
    (root / "home/user/.profile").write_bytes(b"PATH=/bin\n")
    os.chown(root / "home/user", 1000, 1000)
    shutil.rmtree(root / "opt/app")  # deleted and made again: opaque
    (root / "opt/app").mkdir()
    (root / "opt/app/new").write_bytes(b"new")


def top_tree(root: Path) -> None:
    move("etc/passwd", "etc/passwd.old")(root)  # renamed file
    move("usr/lib", "usr/lib64")(root)  # renamed lower directory (EXDEV: copied)
    move("home/user", "home/person")(root)  # renamed directory of the layer below
    os.link(root / "bin/busybox", root / "bin/ash")  # hardlink to a lower file
    (root / "bin/new-tool").write_bytes(b"tool")
    os.link(root / "bin/new-tool", root / "bin/tool-link")  # hardlinks within the layer
    os.chmod(root / "mode/exec", 0o755)  # mode only
    set_xattr(str(root / "mode/xattr"), b"user.tag", b"v")  # xattr only
    os.utime(root / "mode/touched", ns=(NS, NS + 1))  # mtime only
    os.chmod(root / "mode/same", 0o600)  # copied up, then back as it was: no change
    os.chmod(root / "mode/same", 0o644)
    os.unlink(root / "srv/file-to-dir")  # file -> directory
    (root / "srv/file-to-dir").mkdir()
    (root / "srv/file-to-dir/inside").write_bytes(b"inside")
    shutil.rmtree(root / "srv/dir-to-file")  # directory -> file
    (root / "srv/dir-to-file").write_bytes(b"now a file")
    (root / "var/cache").mkdir()  # deleted below, made again here
    (root / "var/cache/fresh").write_bytes(b"fresh")
    (root / "opt/app/newer").write_bytes(b"newer")  # inside the opaque directory below
    os.unlink(root / "opt/app/new")
    os.unlink(root / "mode/null")
    os.mknod(root / "mode/null", stat.S_IFCHR | 0o666, os.makedev(1, 5))  # other device
    os.unlink(root / "bin/ls")
    (root / "bin/ls").symlink_to("busybox-ls")  # symlink retargeted
    os.unlink(root / os.fsdecode(b"caf\xe9"))


def assert_native_is_naive(store: laminae.Store, layer: laminae.Layer) -> list[Change]:
    """The driver's changes and diff against naive_changes and write_changes_tar over
    mounts of the parent and the layer: the same list, the same bytes."""
    native = store.changes(layer.id)
    out = io.BytesIO()
    store.diff(layer.id, out)
    with contextlib.ExitStack() as stack:
        parent_root = None
        if layer.parent is not None:
            parent_root = stack.enter_context(mounted(store, layer.parent))
        root = stack.enter_context(mounted(store, layer.id))
        naive = list(naive_changes(parent_root, root))
        expected = io.BytesIO()
        write_changes_tar(root, naive, expected)
    assert native == naive
    assert out.getvalue() == expected.getvalue()
    return native


def commit(store: laminae.Store, parent: laminae.Layer | None, *writers: Writer) -> laminae.Layer:
    active = store.create_layer(parent=None if parent is None else parent.id)
    with mounted(store, active.id) as root:
        for write in writers:
            write(root)
    return store.commit_layer(active.id)


def test_native_changes_equal_naive_ones_byte_for_byte(store: laminae.Store) -> None:
    base = commit(store, None, base_tree)
    assert_native_is_naive(store, base)
    middle = commit(store, base, middle_tree)
    changes = {c.path: c.kind for c in assert_native_is_naive(store, middle)}
    assert changes["/etc/gone"] is ChangeKind.DELETED
    assert changes["/var/cache"] is ChangeKind.DELETED
    assert changes["/opt/app/old"] is ChangeKind.DELETED  # hidden by the opaque opt/app
    assert changes["/opt/app/sub"] is ChangeKind.DELETED
    assert changes["/opt/app/new"] is ChangeKind.ADDED
    assert changes["/home/user/.profile"] is ChangeKind.ADDED
    assert "/etc" not in changes  # copied up for its child, itself unchanged
    top = commit(store, middle, top_tree)
    changes = {c.path: c.kind for c in assert_native_is_naive(store, top)}
    expected = {
        "/bin/ash": ChangeKind.ADDED,
        "/bin/ls": ChangeKind.MODIFIED,
        "/bin/new-tool": ChangeKind.ADDED,
        "/bin/tool-link": ChangeKind.ADDED,
        "/" + os.fsdecode(b"caf\xe9"): ChangeKind.DELETED,
        "/etc/passwd": ChangeKind.DELETED,
        "/etc/passwd.old": ChangeKind.ADDED,
        "/home/person": ChangeKind.ADDED,
        "/home/person/.profile": ChangeKind.ADDED,
        "/home/user": ChangeKind.DELETED,
        "/mode/exec": ChangeKind.MODIFIED,
        "/mode/null": ChangeKind.MODIFIED,
        "/mode/touched": ChangeKind.MODIFIED,
        "/mode/xattr": ChangeKind.MODIFIED,
        "/opt/app/new": ChangeKind.DELETED,
        "/opt/app/newer": ChangeKind.ADDED,
        "/srv/dir-to-file": ChangeKind.MODIFIED,
        "/srv/file-to-dir": ChangeKind.MODIFIED,
        "/srv/file-to-dir/inside": ChangeKind.ADDED,
        "/usr/lib": ChangeKind.DELETED,
        "/usr/lib64": ChangeKind.ADDED,
        "/usr/lib64/deep": ChangeKind.ADDED,
        "/usr/lib64/deep/libc.so": ChangeKind.ADDED,
        "/usr/lib64/keep": ChangeKind.ADDED,
        "/var/cache": ChangeKind.ADDED,
        "/var/cache/fresh": ChangeKind.ADDED,
    }
    # Directories whose entries changed (home, usr, var...) may be reported modified too.
    assert {p: k for p, k in changes.items() if k is not ChangeKind.MODIFIED or p in expected} == (
        expected
    ), changes
    assert "/mode/same" not in changes and "/bin/busybox" not in changes


def test_native_changes_equal_naive_ones_on_applied_layers(store: laminae.Store) -> None:
    """Layers whose whiteouts and opaque flags apply_tar wrote, root opaque marker included."""
    base = store.apply_layer(
        io.BytesIO(
            Layer()
            .dir("a")
            .file("a/one", b"1")
            .file("a/two", b"2")
            .dir("b/c")
            .file("b/c/d", b"d")
            .file("top", b"t")
            .bytes()
        )
    )
    middle = store.apply_layer(
        io.BytesIO(
            Layer()
            .file("a/.wh.one")
            .dir("b", mode=0o700)
            .file("b/.wh..wh..opq")
            .file("b/new", b"n")
            .file(".wh.never-there")
            .file("a/two", b"two")
            .bytes()
        ),
        parent=base.id,
    )
    assert [(c.path, c.kind) for c in assert_native_is_naive(store, middle)] == [
        ("/a/one", ChangeKind.DELETED),
        ("/a/two", ChangeKind.MODIFIED),
        ("/b", ChangeKind.MODIFIED),
        ("/b/c", ChangeKind.DELETED),
        ("/b/new", ChangeKind.ADDED),
    ]
    top = store.apply_layer(
        io.BytesIO(Layer().dir("b").file("b/kept", b"k").file(".wh..wh..opq").bytes()),
        parent=middle.id,
    )
    assert [(c.path, c.kind) for c in assert_native_is_naive(store, top)] == [
        ("/a", ChangeKind.DELETED),
        ("/b", ChangeKind.MODIFIED),
        ("/b/kept", ChangeKind.ADDED),
        ("/b/new", ChangeKind.DELETED),
        ("/top", ChangeKind.DELETED),
    ]


def test_native_changes_of_an_active_layer(store: laminae.Store) -> None:
    base = commit(store, None, base_tree)
    active = store.create_layer("active", parent=base.id)
    with mounted(store, active.id) as root:
        (root / "etc/hosts").write_bytes(b"changed")
        os.unlink(root / "etc/gone")
    assert store.changes(active.id) == [
        Change("/etc/gone", ChangeKind.DELETED),
        Change("/etc/hosts", ChangeKind.MODIFIED),
    ]


# --- rootless -------------------------------------------------------------------------------

_ROOTLESS = textwrap.dedent(
    """
    import io, json, os, shutil, sys
    from pathlib import Path
    import laminae
    from laminae.drivers.overlay import OverlayDriver
    from laminae.drivers.overlay._driver import USERXATTR

    base = Path(sys.argv[1])
    store = laminae.open_store(base / "root", runroot=base / "run", driver="overlay")
    first = store.create_layer("first")
    path = store.mount("first")
    (path / "d").mkdir(); (path / "d" / "old").write_bytes(b"old"); (path / "f").write_bytes(b"f")
    store.unmount("first")
    first = store.commit_layer("first")
    second = store.create_layer("second", parent=first.id)
    path = store.mount("second")
    shutil.rmtree(path / "d"); (path / "d").mkdir(); (path / "d" / "new").write_bytes(b"n")
    os.unlink(path / "f")
    store.unmount("second")
    second = store.commit_layer("second")
    upper = base / "root" / "overlay" / "layers" / second.storage_id / "diff"
    out = io.BytesIO()
    store.diff(second.id, out)
    parent_root, root = store.mount(first.id), store.mount(second.id)
    naive = list(laminae.naive_changes(parent_root, root))
    expected = io.BytesIO()
    laminae.write_changes_tar(root, naive, expected)
    store.unmount(first.id); store.unmount(second.id)
    native = store.changes(second.id)
    print(json.dumps({
        "userxattr": USERXATTR,
        "changes": [[c.path, c.kind.value] for c in native],
        "same_changes": native == naive,
        "same_bytes": out.getvalue() == expected.getvalue(),
        "opaque": os.getxattr(upper / "d", "user.overlay.opaque").decode(),
        "known": sorted(dict(OverlayDriver.capabilities.known_failures)),
        "xattrs": (base / "root" / "overlay" / "xattrs").read_text(),
    }))
    store.close()
    """
)


def test_rootless_in_a_user_namespace(tmp_path: Path) -> None:
    """In ``unshare --user --map-root-user --mount`` the driver mounts with userxattr and
    keeps opaque flags in user.overlay.*; the native changes read them."""
    result = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            _ROOTLESS,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["userxattr"] is True
    assert report["changes"] == [["/d/new", "added"], ["/d/old", "deleted"], ["/f", "deleted"]]
    assert report["same_changes"] and report["same_bytes"]
    assert report["opaque"] == "y"
    assert report["xattrs"] == "user\n"
    assert {"apply::test_devices", "apply::test_xattrs", "mounts::test_chown"} <= set(
        report["known"]
    )
    # Outside the namespace the store is refused: its flags are not where overlayfs looks.
    with pytest.raises(DriverUnavailable, match="made in a user namespace"):
        laminae.open_store(tmp_path / "root", runroot=tmp_path / "run", driver="overlay")


# --- native against naive on random changes ---------------------------------------------------

_NAMES = ("a", "b", "c", "dd", "e", os.fsdecode(b"f\xff"))


def _entries(root: Path) -> tuple[list[Path], list[Path]]:
    """(directories including the root, non-directories) below ``root``."""
    dirs, others = [root], []
    for path in sorted(root.rglob("*")):
        (dirs if path.is_dir() and not path.is_symlink() else others).append(path)
    return dirs, others


def random_change(root: Path, rng: random.Random) -> None:
    """One change a container might make, on a random path of the mounted layer."""
    dirs, others = _entries(root)
    shallow = [d for d in dirs if len(d.relative_to(root).parts) < 4]
    where = rng.choice(shallow) / rng.choice(_NAMES)
    # Mostly growth, so that the trees get deep enough for removals to matter.
    weights = (8, 6, 2, 1, 0.5, 1, 1, 1, 2, 1, 1, 0.5, 0.3, 1, 1, 1)
    action = rng.choices(range(len(weights)), weights=weights)[0]
    if action == 0 and not os.path.lexists(where):
        where.write_bytes(rng.randbytes(rng.randrange(3)))
    elif action == 1 and not os.path.lexists(where):
        where.mkdir()
    elif action == 2 and others:
        target = rng.choice(others)
        if target.is_file() and not target.is_symlink():
            target.write_bytes(rng.randbytes(rng.randrange(3)))
    elif action == 3 and others:
        rng.choice(others).unlink()
    elif action == 4 and len(dirs) > 1:
        shutil.rmtree(rng.choice(dirs[1:]))
    elif action == 5:
        target = rng.choice([*dirs[1:], *others] or [root])
        if target != root and not target.is_symlink():
            os.chmod(target, rng.choice((0o755, 0o700, 0o644, 0o4755)))
    elif action == 6 and others:
        target = rng.choice(others)
        if not target.is_symlink():
            os.utime(target, ns=(NS, NS + rng.randrange(2)))
    elif action == 7:
        target = rng.choice([*dirs[1:], *others] or [root])
        if target != root and (target.is_file() or target.is_dir()) and not target.is_symlink():
            set_xattr(str(target), b"user.k", rng.choice((b"1", b"2")))  # files and dirs only
    elif action == 8 and not os.path.lexists(where):
        source = rng.choice([*dirs[1:], *others] or [root])
        if source != root and source not in where.parents:
            move(str(source.relative_to(root)), str(where.relative_to(root)))(root)
    elif action == 9 and others and not os.path.lexists(where):
        target = rng.choice(others)
        if target.is_file() and not target.is_symlink():
            os.link(target, where)
    elif action == 10 and not os.path.lexists(where):
        where.symlink_to(rng.choice(_NAMES))
    elif action == 11 and others:
        target = rng.choice(others)  # a file becomes a directory
        target.unlink()
        target.mkdir()
    elif action == 12 and len(dirs) > 1:
        target = rng.choice(dirs[1:])  # a directory becomes a file
        shutil.rmtree(target)
        target.write_bytes(b"was a directory")
    elif action == 13:
        target = rng.choice([*dirs[1:], *others] or [root])
        if target != root:
            os.chown(target, rng.choice((0, 1000)), rng.choice((0, 1000)), follow_symlinks=False)
    elif action == 14 and not os.path.lexists(where):
        if rng.randrange(2):
            os.mknod(where, stat.S_IFCHR | 0o600, os.makedev(1, rng.choice((3, 5))))
        else:
            os.mkfifo(where)
    elif action == 15 and others:
        target = rng.choice(others)  # copied up, nothing changed
        if target.is_file() and not target.is_symlink():
            os.close(os.open(target, os.O_WRONLY))


@pytest.mark.parametrize("seed", range(20))
def test_native_changes_equal_naive_ones_on_random_changes(
    store: laminae.Store, tmp_path: Path, seed: int
) -> None:
    """Layers written through mounts, and their diffs applied in a second store: native
    and naive agree on both, and the copies' diffs are the originals' byte for byte."""
    rng = random.Random(seed)
    parent = copy = None
    with laminae.open_store(
        tmp_path / "copy", runroot=tmp_path / "copy-run", driver="overlay"
    ) as elsewhere:
        for _ in range(4):
            active = store.create_layer(parent=None if parent is None else parent.id)
            with mounted(store, active.id) as root:
                for _ in range(80):
                    random_change(root, rng)
            parent = store.commit_layer(active.id)
            assert_native_is_naive(store, parent)
            data = io.BytesIO()
            store.diff(parent.id, data)
            copy = elsewhere.apply_layer(
                io.BytesIO(data.getvalue()), parent=None if copy is None else copy.id
            )
            assert copy.id == parent.id
            again = io.BytesIO()
            elsewhere.diff(copy.id, again)
            assert again.getvalue() == data.getvalue()
            assert_native_is_naive(elsewhere, copy)


# --- direct apply against vfs on random tars --------------------------------------------------

_DIRS = ("a", "b", "c")
_LEAVES = ("f", "g", "h", "a")  # one is also a directory name: type changes


def random_tar(rng: random.Random, entries: int) -> bytes:
    """A layer tar of random entries, whiteouts and opaque markers included.

    Symlinks take names no path goes through: a path through a lower layer's symlink is
    resolved in the lower tree by an extractor over a full copy (vfs) but not by overlayfs,
    a difference every overlay extractor shares (containerd's and Moby's too). Every entry
    comes after its parent directories, as diff tools write them: with an opaque marker
    after entries below a lower directory that has no entry of its own, DELETE mode removes
    those entries with the directory (as containerd's naive apply does) where overlayfs
    keeps them.
    """
    layer = Layer()
    files: list[str] = []
    for _ in range(entries):
        parts = [rng.choice(_DIRS) for _ in range(rng.randrange(3))]
        for depth in range(1, len(parts) + 1):
            layer.dir("/".join(parts[:depth]))  # parents first, as diff tools write them
        prefix = "".join(part + "/" for part in parts)
        kind = rng.choices(range(7), weights=(5, 3, 2, 1, 1, 1, 1))[0]
        if kind == 0:
            path = prefix + rng.choice(_LEAVES)
            layer.file(path, rng.randbytes(2), mode=rng.choice((0o644, 0o600)))
            files.append(path)
        elif kind == 1:
            layer.dir(prefix + rng.choice(_DIRS), mode=rng.choice((0o755, 0o700)))
        elif kind == 2:
            layer.file(prefix + ".wh." + rng.choice((*_DIRS, *_LEAVES)))
        elif kind == 3:
            layer.file(prefix + ".wh..wh..opq")
        elif kind == 4:
            layer.symlink(prefix + rng.choice(("s", "t")), rng.choice(_DIRS))
        elif kind == 5 and files:
            layer.hardlink(prefix + rng.choice(("h", "f")), rng.choice(files))
        elif kind == 6:
            layer.fifo(prefix + rng.choice(_LEAVES))
    return layer.bytes()


@pytest.mark.parametrize("seed", range(20))
def test_applied_layers_match_vfs_on_random_tars(
    store: laminae.Store, tmp_path: Path, seed: int
) -> None:
    """Whiteouts as overlayfs markers read against the parents (overlay) and whiteouts as
    deletions on a full copy (vfs) give the same trees, and refuse the same tars."""
    from laminae.conformance._tree import assert_same_tree

    rng = random.Random(seed)
    parent = copy = None
    applied = 0
    with laminae.open_store(tmp_path / "vfs", runroot=tmp_path / "vfs-run", driver="vfs") as vfs:
        for number in range(12):
            if applied == 4:
                break
            data = random_tar(rng, 30)
            results: list[laminae.Layer | str] = []
            for target, below in ((store, parent), (vfs, copy)):
                try:
                    results.append(
                        target.apply_layer(
                            io.BytesIO(data), parent=None if below is None else below.id
                        )
                    )
                except InvalidArgument as exc:
                    results.append(str(exc))
            layer, flat = results
            if isinstance(layer, str) or isinstance(flat, str):
                assert layer == flat, "one driver refused a tar the other took"
                continue
            applied += 1
            with mounted(store, layer.id) as got, mounted(vfs, flat.id) as want:
                assert_same_tree(want, got, mtimes=True, what=f"layer {number}")
            assert_native_is_naive(store, layer)
            parent, copy = layer, flat
    assert applied >= 3, "the random tars were mostly refused: the test shows little"


# --- detached apply against the sequential one --------------------------------------------------

_LOOSE_NAMES = (*_DIRS, "f", "g")


def loose_tar(rng: random.Random, entries: int) -> bytes:
    """A layer tar as no diff tool writes one, to reach every rule the lowers decide.

    Parent directories are left out half the time (made by the applier, and given the
    lowers' attributes), opaque markers and whiteouts go anywhere, directories get setgid
    and sticky modes, owners and xattrs, symlinks take directory names (paths go through
    them), and hard links may name a file of a lower layer.
    """
    layer = Layer()
    files: list[str] = []

    def dir_attributes() -> dict[str, object]:
        attributes: dict[str, object] = {
            "mode": rng.choice((0o755, 0o700, 0o1777, 0o2775)),
            "uid": rng.choice((0, 1000)),
            "gid": rng.choice((0, 50)),
            "mtime": rng.choice((1_600_000_000, 1_700_000_000)),
        }
        if rng.randrange(3) == 0:
            attributes["xattrs"] = {"user.k": rng.choice(("1", "2"))}
        return attributes

    for _ in range(entries):
        kind = rng.choices(range(8), weights=(5, 3, 3, 2, 1, 1, 1, 1))[0]
        # Mostly below the root: an opaque marker there always needs the parents.
        parts = [
            rng.choice(_DIRS) for _ in range(rng.randrange(kind != 3 or rng.random() < 0.9, 4))
        ]
        # Whiteouts and markers mostly in a directory the tar makes first: elsewhere the
        # sequential apply makes that directory only if the lowers show what they hide.
        if rng.random() < (0.9 if kind in (2, 3) else 0.5):
            for depth in range(1, len(parts) + 1):
                layer.dir("/".join(parts[:depth]), **dir_attributes())
        prefix = "".join(part + "/" for part in parts)
        if kind == 0:
            path = prefix + rng.choice(_LOOSE_NAMES)
            layer.file(path, rng.randbytes(2), mode=rng.choice((0o644, 0o4755)))
            files.append(path)
        elif kind == 1:
            layer.dir(prefix + rng.choice(_LOOSE_NAMES), **dir_attributes())
        elif kind == 2:
            layer.file(prefix + ".wh." + rng.choice(_LOOSE_NAMES), uid=rng.choice((0, 7)))
        elif kind == 3:
            layer.file(prefix + ".wh..wh..opq")
        elif kind == 4:
            layer.symlink(prefix + rng.choice(("s", *_DIRS)), rng.choice((*_DIRS, "/b", "..")))
        elif kind == 5:
            target = rng.choice(files) if files and rng.randrange(8) else prefix + "f"
            layer.hardlink(prefix + "h", target)
        elif kind == 6:
            layer.fifo(prefix + rng.choice(_LOOSE_NAMES))
        else:
            layer.char(prefix + rng.choice(_LOOSE_NAMES), 1, 3)
    return layer.bytes()


def layer_tree(root: Path, since_ns: int) -> dict[bytes, tuple[object, ...]]:
    """Everything of a layer dir, read with ``os.*``: names, types, modes, owners, device
    numbers, link counts and hard-link groups, xattrs (``trusted.overlay.*`` included),
    symlink targets, content and times. Times from ``since_ns`` on (a whiteout or directory
    made now, by either apply, never timed from a tar or a lower) are left out."""
    paths = [os.fsencode(root)]
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        paths.extend(os.path.join(dirpath, name) for name in (*dirnames, *filenames))
    paths.sort()
    first_of_inode: dict[int, bytes] = {}
    tree: dict[bytes, tuple[object, ...]] = {}
    prefix = len(os.fsencode(root))
    for path in paths:
        st = os.lstat(path)
        relative = path[prefix:] or b"/"
        kind = stat.S_IFMT(st.st_mode)
        mtime: int | None = st.st_mtime_ns
        if st.st_mtime_ns >= since_ns:
            mtime = None
        content: object = None
        if stat.S_ISREG(st.st_mode):
            content = Path(os.fsdecode(path)).read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        xattrs = sorted(
            (name, os.getxattr(path, name, follow_symlinks=False))
            for name in os.listxattr(path, follow_symlinks=False)
        )
        group = first_of_inode.setdefault(st.st_ino, relative) if st.st_nlink > 1 else None
        tree[relative] = (
            kind,
            oct(stat.S_IMODE(st.st_mode)),
            st.st_uid,
            st.st_gid,
            st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else None,
            st.st_nlink,
            group,
            mtime,
            xattrs,
            content,
        )
    return tree


def assert_same_layer_dirs(want: Path, got: Path, since_ns: int, what: str) -> None:
    expected, actual = layer_tree(want, since_ns), layer_tree(got, since_ns)
    differences = [
        f"{path!r}: sequential {expected.get(path)} detached {actual.get(path)}"
        for path in sorted(expected.keys() | actual.keys())
        if expected.get(path) != actual.get(path)
    ]
    assert not differences, f"{what}:\n  " + "\n  ".join(differences[:20])


@attrs.define
class ChainOutcome:
    """What applying a chain of tars did: per layer, ``None`` (applied) or the error text;
    and how the detached side applied each (``detached``, ``fallback``)."""

    results: list[str | None] = attrs.Factory(list)
    ways: list[str] = attrs.Factory(list)
    recorded: collections.Counter[str] = attrs.Factory(collections.Counter)


def apply_sequential(driver: OverlayDriver, tars: list[bytes]) -> ChainOutcome:
    outcome = ChainOutcome()
    for number, data in enumerate(tars):
        id, parents = f"e{number}", [f"e{n}" for n in reversed(range(number))]
        driver.create(id, parents, writable=True)
        try:
            driver.apply(id, parents, io.BytesIO(data), laminae.Limits())
        except InvalidArgument as exc:
            outcome.results.append(str(exc))
            break
        outcome.results.append(None)
    return outcome


def apply_detached(driver: OverlayDriver, tars: list[bytes]) -> ChainOutcome:
    """Every tar applied detached in its own thread at once, then settled base first; a
    layer that needs its parents is removed and applied the sequential way."""
    ids = [f"e{number}" for number in range(len(tars))]
    for number, id in enumerate(ids):
        driver.create(id, list(reversed(ids[:number])), writable=True)

    def detached(number: int) -> object:
        try:
            return driver.apply_detached(ids[number], io.BytesIO(tars[number]), laminae.Limits())
        except (ParentsNeeded, InvalidArgument) as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(tars)) as pool:
        pending = list(pool.map(detached, range(len(tars))))
    outcome = ChainOutcome()
    for number, id in enumerate(ids):
        parents = list(reversed(ids[:number]))
        state = pending[number]
        try:
            if isinstance(state, InvalidArgument):
                raise state
            if not isinstance(state, ParentsNeeded):
                assert isinstance(state, Unsettled)
                outcome.recorded.update(
                    whiteouts=len(state.whiteouts),
                    opaque=len(state.opaque),
                    implicit=len(state.implicit),
                )
                try:
                    driver.settle(id, parents, state)
                    outcome.ways.append("detached")
                except ParentsNeeded:
                    state = None
            if isinstance(state, ParentsNeeded) or state is None:
                driver.remove(id)
                driver.create(id, parents, writable=True)
                driver.apply(id, parents, io.BytesIO(tars[number]), laminae.Limits())
                outcome.ways.append("fallback")
        except InvalidArgument as exc:
            outcome.results.append(str(exc))
            break
        outcome.results.append(None)
    return outcome


def compare_chains(tmp_path: Path, tars: list[bytes]) -> ChainOutcome:
    """Apply ``tars`` as a chain sequentially and detached; the outcomes and every applied
    layer's ``diff/`` must be the same."""
    since = time.time_ns() - 1_000_000_000
    sequential = OverlayDriver(tmp_path / "sequential", {})
    detached = OverlayDriver(tmp_path / "detached", {})
    want = apply_sequential(sequential, tars)
    got = apply_detached(detached, tars)
    assert got.results == want.results
    for number, result in enumerate(want.results):
        if result is None:
            assert_same_layer_dirs(
                tmp_path / f"sequential/layers/e{number}/diff",
                tmp_path / f"detached/layers/e{number}/diff",
                since,
                f"layer {number}",
            )
    return got


def test_overlay_declares_detached_apply(driver: OverlayDriver) -> None:
    caps = OverlayDriver.capabilities
    assert Feature.APPLY_DETACHED in caps.features and caps.independent_layers
    assert isinstance(driver, DetachedApplier)


@pytest.mark.parametrize("seed", range(30))
def test_detached_apply_equals_sequential_on_random_tars(tmp_path: Path, seed: int) -> None:
    """Random chains of 2-4 layers, diff-tool tars and loose ones, applied both ways."""
    rng = random.Random(seed)
    count = rng.randrange(2, 5)
    if seed % 2:
        tars = [random_tar(rng, rng.randrange(10, 40)) for _ in range(count)]
    else:
        tars = [loose_tar(rng, rng.randrange(8, 20)) for _ in range(count)]
    compare_chains(tmp_path, tars)


def test_most_random_layers_settle_detached(tmp_path: Path) -> None:
    """The random chains above mostly go the detached way: the comparison shows something."""
    ways: list[str] = []
    for seed in range(12):
        rng = random.Random(1000 + seed)
        tars: list[bytes] = []
        while len(tars) < 3:
            data = random_tar(rng, 30)
            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                if ".wh..wh..opq" not in archive.getnames():  # at the root: parents needed
                    tars.append(data)
        ways.extend(compare_chains(tmp_path / str(seed), tars).ways)
    assert ways.count("detached") >= 0.8 * len(ways), ways


def test_loose_layers_settle_detached_often_and_with_work_to_do(tmp_path: Path) -> None:
    """Loose tars need their parents more often, yet many settle detached, and the settle
    step has made parents, whiteouts and opaque flags to judge."""
    ways: list[str] = []
    recorded: collections.Counter[str] = collections.Counter()
    for seed in range(12):
        rng = random.Random(2000 + seed)
        outcome = compare_chains(tmp_path / str(seed), [loose_tar(rng, 12) for _ in range(3)])
        ways.extend(outcome.ways)
        recorded.update(outcome.recorded)
    assert ways.count("detached") >= 0.4 * len(ways), ways
    assert min(recorded["whiteouts"], recorded["opaque"], recorded["implicit"]) >= 5, recorded


_BASE = (
    Layer()
    .dir("etc")
    .file("etc/gone", b"g")
    .dir("opt")
    .file("opt/old", b"o")
    .file("x", b"a file")
    .dir("tmp", mode=0o1777, uid=0, gid=0, mtime=1_500_000_000, xattrs={"user.k": "lower"})
    .bytes()
)


def _whiteout_at(diff: Path, path: str) -> bool:
    try:
        st = os.lstat(diff / path)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@pytest.mark.parametrize(
    ("top", "ways", "check"),
    [
        pytest.param(
            Layer().dir("etc").file("etc/.wh.gone"),
            ["detached", "detached"],
            lambda d: _whiteout_at(d, "etc/gone"),
            id="whiteout-of-a-lower-file",
        ),
        pytest.param(
            Layer().dir("etc").file("etc/.wh.never-there").file(".wh.nor-this"),
            ["detached", "detached"],
            lambda d: os.listdir(d) == ["etc"] and os.listdir(d / "etc") == [],
            id="whiteout-of-a-name-no-lower-has",
        ),
        pytest.param(
            Layer().dir("opt").file("opt/.wh..wh..opq").file("opt/new", b"n"),
            ["detached", "detached"],
            lambda d: get_xattr(str(d / "opt"), OPAQUE) == b"y",
            id="opaque-over-a-lower-dir",
        ),
        pytest.param(
            Layer().dir("srv").file("srv/.wh..wh..opq").file("srv/new", b"n"),
            ["detached", "detached"],
            lambda d: get_xattr(str(d / "srv"), OPAQUE) is None,
            id="opaque-over-nothing",
        ),
        pytest.param(
            Layer().dir("x", mode=0o700).file("x/inside", b"i").file("x/.wh.y"),
            ["detached", "detached"],
            lambda d: get_xattr(str(d / "x"), OPAQUE) is None and os.listdir(d / "x") == ["inside"],
            id="dir-replacing-a-lower-file",
        ),
        pytest.param(
            Layer().file("tmp/cache/file", b"f"),
            ["detached", "detached"],
            lambda d: (
                stat.S_IMODE(os.lstat(d / "tmp").st_mode) == 0o1777
                and os.lstat(d / "tmp").st_mtime_ns == 1_500_000_000 * 10**9
                and os.getxattr(d / "tmp", "user.k") == b"lower"
                and stat.S_IMODE(os.lstat(d / "tmp/cache").st_mode) == 0o755
            ),
            id="implicit-parents-under-a-lower-1777-dir",
        ),
        pytest.param(
            Layer()
            .file("tmp/made/file", b"f")
            .dir("tmp", mode=0o755, uid=7, xattrs={"user.own": "top"}),
            ["detached", "detached"],
            lambda d: (
                (stat.S_IMODE(os.lstat(d / "tmp").st_mode), os.lstat(d / "tmp").st_uid)
                == (0o755, 7)
                and os.getxattr(d / "tmp", "user.k") == b"lower"
                and os.getxattr(d / "tmp", "user.own") == b"top"
            ),
            id="implicit-parent-then-its-own-entry",
        ),
        pytest.param(
            Layer().dir("opt").file("opt/.wh..wh..opq").file("opt/.wh.old"),
            ["detached", "detached"],
            lambda d: os.listdir(d / "opt") == [] and get_xattr(str(d / "opt"), OPAQUE) == b"y",
            id="whiteout-below-an-opaque-dir",
        ),
        pytest.param(
            Layer().dir("opt").file("opt/.wh.old").file("opt/.wh..wh..opq"),
            ["detached", "detached"],
            lambda d: os.listdir(d / "opt") == [],
            id="whiteout-then-opaque-marker",
        ),
        pytest.param(
            Layer().file("x/below", b"b"),
            ["detached"],
            None,
            id="path-through-a-lower-file",
        ),
        pytest.param(
            Layer().file(".wh..wh..opq").file("new", b"n"),
            ["detached", "fallback"],
            lambda d: _whiteout_at(d, "etc") and _whiteout_at(d, "tmp"),
            id="root-opaque-marker",
        ),
        pytest.param(
            Layer().dir("etc").hardlink("etc/again", "etc/gone"),
            ["detached", "fallback"],
            lambda d: os.lstat(d / "etc/again").st_nlink == 2,
            id="hard-link-to-a-lower-file",
        ),
    ],
)
def test_detached_apply_hard_cases(
    tmp_path: Path, top: Layer, ways: list[str], check: Callable[[Path], bool] | None
) -> None:
    """Base layer, then one layer that needs the lowers; both applied both ways."""
    outcome = compare_chains(tmp_path, [_BASE, top.bytes()])
    assert outcome.ways == ways
    if check is None:
        assert outcome.results == [
            None,
            "layer tar entry 'x/below': a component of 'x' is not a directory",
        ]
    else:
        assert outcome.results == [None, None]
        assert check(tmp_path / "detached/layers/e1/diff")


def test_parents_needed_is_raised_by_the_detached_apply(driver: OverlayDriver) -> None:
    driver.create("e0", [], writable=True)
    for tar, reason in (
        (Layer().file(".wh..wh..opq"), "opaque marker at the root"),
        (Layer().hardlink("again", "etc/gone"), "a hard link to 'etc/gone'"),
        (Layer().file("nowhere/.wh.x"), "a whiteout in 'nowhere'"),
        (Layer().file("nowhere/.wh..wh..opq"), "an opaque marker in 'nowhere'"),
    ):
        with pytest.raises(ParentsNeeded, match=reason):
            driver.apply_detached("e0", io.BytesIO(tar.bytes()), laminae.Limits())
    with pytest.raises(ParentsNeeded, match="limit max_entries"):
        driver.apply_detached(
            "e0",
            io.BytesIO(Layer().file("a/b/c/d", b"").bytes()),
            laminae.Limits(max_entries=2),
        )


def test_a_base_layer_applied_detached_has_nothing_to_settle(driver: OverlayDriver) -> None:
    driver.create("e0", [], writable=True)
    pending = driver.apply_detached(
        "e0",
        io.BytesIO(Layer().dir("a").file("a/.wh.b").file("c/d", b"").bytes()),
        laminae.Limits(),
    )
    assert isinstance(pending, Unsettled) and not pending.settled_already
    assert pending.whiteouts == (b"a/b",) and [m.path for m in pending.implicit] == [b"c"]
    driver.settle("e0", [], pending)
    with pytest.raises(InvalidArgument, match="is not what apply_detached returned"):
        driver.settle("e0", [], object())
