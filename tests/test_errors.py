"""Errors that say what happened: a full disk is not bad input, a broken file or plugin names
itself, a failed open leaves nothing behind, and a decompression bomb stops early."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard
from click.testing import CliRunner
from tarbuild import make_tar

import laminae
import laminae.driverkit
from laminae._exceptions import (
    InvalidArgument,
    LaminaeError,
    LimitExceeded,
    ResourceExhausted,
    map_os_errors,
)
from laminae.archive._compression import open_decompressed
from laminae.cli._main import cli
from laminae.kernel import _mounts

MS_RDONLY = 1
MS_REMOUNT = 32


@pytest.fixture(autouse=True)
def _environment(clean_environment: None) -> None:
    """Every test here runs in conftest's clean environment."""


@pytest.fixture
def no_config(tmp_path: Path) -> laminae.StoreConfig:
    """The configuration of an empty storage.toml, so the host's files never count."""
    path = tmp_path / "empty.toml"
    path.write_text("")
    return laminae.load_config(path)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted at the end."""
    path = tmp_path / "small"
    path.mkdir()
    _mounts.mount("tmpfs", str(path), "tmpfs", 0, "size=1m,mode=0700")
    try:
        yield path
    finally:
        _mounts.umount(str(path), os.MNT_DETACH if hasattr(os, "MNT_DETACH") else 2)


# -- a full disk is its own error ---------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_resource_exhausted_not_bad_input(code: int) -> None:
    with (
        pytest.raises(ResourceExhausted, match="write layer x: ") as caught,
        map_os_errors("write layer x"),
    ):
        raise OSError(code, os.strerror(code))
    assert not isinstance(caught.value, InvalidArgument)
    assert isinstance(caught.value.__cause__, OSError)


def test_resource_exhausted_has_its_own_exit_code_and_is_public() -> None:
    codes = [
        cls.exit_code
        for cls in vars(laminae._exceptions).values()
        if isinstance(cls, type) and issubclass(cls, LaminaeError) and "exit_code" in vars(cls)
    ]
    assert codes.count(ResourceExhausted.exit_code) == 1
    assert ResourceExhausted.exit_code == 12
    assert laminae.ResourceExhausted is ResourceExhausted
    assert laminae.driverkit.ResourceExhausted is ResourceExhausted
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "| 12 | `ResourceExhausted` |" in readme


@pytest.mark.root
def test_a_store_root_that_fills_up_gives_resource_exhausted_and_stays_clean(
    small_tmpfs: Path, tmp_path: Path, no_config: laminae.StoreConfig
) -> None:
    root = small_tmpfs / "store"
    layer = tmp_path / "big.tar"
    # Random bytes, so that nothing (not the tar-split record either) makes them smaller.
    layer.write_bytes(make_tar({"big": os.urandom(4 << 20)}))
    with laminae.open_store(
        root, runroot=tmp_path / "run", driver="vfs", config=no_config
    ) as store:
        with pytest.raises(ResourceExhausted) as caught:
            store.apply_layer(layer)
        assert "No space left on device" in str(caught.value)
        assert store.layers() == []
        report = store.check()
        assert report.ok, report.problems()
        assert os.listdir(store.driver_home / "dir") == []
    result = CliRunner().invoke(
        cli,
        [
            "--config", str(tmp_path / "empty.toml"),
            "--root", str(root),
            "--runroot", str(tmp_path / "run"),
            "--driver", "vfs",
            "layer", "apply", str(layer),
        ],
    )  # fmt: skip
    assert result.exit_code == ResourceExhausted.exit_code, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    assert "No space left on device" in result.stderr
    with laminae.open_store(
        root, runroot=tmp_path / "run", driver="vfs", config=no_config
    ) as store:
        assert store.layers() == []
        assert store.check().ok


# -- configuration and store directories --------------------------------------------------------


def test_a_binary_config_file_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "storage.toml"
    path.write_bytes(b"\x00\xff\xfe\x89PNG\r\n\x1a\n" + os.urandom(64))
    with pytest.raises(InvalidArgument, match=f"^{path}: not valid TOML: not UTF-8 text"):
        laminae.load_config(path)
    result = CliRunner().invoke(cli, ["--config", str(path), "layer", "ls"])
    assert result.exit_code == InvalidArgument.exit_code
    assert result.stderr.startswith(f"laminae: error: {path}: not valid TOML")
    assert result.stderr.count("\n") == 1, result.stderr


def test_an_unknown_driver_in_a_config_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "storage.toml"
    path.write_text('[storage]\ndriver = "nosuch"\n')
    config = laminae.load_config(path)
    with pytest.raises(
        InvalidArgument, match=f"^{path}: storage.driver: driver 'nosuch' is not installed"
    ):
        laminae.open_store(tmp_path / "root", runroot=tmp_path / "run", config=config)
    assert not (tmp_path / "root").exists()
    environ = {"LAMINAE_DRIVER": "other", "HOME": str(tmp_path)}
    config = laminae.load_config(path, environ=environ)
    with pytest.raises(InvalidArgument, match=r"^\$LAMINAE_DRIVER: driver 'other'"):
        laminae.open_store(tmp_path / "root", runroot=tmp_path / "run", config=config)


def test_a_failed_open_leaves_no_empty_graph(
    tmp_path: Path, no_config: laminae.StoreConfig
) -> None:
    root = tmp_path / "root"
    with pytest.raises(InvalidArgument, match="not installed"):
        laminae.open_store(root, runroot=tmp_path / "run", driver="nosuch", config=no_config)
    assert not any(name.startswith("graph.db") for name in os.listdir(root))
    # A store that did open keeps its graph through a later failed open.
    with laminae.open_store(root, runroot=tmp_path / "run", driver="vfs", config=no_config):
        pass
    with pytest.raises(InvalidArgument, match="not installed"):
        laminae.open_store(root, runroot=tmp_path / "run", driver="nosuch", config=no_config)
    with laminae.open_store(root, runroot=tmp_path / "run", config=no_config) as store:
        assert store.driver_name == "vfs"


@pytest.mark.root
@pytest.mark.parametrize("exists", [False, True], ids=["missing", "existing"])
def test_a_read_only_runroot_is_a_laminae_error_naming_it(
    small_tmpfs: Path, tmp_path: Path, no_config: laminae.StoreConfig, exists: bool
) -> None:
    runroot = small_tmpfs / "run"
    if exists:
        runroot.mkdir()
    _mounts.mount("", str(small_tmpfs), "", MS_REMOUNT | MS_RDONLY, "")
    root = tmp_path / "root"
    with pytest.raises(LaminaeError, match=str(runroot)) as caught:
        laminae.open_store(root, runroot=runroot, driver="vfs", config=no_config)
    assert "Read-only file system" in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)
    assert not any(name.startswith("graph.db") for name in os.listdir(root))


# -- a broken plugin ----------------------------------------------------------------------------


def test_a_broken_plugin_is_listed_and_the_other_drivers_still_work(tmp_path: Path) -> None:
    site = tmp_path / "site"
    info = site / "brokenplugin-2.5.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplugin\nVersion: 2.5\n")
    (info / "entry_points.txt").write_text("[laminae.drivers]\nbroken = brokenplugin\n")
    (site / "brokenplugin.py").write_text("import no_such_module_anywhere\n")
    run = textwrap.dedent(
        """
        import sys
        from laminae.cli._main import cli
        cli(sys.argv[1:])
        """
    )
    store = ["--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run")]
    env = {"PYTHONPATH": str(site), "HOME": str(tmp_path), "PATH": os.environ["PATH"]}

    def laminae_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", run, *store, *args], env=env, capture_output=True, text=True
        )

    listed = laminae_cli("drivers")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split("\t")[0]: line.split("\t") for line in listed.stdout.splitlines()}
    assert rows["broken"][2] == "brokenplugin 2.5"
    assert rows["broken"][3] == (
        "broken: ModuleNotFoundError: No module named 'no_such_module_anywhere'"
    )
    assert {"vfs", "overlay", "btrfs"} <= rows.keys()
    as_json = json.loads(laminae_cli("drivers", "--json").stdout)
    assert {"name": "broken", "origin": "brokenplugin 2.5", "broken": True}.items() <= next(
        d for d in as_json if d["name"] == "broken"
    ).items()
    # A store still opens, by name and by auto-selection.
    opened = laminae_cli("--driver", "vfs", "layer", "ls")
    assert opened.returncode == 0, opened.stderr
    assert laminae_cli("layer", "ls").returncode == 0


# -- decompression bombs ------------------------------------------------------------------------

_ZEROS = 64 << 20


class _Bomb(io.RawIOBase):
    """``count`` copies of one compressed member of 64 MiB of zeros, made on the fly: the
    whole never exists, on disk or in memory. ``head`` and ``tail`` are sent around them."""

    def __init__(self, member: bytes, count: int, head: bytes = b"", tail: bytes = b"") -> None:
        self._parts = iter([head, *([member] * count), tail])
        self._buffer = b""
        self.sent = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while not self._buffer:
            part = next(self._parts, None)
            if part is None:
                return b""
            self._buffer = part
        size = len(self._buffer) if size < 0 else size
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        self.sent += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=19).compress(data)


@pytest.mark.parametrize("compress", [_gzip, _zstd], ids=["gzip", "zstd"])
def test_a_decompression_bomb_is_refused_at_default_limits(
    compress: Callable[[bytes], bytes],
) -> None:
    member = compress(bytes(_ZEROS))
    bomb = _Bomb(member, count=160)  # 10 GiB of zeros in ~10 MB (gzip) or less (zstd)
    stream = open_decompressed(bomb, max_bytes=laminae.Limits().max_bytes)
    with pytest.raises(LimitExceeded, match="limit max_compression_ratio") as caught:
        while stream.read(1 << 20):
            pass
    assert "storage.toml" in str(caught.value)
    # Stopped just past the 1 GiB floor: about a tenth of the bomb was read.
    assert bomb.sent < 20 * len(member)


def _bomb_layer(member: bytes, count: int) -> _Bomb:
    """A gzip layer tar holding one file of ``count`` x 64 MiB of zeros, member by member."""
    info = tarfile.TarInfo("zeros")
    info.size = count * _ZEROS
    info.mode = 0o644
    head = _gzip(info.tobuf(format=tarfile.PAX_FORMAT))
    return _Bomb(member, count, head=head, tail=_gzip(bytes(1024)))


def test_a_store_refuses_a_bomb_and_keeps_nothing_while_a_real_layer_imports(
    tmp_path: Path, no_config: laminae.StoreConfig
) -> None:
    # A lower floor keeps the test fast; the default's refusal is shown above.
    limits = laminae.Limits(compression_ratio_floor_bytes=128 << 20)
    with laminae.open_store(
        tmp_path / "root", runroot=tmp_path / "run", driver="vfs", config=no_config, limits=limits
    ) as store:
        bomb = _bomb_layer(_gzip(bytes(_ZEROS)), count=160)
        with pytest.raises(LimitExceeded, match="max_compression_ratio"):
            store.apply_layer(bomb)
        assert bomb.sent < 4 << 20
        assert store.layers() == []
        assert os.listdir(store.driver_home / "dir") == []
        # A real layer: text compresses well, but nowhere near 100:1.
        text = "\n".join(f"line {n}: {n * 7919 % 104729}" for n in range(200_000)).encode()
        layer = store.apply_layer(io.BytesIO(_gzip(make_tar({"etc/data.txt": text}))))
        assert store.layer(layer.id).id == layer.id


def test_the_ratio_bound_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "storage.toml"
    path.write_text(
        '[storage.limits]\nmax_compression_ratio = 1000\ncompression_ratio_floor_bytes = "4G"\n'
    )
    limits = laminae.load_config(path).limits
    assert limits.max_compression_ratio == 1000
    assert limits.compression_ratio_floor_bytes == 4 << 30
    member = _gzip(bytes(_ZEROS))
    lenient = open_decompressed(
        _Bomb(member, count=4), max_bytes=1 << 40, max_ratio=2000, ratio_floor=1 << 20
    )
    while lenient.read(1 << 20):  # zeros compress ~1030:1 with gzip
        pass
    strict = open_decompressed(
        _Bomb(member, count=4), max_bytes=1 << 40, max_ratio=1000, ratio_floor=1 << 20
    )
    with pytest.raises(LimitExceeded, match="more than 1000 times"):
        while strict.read(1 << 20):
            pass
