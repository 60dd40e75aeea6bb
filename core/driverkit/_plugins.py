"""Drivers as plugins: pluggy hooks that register, a registry, and the probe.

Hooks register; they do not dispatch (the tox and llm pattern): a driver package's hookimpl
hands its driver class to :class:`DriverRegistry`, and from then on the store calls the class.
A built-in driver registers through the same hook as anybody else's; laminae finds its own
drivers as the packages of ``laminae.drivers`` and every other distribution's through the
``laminae.drivers`` entry points.

Reading every installed distribution's entry points is the slowest part of opening a store (it
imports :mod:`importlib.metadata`, which costs as much as starting Python, and reads a file per
distribution), so a store that names a built-in driver loads that driver alone
(:func:`find_drivers`); the scan happens only when all drivers are wanted
(:func:`available_drivers`, auto-selection) or the name is not a built-in one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, final

import attrs
import pluggy

from laminae._exceptions import DriverUnavailable, InvalidArgument, LaminaeError
from laminae.driverkit._contract import FEATURE_PROTOCOLS, Capabilities

__all__ = [
    "BrokenPlugin",
    "DriverEntry",
    "DriverRegistry",
    "available_drivers",
    "broken_plugins",
    "built_in_drivers",
    "collect_transports",
    "find_drivers",
    "hookimpl",
    "hookspec",
    "plugin_manager",
]

PROJECT = "laminae"
ENTRY_POINT_GROUP = "laminae.drivers"
BUILT_IN_PACKAGE = "laminae.drivers"
"""The drivers that ship with laminae: one subpackage each, named as the driver."""

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@final
@attrs.frozen
class DriverEntry:
    """One installed driver.

    :param name: what ``--driver`` and ``storage.toml`` call it.
    :param cls: the driver class.
    :param priority: auto-selection tries higher priorities first.
    :param origin: the distribution that registered it, ``"name version"``; ``None`` for a
        driver built into laminae, whose version is looked up only when :attr:`origin` is
        read (opening a store does not need it, and the lookup imports
        :mod:`importlib.metadata`).
    """

    name: str
    cls: Any = attrs.field(repr=False)
    priority: int
    _origin: str | None = attrs.field(alias="origin")

    @property
    def origin(self) -> str:
        """The distribution that registered the driver, ``"name version"``."""
        return _origin_text(self._origin)

    @property
    def capabilities(self) -> Capabilities:
        """The capabilities the class declares."""
        caps: Capabilities = self.cls.capabilities
        return caps

    def probe(self, home: Path, options: Mapping[str, str]) -> str | None:
        """Return ``None`` if the driver can run at ``home``, else the reason it cannot."""
        try:
            self.cls.probe(home, options)
        except DriverUnavailable as exc:
            return exc.reason
        return None


@final
@attrs.frozen
class BrokenPlugin:
    """An installed entry point of group ``laminae.drivers`` that failed to load.

    :param name: the entry point's name.
    :param origin: its distribution, ``"name version"``.
    :param error: the exception it raised, ``"ImportError: ..."``.
    """

    name: str
    origin: str
    error: str


@final
class DriverRegistry:
    """Handed to ``laminae_register_drivers``; call it with a driver class."""

    __slots__ = ("_current_origin", "entries")

    def __init__(self) -> None:
        self.entries: dict[str, DriverEntry] = {}
        self._current_origin: str | None = "unknown"

    def __call__(self, cls: Any, *, priority: int = 0) -> None:
        """Register ``cls`` as driver ``cls.name``.

        :raises InvalidArgument: the class does not satisfy the contract, declares a
            feature it does not implement, or its name is taken.
        """
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise InvalidArgument(f"driver class {cls!r}: 'name' must be an identifier string")
        caps = getattr(cls, "capabilities", None)
        if not isinstance(caps, Capabilities):
            raise InvalidArgument(f"driver {name!r}: 'capabilities' must be a laminae.Capabilities")
        for method in ("probe", "create", "remove", "mounts", "usage", "layers", "close"):
            if not callable(getattr(cls, method, None)):
                raise InvalidArgument(f"driver {name!r}: missing required method {method!r}")
        for feature in caps.features:
            protocol = FEATURE_PROTOCOLS[feature]
            if not all(callable(getattr(cls, m, None)) for m in _protocol_methods(protocol)):
                raise InvalidArgument(
                    f"driver {name!r} declares {feature.value!r} but does not implement "
                    f"{protocol.__name__}"
                )
        if name in self.entries:
            raise InvalidArgument(
                f"driver {name!r} registered twice: by {self.entries[name].origin} "
                f"and by {_origin_text(self._current_origin)}"
            )
        self.entries[name] = DriverEntry(name, cls, priority, self._current_origin)


def _protocol_methods(protocol: type) -> list[str]:
    return [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]


class _Hooks:
    """The hook specifications; a driver package implements some of them."""

    @hookspec
    def laminae_register_drivers(self, register: DriverRegistry) -> None:
        """Register driver classes: ``register(MyDriver, priority=10)``."""

    @hookspec
    def laminae_register_transports(self, register: Callable[[Any], None]) -> None:
        """Register image transports: ``register(Transport(...))``.

        ``Transport`` is the row of the transport table (``laminae.images._transports``, whose
        docstring says how to write one). A name already taken, by a built-in transport or
        another plugin's, is refused.
        """

    @hookspec(firstresult=True)
    def laminae_conformance_home(
        self, driver_name: str, base: Path
    ) -> contextlib.AbstractContextManager[Path] | None:
        """Provide a home for ``driver_name`` in a conformance test, or ``None``.

        A driver that needs a special filesystem (btrfs: a loop image) returns a context
        manager that makes it under ``base``, yields the home, and removes every trace.
        """


@functools.cache
def _laminae_origin() -> str:
    import importlib.metadata  # here only: see DriverEntry's origin

    try:
        return f"laminae {importlib.metadata.version('laminae')}"
    except importlib.metadata.PackageNotFoundError:  # imported from a checkout
        return "laminae (not installed)"


def _origin_text(origin: str | None) -> str:
    return _laminae_origin() if origin is None else origin


@functools.cache
def built_in_drivers() -> frozenset[str]:
    """The names of the drivers that ship with laminae: the packages of ``laminae.drivers``.

    Found by listing a directory; no distribution's metadata is read.
    """
    spec = importlib.util.find_spec(BUILT_IN_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        return frozenset()
    found = pkgutil.iter_modules(spec.submodule_search_locations)
    return frozenset(m.name for m in found if m.ispkg and not m.name.startswith("_"))


@final
class _PluginManager(pluggy.PluginManager):
    """pluggy's manager with laminae's hooks, remembering where each plugin came from."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(_Hooks)
        self.origins: dict[str, str | None] = {}
        """Plugin name: its distribution, ``"name version"``, or ``None`` for laminae's own."""
        self.broken: dict[str, BrokenPlugin] = {}
        """Entry points that failed to load, by name: left out, so the others still work."""

    def register_built_in(self, name: str) -> None:
        self.register(importlib.import_module(f"{BUILT_IN_PACKAGE}.{name}"), name=name)
        self.origins[name] = None


def _origin(pm: pluggy.PluginManager, impl: pluggy.HookImpl) -> str | None:
    """Where the plugin of ``impl`` came from (see :attr:`_PluginManager.origins`); a plugin
    registered by hand (a test, a conftest) is ``"plugin NAME"``."""
    fallback = f"plugin {impl.plugin_name}"
    if not isinstance(pm, _PluginManager):
        return fallback
    return pm.origins.get(impl.plugin_name, fallback)


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager: laminae's own drivers, then every installed
    distribution's ``laminae.drivers`` entry points.

    laminae's drivers are registered first and by name, so that another distribution's entry
    point of the same name cannot stand in for one of them (pluggy alone keeps whichever
    distribution comes first on ``sys.path``, silently): it is refused. A misspelt hook in a
    plugin fails here (``check_pending``), not silently later.

    :raises InvalidArgument: another distribution's entry point takes a built-in driver's name.
    """
    import importlib.metadata  # here only: see the module docstring

    pm = _PluginManager()
    built_in = built_in_drivers()
    for name in sorted(built_in):
        pm.register_built_in(name)
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points.select(group=ENTRY_POINT_GROUP):
            origin = f"{dist.metadata['Name']} {dist.version}"
            if ep.name in built_in:
                if ep.module != f"{BUILT_IN_PACKAGE}.{ep.name}":
                    raise InvalidArgument(
                        f"{origin}: entry point {ep.name!r} of group {ENTRY_POINT_GROUP!r} "
                        f"takes the name of a driver built into laminae; rename it"
                    )
                continue  # laminae's own entry point: registered above
            if pm.has_plugin(ep.name):
                continue  # first on sys.path wins, as with pluggy's own loader
            try:
                plugin = ep.load()
            except Exception as exc:
                # One broken distribution must not take down every command (nor the drivers
                # of the others): it is left out and `laminae drivers` names it.
                pm.broken[ep.name] = BrokenPlugin(ep.name, origin, f"{type(exc).__name__}: {exc}")
                continue
            pm.register(plugin, name=ep.name)
            pm.origins[ep.name] = origin
    pm.check_pending()
    return pm


def broken_plugins(pm: pluggy.PluginManager | None = None) -> list[BrokenPlugin]:
    """The installed ``laminae.drivers`` entry points that failed to load, by name."""
    pm = pm or plugin_manager()
    if not isinstance(pm, _PluginManager):
        return []
    return [pm.broken[name] for name in sorted(pm.broken)]


def find_drivers(name: str | None) -> dict[str, DriverEntry]:
    """The drivers a store picks from when ``name`` is the driver it was asked for or made by.

    A built-in ``name`` gives that driver alone, loaded without looking at anything else that
    is installed (see the module docstring). Any other name, or none (auto-selection), gives
    :func:`available_drivers`.
    """
    if name is None or name not in built_in_drivers():
        return available_drivers()
    pm = _PluginManager()
    pm.register_built_in(name)
    pm.check_pending()
    return available_drivers(pm)


def available_drivers(pm: pluggy.PluginManager | None = None) -> dict[str, DriverEntry]:
    """Every installed driver by name, from every plugin's ``laminae_register_drivers``.

    Loaded anew on each call so that a test may register a plugin on the manager first.
    """
    pm = pm or plugin_manager()
    registry = DriverRegistry()
    for impl in reversed(pm.hook.laminae_register_drivers.get_hookimpls()):
        registry._current_origin = _origin(pm, impl)
        before = dict(registry.entries)
        try:
            impl.function(register=registry)
        except LaminaeError:
            raise
        except Exception as exc:
            origin = pm.origins.get(impl.plugin_name) if isinstance(pm, _PluginManager) else None
            if origin is None:
                # laminae's own, or a plugin registered by hand (a test, an embedding
                # program): its caller must see the failure
                raise LaminaeError(
                    f"driver plugin {impl.plugin_name!r} failed to register: {exc}"
                ) from exc
            # An installed distribution whose hook raises is left out, as one that fails
            # to import is: the other drivers still work, and `laminae drivers` names it.
            registry.entries = before
            assert isinstance(pm, _PluginManager)
            pm.broken[impl.plugin_name] = BrokenPlugin(
                impl.plugin_name,
                origin,
                f"laminae_register_drivers raised {type(exc).__name__}: {exc}",
            )
    return registry.entries


def collect_transports(
    register_for: Callable[[str], Callable[[Any], None]], pm: pluggy.PluginManager | None = None
) -> None:
    """Call every plugin's ``laminae_register_transports``, in the order they were registered.

    :param register_for: the ``register`` callable to hand the plugins of ``origin`` (the
        distribution, ``"name version"``), so that a refusal can name who registered what.
    :raises LaminaeError: a plugin's hook failed, naming the plugin; a :class:`LaminaeError`
        from ``register`` (a refused transport) passes unchanged.
    """
    pm = pm or plugin_manager()
    # Registration order (pluggy calls the last registered first): the first plugin to take a
    # name keeps it, and the refusal names the later one.
    for impl in pm.hook.laminae_register_transports.get_hookimpls():
        origin = _origin_text(_origin(pm, impl))
        try:
            impl.function(register=register_for(origin))
        except LaminaeError:
            raise
        except Exception as exc:  # a broken third-party plugin must name itself
            raise LaminaeError(
                f"transport plugin {impl.plugin_name!r} failed to register: {exc}"
            ) from exc


def conformance_home(
    driver_name: str, base: Path
) -> contextlib.AbstractContextManager[Path] | None:
    """Ask the plugins for a conformance home for ``driver_name`` (see the hookspec)."""
    result: contextlib.AbstractContextManager[Path] | None = (
        plugin_manager().hook.laminae_conformance_home(driver_name=driver_name, base=base)
    )
    return result
