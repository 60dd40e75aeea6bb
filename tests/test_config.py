"""storage.toml: where it is found, what it may say, and what the environment overrides."""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path

import pytest

from laminae import _config
from laminae._config import StoreConfig, load_config
from laminae._exceptions import InvalidArgument
from laminae.archive._limits import Limits
from laminae.driverkit import parse_size
from laminae.images._registry import RegistryOptions

EXAMPLE = """\
[storage]
driver = "vfs"
graphroot = "/srv/layers"
runroot = "/run/layers"
driver_priority = ["overlay", "btrfs", "vfs"]

[storage.options.vfs]
some_key = "value"

[storage.limits]
max_bytes = "64G"
"""


@pytest.fixture(autouse=True)
def system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the system-wide file into the test's directory, so the host's never counts."""
    path = tmp_path / "etc" / "laminae" / "storage.toml"
    monkeypatch.setattr(_config, "SYSTEM_CONFIG", path)
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def user_env(home: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(home), **extra}


# -- search order -----------------------------------------------------------------------------


def test_example_file_is_read_whole(tmp_path: Path) -> None:
    path = write(tmp_path / "storage.toml", EXAMPLE)
    config = load_config(path, environ={}, uid=0)
    assert config == StoreConfig(
        graphroot=Path("/srv/layers"),
        runroot=Path("/run/layers"),
        driver="vfs",
        driver_priority=("overlay", "btrfs", "vfs"),
        driver_options={"vfs": {"some_key": "value"}},
        limits=Limits(max_bytes=64 << 30),
        source=path,
    )


def test_explicit_path_wins_over_environment_and_home(tmp_path: Path, home: Path) -> None:
    explicit = write(tmp_path / "explicit.toml", '[storage]\ndriver = "explicit"\n')
    from_env = write(tmp_path / "env.toml", '[storage]\ndriver = "env"\n')
    write(home / ".config/laminae/storage.toml", '[storage]\ndriver = "home"\n')
    config = load_config(str(explicit), environ=user_env(home, LAMINAE_CONFIG=str(from_env)))
    assert (config.driver, config.source) == ("explicit", explicit)


def test_laminae_config_wins_over_home(tmp_path: Path, home: Path) -> None:
    from_env = write(tmp_path / "env.toml", '[storage]\ndriver = "env"\n')
    write(home / ".config/laminae/storage.toml", '[storage]\ndriver = "home"\n')
    config = load_config(environ=user_env(home, LAMINAE_CONFIG=str(from_env)), uid=1000)
    assert (config.driver, config.source) == ("env", from_env)


def test_home_file_wins_over_system_file(home: Path, system_config: Path) -> None:
    in_home = write(home / ".config/laminae/storage.toml", '[storage]\ndriver = "home"\n')
    write(system_config, '[storage]\ndriver = "system"\n')
    config = load_config(environ=user_env(home), uid=1000)
    assert (config.driver, config.source) == ("home", in_home)


def test_xdg_config_home_replaces_dot_config(tmp_path: Path, home: Path) -> None:
    write(home / ".config/laminae/storage.toml", '[storage]\ndriver = "dot-config"\n')
    xdg = write(tmp_path / "xdg/laminae/storage.toml", '[storage]\ndriver = "xdg"\n')
    config = load_config(environ=user_env(home, XDG_CONFIG_HOME=str(tmp_path / "xdg")), uid=1000)
    assert (config.driver, config.source) == ("xdg", xdg)


def test_system_file_is_the_last_resort(home: Path, system_config: Path) -> None:
    write(system_config, '[storage]\ndriver = "system"\n')
    config = load_config(environ=user_env(home), uid=1000)
    assert (config.driver, config.source) == ("system", system_config)


def test_no_file_at_all_gives_defaults(home: Path) -> None:
    config = load_config(environ=user_env(home), uid=1000)
    assert config.source is None
    assert config.driver is None
    assert config.driver_priority == ()
    assert dict(config.driver_options) == {}
    assert config.limits == Limits()


def test_missing_explicit_file_is_invalid(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(InvalidArgument, match=r"nope\.toml"):
        load_config(missing, environ={}, uid=0)


def test_missing_laminae_config_file_is_invalid(tmp_path: Path, home: Path) -> None:
    missing = tmp_path / "gone.toml"
    with pytest.raises(InvalidArgument, match=r"gone\.toml.*LAMINAE_CONFIG"):
        load_config(environ=user_env(home, LAMINAE_CONFIG=str(missing)), uid=1000)


def test_directory_as_config_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(str(tmp_path))):
        load_config(tmp_path, environ={}, uid=0)


def test_empty_laminae_config_means_unset(home: Path) -> None:
    assert load_config(environ=user_env(home, LAMINAE_CONFIG=""), uid=1000).source is None


# -- defaults ---------------------------------------------------------------------------------


def test_default_roots_for_root(home: Path) -> None:
    config = load_config(environ=user_env(home, XDG_RUNTIME_DIR="/run/user/0"), uid=0)
    assert (config.graphroot, config.runroot) == (Path("/var/lib/laminae"), Path("/run/laminae"))


def test_default_roots_for_a_user(home: Path) -> None:
    config = load_config(environ=user_env(home, XDG_RUNTIME_DIR="/run/user/1000"), uid=1000)
    assert config.graphroot == home / ".local/share/laminae"
    assert config.runroot == Path("/run/user/1000/laminae")


def test_user_without_runtime_dir_falls_back_to_tmp(home: Path) -> None:
    config = load_config(environ=user_env(home), uid=1234)
    assert config.runroot == Path("/tmp/laminae-1234")


def test_user_data_home_is_honoured(tmp_path: Path, home: Path) -> None:
    config = load_config(environ=user_env(home, XDG_DATA_HOME=str(tmp_path / "data")), uid=1000)
    assert config.graphroot == tmp_path / "data" / "laminae"


def test_user_without_home_variable_uses_the_password_database() -> None:
    nobody = pwd.getpwnam("nobody")
    config = load_config(environ={}, uid=nobody.pw_uid)
    assert config.graphroot == Path(nobody.pw_dir) / ".local/share/laminae"


def test_user_without_any_home_is_invalid() -> None:
    uid = next(uid for uid in range(40000, 50000) if uid not in {p.pw_uid for p in pwd.getpwall()})
    with pytest.raises(InvalidArgument, match=f"uid {uid}"):
        load_config(environ={}, uid=uid)


def test_uid_defaults_to_the_effective_uid(home: Path) -> None:
    expected = load_config(environ=user_env(home), uid=os.geteuid())
    assert load_config(environ=user_env(home)) == expected


def test_file_overrides_defaults_key_by_key(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", '[storage]\nrunroot = "/run/elsewhere"\n')
    config = load_config(path, environ={}, uid=0)
    assert (config.graphroot, config.runroot) == (Path("/var/lib/laminae"), Path("/run/elsewhere"))


# -- environment ------------------------------------------------------------------------------


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "storage.toml", EXAMPLE)
    env = {"LAMINAE_DRIVER": "overlay", "LAMINAE_ROOT": "/a", "LAMINAE_RUNROOT": "/b"}
    config = load_config(path, environ=env, uid=0)
    assert (config.driver, config.graphroot, config.runroot) == ("overlay", Path("/a"), Path("/b"))
    # What the environment does not name still comes from the file.
    assert config.driver_priority == ("overlay", "btrfs", "vfs")


def test_environment_overrides_defaults(home: Path) -> None:
    config = load_config(environ=user_env(home, LAMINAE_ROOT="/x"), uid=1000)
    assert config.graphroot == Path("/x")
    assert config.runroot == Path("/tmp/laminae-1000")


def test_relative_laminae_root_is_taken_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={"LAMINAE_ROOT": "store"}, uid=0)
    assert config.graphroot == tmp_path / "store"


def test_empty_driver_means_choose(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", '[storage]\ndriver = ""\n')
    assert load_config(path, environ={"LAMINAE_DRIVER": ""}, uid=0).driver is None


# -- unknown keys and bad values --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[storage]\ndrvier = "vfs"\n', "storage.drvier"),
        ('[store]\ndriver = "vfs"\n', "store"),
        ("[storage.limits]\nmax_size = 1\n", "storage.limits.max_size"),
        ('[storage]\nrootless_storage_path = "/x"\n', "storage.rootless_storage_path"),
        ("[registries]\nmirrors = []\n", "registries.mirrors"),
    ],
)
def test_unknown_key_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path / "storage.toml", text)
    with pytest.raises(InvalidArgument) as info:
        load_config(path, environ={}, uid=0)
    assert str(info.value) == f"{path}: unknown key '{key}'"


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("[storage]\ndriver = 5\n", "storage.driver", "expected a string, got integer"),
        ("[storage]\ngraphroot = ['/a']\n", "storage.graphroot", "expected a string, got array"),
        ('[storage]\ndriver_priority = "vfs"\n', "storage.driver_priority", "array of strings"),
        ("[storage]\ndriver_priority = ['vfs', 1]\n", "storage.driver_priority", "array"),
        ('[storage.options]\nvfs = "x"\n', "storage.options.vfs", "expected a table"),
        ("[storage.options.vfs]\nk = [1]\n", "storage.options.vfs.k", "got array"),
        ("[storage.options.vfs]\nk = 1.5\n", "storage.options.vfs.k", "got float"),
        ("[storage]\noptions = 3\n", "storage.options", "expected a table"),
        ("[storage]\nlimits = 3\n", "storage.limits", "expected a table"),
        ("storage = 3\n", "storage", "expected a table"),
        ("[storage.limits]\nmax_bytes = true\n", "storage.limits.max_bytes", "size"),
        ('[storage.limits]\nmax_bytes = "lots"\n', "storage.limits.max_bytes", "'lots'"),
        ("[storage.limits]\nmax_bytes = 0\n", "storage.limits.max_bytes", "positive"),
        ('[storage.limits]\nmax_entries = "4M"\n', "storage.limits.max_entries", "integer"),
        ("[storage.limits]\nmax_path_depth = -1\n", "storage.limits.max_path_depth", "positive"),
        ('[storage]\ngraphroot = "rel/dir"\n', "storage.graphroot", "absolute path"),
        ('[storage]\nrunroot = "run"\n', "storage.runroot", "absolute path"),
        ('[registries]\ninsecure = "localhost:5000"\n', "registries.insecure", "array"),
        ("[registries]\ninsecure = [5000]\n", "registries.insecure", "array of strings"),
        ('[registries]\ninsecure = ["http://x:1"]\n', "registries.insecure.0", "no scheme"),
        ('[registries]\ninsecure = ["a", "x/y"]\n', "registries.insecure.1", "'x/y'"),
        ('[registries]\nauth_file = "auth.json"\n', "registries.auth_file", "absolute path"),
        ("[registries]\ncerts_dir = 1\n", "registries.certs_dir", "expected a string"),
        ('[registries]\ncerts_dir = "certs.d"\n', "registries.certs_dir", "absolute path"),
        ("registries = 3\n", "registries", "expected a table"),
    ],
)
def test_bad_value_names_file_and_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    path = write(tmp_path / "storage.toml", text)
    with pytest.raises(InvalidArgument) as info:
        load_config(path, environ={}, uid=0)
    message = str(info.value)
    assert message.startswith(f"{path}: '{key}': ")
    assert why in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path / "storage.toml", "[storage]\ndriver = 1\nbogus = 2\n")
    with pytest.raises(InvalidArgument) as info:
        load_config(path, environ={}, uid=0)
    assert "'storage.driver'" in str(info.value)
    assert "'storage.bogus'" in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "storage.toml", "[storage\n")
    with pytest.raises(InvalidArgument, match="^" + re.escape(f"{path}: not valid TOML")):
        load_config(path, environ={}, uid=0)


def test_bad_value_keeps_the_cause(tmp_path: Path) -> None:
    path = write(tmp_path / "storage.toml", "[storage]\ndriver = 5\n")
    with pytest.raises(InvalidArgument) as info:
        load_config(path, environ={}, uid=0)
    assert info.value.__cause__ is not None


# -- driver options and limits ----------------------------------------------------------------


def test_driver_options_take_toml_booleans_and_integers(tmp_path: Path) -> None:
    text = "[storage.options.overlay]\nignore_chown_errors = true\ninodes = 10\nsize = '1G'\n"
    config = load_config(write(tmp_path / "s.toml", text), environ={}, uid=0)
    assert dict(config.driver_options["overlay"]) == {
        "ignore_chown_errors": "true",
        "inodes": "10",
        "size": "1G",
    }


def test_driver_options_are_read_only(tmp_path: Path) -> None:
    config = StoreConfig(Path("/a"), Path("/b"), driver_options={"vfs": {"k": "v"}})
    with pytest.raises(TypeError):
        config.driver_options["vfs"]["k"] = "w"  # type: ignore[index]
    with pytest.raises(TypeError):
        config.driver_options["btrfs"] = {}  # type: ignore[index]


def test_config_is_hashable_and_compares_by_value() -> None:
    one = StoreConfig(Path("/a"), Path("/b"), driver_options={"vfs": {"k": "v"}})
    two = StoreConfig(Path("/a"), Path("/b"), driver_options={"vfs": {"k": "v"}})
    assert one == two
    assert hash(one) == hash(two)


def test_limits_keep_defaults_for_keys_not_given(tmp_path: Path) -> None:
    text = '[storage.limits]\nmax_bytes = "1M"\nmax_entries = 10\nmax_xattr_bytes = "4k"\n'
    config = load_config(write(tmp_path / "s.toml", text), environ={}, uid=0)
    assert config.limits == Limits(max_bytes=1 << 20, max_entries=10, max_xattr_bytes=4096)


@pytest.mark.parametrize(
    ("given", "size"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("512b", 512),
        ("1k", 1024),
        ("1K", 1024),
        ("1KB", 1024),
        ("1KiB", 1024),
        ("2M", 2 << 20),
        ("64G", 64 << 30),
        ("64gib", 64 << 30),
        ("1T", 1 << 40),
        ("1P", 1 << 50),
        (" 3 G ", 3 << 30),
    ],
)
def test_parse_size(given: str | int, size: int) -> None:
    assert parse_size(given) == size


@pytest.mark.parametrize("given", ["", "G", "1.5G", "-1", "64Q", "1 2", 0, -5, True])
def test_parse_size_rejects(given: str | int) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(given)


# -- registries -------------------------------------------------------------------------------


def test_registries_table_gives_registry_options(tmp_path: Path) -> None:
    path = write(
        tmp_path / "storage.toml",
        """\
[registries]
insecure = ["localhost:5000", "registry.internal", "[::1]:5000"]
auth_file = "/etc/laminae/auth.json"
certs_dir = "/etc/containers/certs.d"
""",
    )
    options = load_config(path, environ={}, uid=0).registries
    assert options == RegistryOptions(
        insecure_hosts=frozenset({"localhost:5000", "registry.internal", "[::1]:5000"}),
        auth_file=Path("/etc/laminae/auth.json"),
        certs_dir=Path("/etc/containers/certs.d"),
    )
    assert options is not None
    assert options.is_insecure("registry.internal:443")
    assert not options.is_insecure("localhost:5001")


def test_empty_registries_table_gives_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "storage.toml", "[registries]\n")
    assert load_config(path, environ={}, uid=0).registries == RegistryOptions()


def test_without_registries_table_there_are_no_registry_options(tmp_path: Path) -> None:
    path = write(tmp_path / "storage.toml", EXAMPLE)
    assert load_config(path, environ={}, uid=0).registries is None
