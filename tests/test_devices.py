"""Device nodes from layers cannot reach host hardware.

Every mount the store makes is ``nodev``, whatever the driver; a layer's character and block
devices are made, skipped or refused as ``Limits.devices`` (``storage.devices``) says; rootless,
they are skipped. The test devices use major 240-254, which Linux reserves for local and
experimental use, so no host driver answers if one were opened.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from tarbuild import Layer

import laminae
from laminae import InvalidArgument, Limits, load_config
from laminae.archive._apply import WhiteoutMode, apply_tar
from laminae.archive._limits import DevicePolicy
from laminae.driverkit import MountSpec
from laminae.driverkit._mount import mounted
from laminae.kernel._mountinfo import mountinfo

_CHAR = (240, 1)
_BLOCK = (250, 7)


def _device_tar() -> bytes:
    return (
        Layer()
        .dir("dev")
        .char("dev/mem", *_CHAR, mode=0o666)
        .block("dev/sda", *_BLOCK, mode=0o660, gid=6)
        .hardlink("dev/mem-link", "dev/mem")
        .fifo("dev/pipe", mode=0o644)
        .file("etc/hostname", b"box\n")
        .bytes()
    )


@pytest.fixture(params=["vfs", "overlay"])
def driver_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _store(root: Path, driver: str, policy: DevicePolicy | str) -> laminae.Store:
    return laminae.open_store(
        root / "root", runroot=root / "run", driver=driver, limits=Limits(devices=policy)
    )


@pytest.fixture
def any_driver_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[laminae.Store, str]]:
    """A store of the parametrized driver; btrfs on a loop-mounted btrfs."""
    name = request.param
    base = request.getfixturevalue("btrfs") if name == "btrfs" else tmp_path
    with laminae.open_store(base / "store", runroot=tmp_path / "run", driver=name) as store:
        yield store, name
        for layer in store.layers():
            if layer.mount_count:
                store.unmount(layer.id, force=True)


# --- the devices policy ---------------------------------------------------------------------


def test_create_makes_the_nodes_with_the_tars_numbers_owner_and_mode(
    tmp_path: Path, driver_name: str
) -> None:
    with _store(tmp_path, driver_name, "create") as store:
        layer = store.apply_layer(io.BytesIO(_device_tar()))
        root = store.mount(layer.id, readonly=True)
        try:
            mem, sda = os.lstat(root / "dev/mem"), os.lstat(root / "dev/sda")
            assert stat.S_ISCHR(mem.st_mode) and os.major(mem.st_rdev) == _CHAR[0]
            assert stat.S_IMODE(mem.st_mode) == 0o666
            assert stat.S_ISBLK(sda.st_mode) and os.major(sda.st_rdev) == _BLOCK[0]
            assert (sda.st_gid, stat.S_IMODE(sda.st_mode)) == (6, 0o660)
            assert os.path.samefile(root / "dev/mem", root / "dev/mem-link")
            # The mount is nodev: opening the node fails before any driver is asked.
            with pytest.raises(PermissionError):
                os.open(root / "dev/mem", os.O_RDONLY)
        finally:
            store.unmount(layer.id)


def test_skip_makes_no_device_and_keeps_the_rest(tmp_path: Path, driver_name: str) -> None:
    with _store(tmp_path, driver_name, DevicePolicy.SKIP) as store:
        layer = store.apply_layer(io.BytesIO(_device_tar()))
        root = store.mount(layer.id, readonly=True)
        try:
            names = sorted(p.name for p in (root / "dev").iterdir())
            assert names == ["pipe"]  # the hard link to a skipped node goes with it
            assert stat.S_ISFIFO(os.lstat(root / "dev/pipe").st_mode)
            assert (root / "etc/hostname").read_bytes() == b"box\n"
        finally:
            store.unmount(layer.id)


def test_refuse_fails_the_layer_naming_the_entry(tmp_path: Path, driver_name: str) -> None:
    with _store(tmp_path, driver_name, "refuse") as store:
        with pytest.raises(InvalidArgument, match=r"'dev/mem'.*devices policy is 'refuse'"):
            store.apply_layer(io.BytesIO(_device_tar()))
        assert store.layers() == []
        # FIFOs are no devices.
        plain = Layer().fifo("pipe").bytes()
        assert store.apply_layer(io.BytesIO(plain)).id


def test_skip_counts_in_the_apply_result(tmp_path: Path) -> None:
    tar = io.BytesIO(_device_tar())
    result = apply_tar(tmp_path, tar, limits=Limits(devices="skip"))
    assert result.devices_skipped == 3  # mem, sda and the hard link to mem
    assert sorted(p.name for p in (tmp_path / "dev").iterdir()) == ["pipe"]
    assert apply_tar(tmp_path / "dev", io.BytesIO(_device_tar())).devices_skipped == 0


def test_a_path_made_again_is_no_longer_skipped(tmp_path: Path) -> None:
    tar = Layer().char("x", *_CHAR).file("x", b"file").hardlink("y", "x").bytes()
    result = apply_tar(tmp_path, io.BytesIO(tar), limits=Limits(devices="skip"))
    assert result.devices_skipped == 1
    assert (tmp_path / "y").read_bytes() == b"file"


def test_overlay_whiteouts_are_not_devices(tmp_path: Path) -> None:
    """OVERLAY mode writes 0:0 whiteouts whatever the policy."""
    lower = tmp_path / "lower"
    upper = tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    (lower / "gone").write_bytes(b"x")
    tar = Layer().file(".wh.gone").char("dev-node", *_CHAR).bytes()
    result = apply_tar(
        upper,
        io.BytesIO(tar),
        limits=Limits(devices="skip"),
        whiteouts=WhiteoutMode.OVERLAY,
        parent_roots=[lower],
    )
    assert result.devices_skipped == 1
    st = os.lstat(upper / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert not (upper / "dev-node").exists()
    with pytest.raises(InvalidArgument, match="'dev-node'"):
        apply_tar(
            tmp_path / "lower",
            io.BytesIO(Layer().file(".wh.gone").char("dev-node", *_BLOCK).bytes()),
            limits=Limits(devices="refuse"),
        )


def test_a_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="'sometimes'"):
        Limits(devices="sometimes")


_ROOTLESS = textwrap.dedent(
    """
    import io, json, os, sys
    from pathlib import Path
    from laminae.archive._apply import apply_tar
    root = Path(sys.argv[1])
    result = apply_tar(root, sys.stdin.buffer)
    print(json.dumps([result.devices_skipped, sorted(os.listdir(root / "dev"))]))
    """
)


def test_rootless_skips_devices(tmp_path: Path) -> None:
    """In a user namespace no device can be made: they are skipped, as the peers do."""
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", _ROOTLESS, str(tmp_path)],
        input=_device_tar(),
        capture_output=True,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == '[3, ["pipe"]]'


# --- the configuration ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["create", "skip", "refuse"])
def test_storage_devices_is_read(tmp_path: Path, value: str) -> None:
    path = tmp_path / "storage.toml"
    path.write_text(f'[storage]\ndevices = "{value}"\n[storage.limits]\nmax_entries = 9\n')
    limits = load_config(path, environ={}).limits
    assert (limits.devices, limits.max_entries) == (DevicePolicy(value), 9)


def test_storage_devices_defaults_to_create(tmp_path: Path) -> None:
    path = tmp_path / "storage.toml"
    path.write_text("[storage]\n")
    assert load_config(path, environ={}).limits.devices is DevicePolicy.CREATE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[storage]\ndevices = "never"\n', r"'storage\.devices': expected one of .*'never'"),
        ("[storage]\ndevices = true\n", r"'storage\.devices': expected one of .*True"),
        ('[storage.limits]\ndevices = "skip"\n', r"unknown key 'storage\.limits\.devices'"),
    ],
)
def test_a_bad_storage_devices_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "storage.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=f"{path}: {message}"):
        load_config(path, environ={})


# --- nodev on every mount -------------------------------------------------------------------


def _options(point: Path) -> set[str]:
    # The last mount at the point is the one a path lookup sees.
    info = [m for m in mountinfo() if m.mount_point == str(point)][-1]
    return set(info.options.split(","))


@pytest.mark.parametrize("any_driver_store", ["vfs", "overlay", "btrfs"], indirect=True)
def test_every_driver_mounts_nodev(any_driver_store: tuple[laminae.Store, str]) -> None:
    store, name = any_driver_store
    base = store.apply_layer(io.BytesIO(Layer().file("a", b"a").bytes()))
    top = store.create_layer("top", parent=base.id)
    empty = store.create_layer("empty")
    for layer_id, readonly in (
        (base.id, True),
        (base.id, False),
        (top.id, False),
        ("empty", False),
    ):
        point = store.mount(layer_id, readonly=readonly)
        try:
            assert "nodev" in _options(point), (name, layer_id, readonly)
        finally:
            store.unmount(layer_id)
    assert empty.id


def test_a_spec_with_dev_opts_out(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for options, expect in ((("rbind", "rw"), True), (("rbind", "ro", "dev"), False)):
        with mounted(
            [MountSpec(type="bind", source=str(source), options=options)], tmp_path / "at"
        ) as at:
            assert ("nodev" in _options(at)) is expect
    tmpfs = MountSpec(type="tmpfs", source="tmpfs", options=("size=1m",))
    with mounted([tmpfs], tmp_path / "tmp") as at:
        assert "nodev" in _options(at)
