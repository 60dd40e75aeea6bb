"""Where a store lives and which driver it uses: ``storage.toml``, the environment, defaults.

The file is found at the first of:

1. the path given to :func:`load_config` (it must exist);
2. ``$LAMINAE_CONFIG`` (it must exist);
3. ``$XDG_CONFIG_HOME/laminae/storage.toml`` (``~/.config/laminae/storage.toml``);
4. ``/etc/laminae/storage.toml``;

and with none of them the defaults apply. Keys are named like containers-storage's
``storage.conf`` where the meaning is the same::

    [storage]
    driver = "vfs"
    graphroot = "/var/lib/laminae"
    runroot = "/run/laminae"
    driver_priority = ["overlay", "btrfs", "vfs"]
    devices = "create"        # or "skip", "refuse": a layer's character and block devices

    [storage.options.vfs]
    some_key = "value"

    [storage.limits]
    max_bytes = "64G"

    [registries]
    insecure = ["localhost:5000"]
    auth_file = "/etc/laminae/auth.json"
    certs_dir = "/etc/containers/certs.d"

``LAMINAE_DRIVER``, ``LAMINAE_ROOT`` and ``LAMINAE_RUNROOT`` override the file; arguments to
:func:`laminae.open_store` (and the command line's flags) override both.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pwd
import re
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs

from laminae._exceptions import InvalidArgument
from laminae.archive._limits import DevicePolicy, Limits
from laminae.driverkit._sizes import parse_size
from laminae.images._credentials import RegistryOptions

if TYPE_CHECKING:
    import cattrs

__all__ = ["StoreConfig", "load_config", "runroot_for"]

SYSTEM_CONFIG: Final = Path("/etc/laminae/storage.toml")
"""The system-wide file, read when no other is found."""


def _frozen_options(
    value: Mapping[str, Mapping[str, str]],
) -> Mapping[str, Mapping[str, str]]:
    # Read-only views, so a config shared between stores cannot be changed under them.
    return types.MappingProxyType(
        {name: types.MappingProxyType(dict(opts)) for name, opts in value.items()}
    )


@attrs.frozen
class StoreConfig:
    """Everything :func:`laminae.open_store` needs to know before it opens a store.

    :param graphroot: the persistent root directory (layers, graph).
    :param runroot: the run directory (mount points, mount counts); may be on a tmpfs.
    :param driver: the driver to use; ``None`` lets the store choose (the one recorded in the
        store, else the first of ``driver_priority`` whose probe passes).
    :param driver_priority: names tried in order by auto-selection; empty means the
        registered priorities.
    :param driver_options: per driver name, the options given to that driver.
    :param limits: bounds for layers applied to the store, and (``Limits.devices``, the file's
        ``storage.devices``) what becomes of their device nodes.
    :param registries: how to reach registries, from the file's ``[registries]`` table;
        ``None`` when it has none (then ``RegistryOptions()`` applies). Kept ``None`` rather
        than a default value so that reading the config does not import the HTTP client.
    :param source: the file this came from, ``None`` for the defaults.
    :param driver_setting: where :attr:`driver` was set, for messages that must say so:
        ``"$LAMINAE_DRIVER"`` or ``"<file>: storage.driver"``; ``None`` when it was not set.
    :param runroot_default_for: when ``runroot`` is the default rather than configured (by
        the file or the environment), the root it is the default for: the default root. Any
        other root gets a run directory derived from it (:func:`runroot_for`). ``None``: the
        run directory was configured and serves whatever root is opened.
    """

    graphroot: Path
    runroot: Path
    driver: str | None = None
    driver_priority: tuple[str, ...] = ()
    driver_options: Mapping[str, Mapping[str, str]] = attrs.field(
        factory=dict, converter=_frozen_options, hash=False
    )
    limits: Limits = attrs.Factory(Limits)
    registries: RegistryOptions | None = None
    source: Path | None = None
    runroot_default_for: Path | None = None
    # Where a value came from is no part of what it is: two configurations naming the same
    # driver are equal.
    driver_setting: str | None = attrs.field(default=None, eq=False)


# -- the file's schema ------------------------------------------------------------------------


class _BadValue(Exception):
    """A value of the wrong type or form; ``key`` continues the path below the attribute."""

    def __init__(self, message: str, key: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


@attrs.frozen
class _StorageSection:
    driver: str | None = None
    graphroot: str | None = None
    runroot: str | None = None
    driver_priority: tuple[str, ...] | None = None
    options: dict[str, dict[str, str]] = attrs.Factory(dict)
    limits: Limits = attrs.Factory(Limits)
    devices: DevicePolicy | None = None


@attrs.frozen
class _RegistriesSection:
    insecure: tuple[str, ...] = ()
    auth_file: str | None = None
    certs_dir: str | None = None


@attrs.frozen
class _ConfigFile:
    storage: _StorageSection = _StorageSection()
    registries: _RegistriesSection | None = None


def _type_name(value: object) -> str:
    # TOML's names for what tomllib returns, so the message matches what the user wrote.
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    return "table" if isinstance(value, dict) else names.get(type(value), type(value).__name__)


def _structure_str(value: object, _: object) -> str:
    if not isinstance(value, str):
        raise _BadValue(f"expected a string, got {_type_name(value)}")
    return value


def _structure_names(value: object, _: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _BadValue("expected an array of strings")
    return tuple(value)


def _option_value(value: object) -> str:
    # Drivers take string options (as `--storage-opt KEY=VALUE` gives them); a TOML boolean
    # or integer is accepted in its TOML spelling so `ignore_chown_errors = true` works.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return str(value)
    raise _BadValue(f"expected a string, got {_type_name(value)}")


def _structure_options(value: object, _: object) -> dict[str, dict[str, str]]:
    if not isinstance(value, dict):
        raise _BadValue(f"expected a table, got {_type_name(value)}")
    options: dict[str, dict[str, str]] = {}
    for driver, table in value.items():
        if not isinstance(table, dict):
            raise _BadValue(f"expected a table, got {_type_name(table)}", (driver,))
        values: dict[str, str] = {}
        for key, item in table.items():
            try:
                values[key] = _option_value(item)
            except _BadValue as exc:
                raise _BadValue(exc.message, (driver, key)) from None
        options[driver] = values
    return options


# A registry host as references name it: "name" or "name:port" (IPv6 literals bracketed).
_REGISTRY_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")


def _structure_hosts(value: object, _: object) -> tuple[str, ...]:
    hosts = _structure_names(value, _)
    for index, host in enumerate(hosts):
        if not _REGISTRY_HOST.fullmatch(host):
            raise _BadValue(
                f'expected a host such as "localhost:5000" (no scheme, no path), got {host!r}',
                (str(index),),
            )
    return hosts


def _structure_devices(value: object, _: object) -> DevicePolicy:
    names = ", ".join(f'"{policy.value}"' for policy in DevicePolicy)
    if isinstance(value, str):
        try:
            return DevicePolicy(value)
        except ValueError:
            pass
    raise _BadValue(f"expected one of {names}, got {value!r}")


def _structure_count(value: object, _: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadValue(f"expected an integer, got {_type_name(value)}")
    if value <= 0:
        raise _BadValue(f"expected a positive integer, got {value}")
    return value


def _structure_size(value: object, _: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _BadValue(f'expected a size such as 4096 or "64G", got {_type_name(value)}')
    try:
        return parse_size(value)
    except InvalidArgument as exc:
        raise _BadValue(str(exc)) from None


@functools.cache
def _converter() -> cattrs.Converter:
    # Made, and cattrs imported, only when a configuration file is read: a store opened with
    # no file (or a command that needs none) does not pay for it.
    import cattrs
    from cattrs.gen import make_dict_structure_fn, override

    converter = cattrs.Converter(forbid_extra_keys=True)
    # cattrs' own hooks coerce (str(5) == "5", "abc" iterates into a tuple); a config file
    # with the wrong type is a mistake the user should hear about, so every leaf is strict.
    converter.register_structure_hook(str, _structure_str)
    # Generic aliases are not classes, so these two dispatch on equality.
    converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_names)
    converter.register_structure_hook_func(
        lambda t: t == dict[str, dict[str, str]], _structure_options
    )
    # Byte limits take sizes ("64G"), counts take integers; typed Any because mypy cannot tell
    # these keyword overrides from make_dict_structure_fn's own keyword parameters.
    limit_hooks: dict[str, Any] = {
        field.name: override(
            struct_hook=_structure_size if field.name.endswith("_bytes") else _structure_count
        )
        for field in attrs.fields(Limits)
        if field.name != "devices"
    }
    # The policy is a key of [storage] (storage.devices), not a limit.
    limit_hooks["devices"] = override(omit=True)
    converter.register_structure_hook(DevicePolicy, _structure_devices)
    converter.register_structure_hook(
        Limits, make_dict_structure_fn(Limits, converter, **limit_hooks)
    )
    converter.register_structure_hook(
        _RegistriesSection,
        make_dict_structure_fn(
            _RegistriesSection, converter, insecure=override(struct_hook=_structure_hosts)
        ),
    )
    return converter


def _problems(exc: BaseException, key: str) -> list[str]:
    """Flatten a cattrs validation error into one line per bad key, with dotted key paths."""
    from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

    if isinstance(exc, ForbiddenExtraKeysError):
        prefix = f"{key}." if key else ""
        return [f"unknown key '{prefix}{extra}'" for extra in sorted(exc.extra_fields)]
    if isinstance(exc, ClassValidationError | IterableValidationError):
        lines: list[str] = []
        for sub in exc.exceptions:
            lines.extend(_problems(sub, _note_key(sub, key)))
        return lines
    if isinstance(exc, _BadValue):
        full = ".".join([key, *exc.key]) if key else ".".join(exc.key)
        return [f"'{full}': {exc.message}"]
    # cattrs failed inside its own hook: the value where a table belongs is not a table.
    return [f"'{key}': expected a table"]


def _note_key(exc: BaseException, key: str) -> str:
    from cattrs.errors import AttributeValidationNote, IterableValidationNote

    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, AttributeValidationNote):
            return f"{key}.{note.name}" if key else note.name
        if isinstance(note, IterableValidationNote):
            return f"{key}.{note.index}" if key else str(note.index)
    return key


def _parse(path: Path) -> _ConfigFile:
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        # TOML is UTF-8 text; a binary file fails in the decoder before the parser sees it.
        raise InvalidArgument(
            f"{path}: not valid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read: {exc.strerror or exc}") from exc
    from cattrs import BaseValidationError

    try:
        return _converter().structure(document, _ConfigFile)
    except (BaseValidationError, _BadValue) as exc:
        raise InvalidArgument(f"{path}: " + "; ".join(_problems(exc, ""))) from exc


# -- finding the file, defaults, the environment ----------------------------------------------


def _home(environ: Mapping[str, str], uid: int) -> Path:
    home = environ.get("HOME")
    if home:
        return Path(home)
    try:
        return Path(pwd.getpwuid(uid).pw_dir)
    except KeyError:
        raise InvalidArgument(f"no home directory for uid {uid}: set HOME") from None


def _xdg(environ: Mapping[str, str], variable: str, uid: int, fallback: str) -> Path:
    # The XDG base-directory spec ignores relative values.
    value = environ.get(variable, "")
    if value and os.path.isabs(value):
        return Path(value)
    return _home(environ, uid) / fallback


def _find(path: str | Path | None, environ: Mapping[str, str], uid: int) -> Path | None:
    explicit = path if path is not None else environ.get("LAMINAE_CONFIG") or None
    if explicit is not None:
        explicit = Path(explicit)
        if not explicit.is_file():
            what = "config file" if path is not None else "config file ($LAMINAE_CONFIG)"
            raise InvalidArgument(f"{explicit}: {what} does not exist or is not a file")
        return explicit
    for candidate in (
        _xdg(environ, "XDG_CONFIG_HOME", uid, ".config") / "laminae" / "storage.toml",
        SYSTEM_CONFIG,
    ):
        if candidate.is_file():
            return candidate
    return None


def _default_roots(environ: Mapping[str, str], uid: int) -> tuple[Path, Path]:
    if uid == 0:
        return Path("/var/lib/laminae"), Path("/run/laminae")
    graphroot = _xdg(environ, "XDG_DATA_HOME", uid, ".local/share") / "laminae"
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime):
        return graphroot, Path(runtime) / "laminae"
    # Without a runtime dir (a cron job, su without a login) fall back to a per-user /tmp
    # directory, as podman does.
    return graphroot, Path(f"/tmp/laminae-{uid}")


def _file_path(value: str | None, source: Path, key: str) -> Path | None:
    if value is None:
        return None
    if not os.path.isabs(value):
        raise InvalidArgument(f"{source}: '{key}': expected an absolute path, got {value!r}")
    return Path(value)


def _registry_options(section: _RegistriesSection, source: Path) -> RegistryOptions:
    return RegistryOptions(
        insecure_hosts=frozenset(section.insecure),
        auth_file=_file_path(section.auth_file, source, "registries.auth_file"),
        certs_dir=_file_path(section.certs_dir, source, "registries.certs_dir"),
    )


def _env_path(environ: Mapping[str, str], variable: str) -> Path | None:
    value = environ.get(variable, "")
    # Relative, like a command-line flag: against the working directory.
    return Path(value).absolute() if value else None


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    uid: int | None = None,
) -> StoreConfig:
    """Read the store configuration: the file, then the environment over it.

    :param path: the file to read; ``None`` searches ``$LAMINAE_CONFIG``,
        ``~/.config/laminae/storage.toml`` (``$XDG_CONFIG_HOME`` if set) and
        ``/etc/laminae/storage.toml``, and uses the defaults when none exists.
    :param environ: the environment to read ``LAMINAE_*``, ``HOME`` and ``XDG_*`` from.
    :param uid: whose defaults to use; ``None`` is the effective uid. Root's store is under
        ``/var/lib/laminae`` and ``/run/laminae``; a user's under ``~/.local/share/laminae``
        (``$XDG_DATA_HOME``) and ``$XDG_RUNTIME_DIR/laminae`` (else ``/tmp/laminae-<uid>``).
    :raises InvalidArgument: ``path`` or ``$LAMINAE_CONFIG`` names no file; the file is not
        TOML, has an unknown key or a value of the wrong type (the message names the file and
        the key).
    """
    if uid is None:
        uid = os.geteuid()
    source = _find(path, environ, uid)
    document = _parse(source) if source is not None else _ConfigFile()
    section = document.storage
    default_graphroot, runroot = _default_roots(environ, uid)
    graphroot = default_graphroot
    configured_runroot = None
    if source is not None:
        graphroot = _file_path(section.graphroot, source, "storage.graphroot") or graphroot
        configured_runroot = _file_path(section.runroot, source, "storage.runroot")
    configured_runroot = _env_path(environ, "LAMINAE_RUNROOT") or configured_runroot
    # An empty driver means "choose", as in containers-storage's storage.conf.
    driver = environ.get("LAMINAE_DRIVER") or section.driver or None
    if environ.get("LAMINAE_DRIVER"):
        driver_setting: str | None = "$LAMINAE_DRIVER"
    elif driver is not None:
        driver_setting = f"{source}: storage.driver"
    else:
        driver_setting = None
    return StoreConfig(
        graphroot=_env_path(environ, "LAMINAE_ROOT") or graphroot,
        runroot=configured_runroot or runroot,
        driver=driver,
        driver_priority=section.driver_priority or (),
        driver_options=section.options,
        limits=(
            section.limits
            if section.devices is None
            else attrs.evolve(section.limits, devices=section.devices)
        ),
        registries=(
            _registry_options(document.registries, source)
            if document.registries is not None and source is not None
            else None
        ),
        source=source,
        driver_setting=driver_setting,
        runroot_default_for=default_graphroot if configured_runroot is None else None,
    )


def _derived_runroot(default: Path, root: Path) -> Path:
    # A sibling of the default run directory, named by a hash of the root: on the same tmpfs
    # (/run, $XDG_RUNTIME_DIR), so a reboot empties it as the mount counts expect (a
    # "<root>-run" next to a persistent root would outlive its mounts), and a sibling rather
    # than a child so that no store's run directory holds another's.
    digest = hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()[:16]
    return default.with_name(f"{default.name}-{digest}")


def runroot_for(config: StoreConfig, root: Path) -> Path:
    """The run directory of the store at ``root``, when none is given for it.

    A configured run directory is used as it is. The default one (``/run/laminae``) belongs
    to the default root only: any other root, whether from ``--root``, ``LAMINAE_ROOT`` or
    ``storage.graphroot``, gets its own beside it, named by a hash of its resolved path, so
    that two stores that differ only in their root never share a run directory (where
    containers-storage would share ``/run/containers/storage`` and let one store's cleanup
    meet the other's mounts).
    """
    default_for = config.runroot_default_for
    if default_for is None or os.path.realpath(root) == os.path.realpath(default_for):
        return config.runroot
    return _derived_runroot(config.runroot, root)
